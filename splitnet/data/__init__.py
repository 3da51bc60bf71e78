"""LightningDataModules: images held as uint8 tensors, augmented in whole batches on the training device."""

from splitnet.data.base import DataError, ImageTensorDataModule
from splitnet.data.cifar100 import CIFAR100DataModule
from splitnet.data.imagefolder import ImageFolderDataModule
from splitnet.data.synthetic import SyntheticDataModule

__all__ = ["CIFAR100DataModule", "DataError", "ImageFolderDataModule", "ImageTensorDataModule", "SyntheticDataModule"]
