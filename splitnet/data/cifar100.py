"""CIFAR-100 (Krizhevsky, 2009): 50k training images split 45k/5k into train/val with a fixed seed, 10k test."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import Tensor
from torchvision.datasets import CIFAR100
from torchvision.datasets.utils import check_integrity

from splitnet.data.base import DataError, ImageTensorDataModule


class CIFAR100DataModule(ImageTensorDataModule):
    """CIFAR-100 from ``root/cifar-100-python`` (torchvision's layout), downloaded there when absent and allowed."""

    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)

    def __init__(self, root: str = "data", download: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root, self.download = root, download
        self.superclass_of: list[int] = []  # CIFAR-100's 20 superclasses: the superclass of each class
        self.superclass_names: list[str] = []

    def _dataset(self, train: bool) -> CIFAR100:
        folder = Path(self.root).expanduser().resolve()
        try:
            return CIFAR100(str(folder), train=train, download=False)
        except RuntimeError:
            if not self.download:
                raise DataError(
                    f"CIFAR-100 was not found in {folder / 'cifar-100-python'}, or its files are corrupt (they must "
                    "pass torchvision's md5 check), and data.download=false. Put the python version of CIFAR-100 "
                    "there (files train, test, meta) or set data.root to the folder that holds cifar-100-python/"
                ) from None
        try:
            return CIFAR100(str(folder), train=train, download=True)
        except Exception as failure:  # noqa: BLE001 - any download failure gets the same advice
            raise DataError(
                f"CIFAR-100 was not found in {folder / 'cifar-100-python'}, or its files are corrupt, and downloading "
                f"it failed ({failure}). "
                "Download cifar-100-python.tar.gz yourself and unpack it there, or set data.root to the folder "
                "that holds cifar-100-python/"
            ) from None

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
        train, test = self._dataset(True), self._dataset(False)
        folder = Path(train.root) / train.base_folder
        self.superclass_of = _superclasses(folder / "train", len(train.classes))
        with open(folder / train.meta["filename"], "rb") as handle:
            self.superclass_names = pickle.load(handle, encoding="latin1")["coarse_label_names"]

        def images(dataset: CIFAR100) -> Tensor:
            return torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()

        return images(train), torch.tensor(train.targets), images(test), torch.tensor(test.targets), list(train.classes)


def _superclasses(train_file: Path, classes: int) -> list[int]:
    """The coarse label of each fine class, read from the training file (torchvision keeps only fine labels)."""
    if not check_integrity(str(train_file)):
        raise DataError(f"{train_file} is corrupt")
    with open(train_file, "rb") as handle:
        records = pickle.load(handle, encoding="latin1")
    superclass_of = [-1] * classes
    for fine, coarse in zip(records["fine_labels"], records["coarse_labels"]):
        superclass_of[fine] = coarse
    return superclass_of
