"""LightningDataModules: uint8 tensors augmented in batches on the device (CIFAR-100, synthetic) and image
folders augmented in loader workers (ILSVRC, ImageNet-22K). Tar shards (``splitnet.data.shards``) are imported
only where used: they need webdataset, which the other data sets do not."""

from splitnet.data.base import DataError, ImageTensorDataModule
from splitnet.data.cifar100 import CIFAR100DataModule
from splitnet.data.imagefolder import ImageFolderDataModule
from splitnet.data.synthetic import SyntheticDataModule

__all__ = ["CIFAR100DataModule", "DataError", "ImageFolderDataModule", "ImageTensorDataModule", "SyntheticDataModule"]
