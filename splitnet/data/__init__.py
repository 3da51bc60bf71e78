"""LightningDataModules: uint8 tensors augmented in batches on the device (CIFAR-100, synthetic); image folders
and tar shards augmented in loader workers (ILSVRC, ImageNet-22K)."""

from splitnet.data.base import DataError, ImageTensorDataModule
from splitnet.data.cifar100 import CIFAR100DataModule
from splitnet.data.imagefolder import ImageFolderDataModule
from splitnet.data.shards import ShardDataModule
from splitnet.data.synthetic import SyntheticDataModule

__all__ = ["CIFAR100DataModule", "DataError", "ImageFolderDataModule", "ImageTensorDataModule", "ShardDataModule",
           "SyntheticDataModule"]
