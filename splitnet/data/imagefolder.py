"""Image folders (ILSVRC 2012, ImageNet-22K, or any ``root/<split>/<class>/<image>`` tree), with the standard
224x224 augmentation done per image in worker processes."""

from __future__ import annotations

import logging
import multiprocessing
from pathlib import Path

import pytorch_lightning as pl
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms
from torchvision.datasets import ImageFolder

from splitnet.data.base import DataError, EpochSeededSampler

log = logging.getLogger(__name__)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BAD_IMAGE_POLICIES = ("skip", "error")


class TolerantImageFolder(ImageFolder):
    """An ImageFolder that, on an unreadable image, raises a DataError naming it or skips it and counts it."""

    def __init__(self, root: str, transform, on_bad_image: str, skipped) -> None:
        super().__init__(root, transform=transform)
        self.on_bad_image, self.skipped = on_bad_image, skipped

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                with Image.open(path) as image:
                    picture = image.convert("RGB")
            except (OSError, UnidentifiedImageError) as error:
                if self.on_bad_image == "error":
                    raise DataError(f"unreadable image {path} ({error}); set data.on_bad_image=skip to skip such files") from None
                with self.skipped.get_lock():
                    self.skipped.value += 1
                log.warning("skipping unreadable image %s (%s)", path, error)
                continue
            return self.transform(picture), label
        raise DataError(f"no readable image under {self.root}")


class ImageFolderDataModule(pl.LightningDataModule):
    """``root/train`` (a held-out slice of it is the validation set) and ``root/<test_split>`` as the test set.

    The class count and names are read from the folders. ``on_bad_image``: ``skip`` (skipped and counted) or
    ``error`` (stop, naming the file).
    """

    def __init__(
        self, root: str, test_split: str = "val", batch_size: int = 256, eval_batch_size: int = 256,
        val_size: int = 10000, num_workers: int = 8, image_size: int = 224, on_bad_image: str = "skip",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"data.on_bad_image='{on_bad_image}' is not one of {', '.join(BAD_IMAGE_POLICIES)}")
        self.root, self.test_split = Path(root).expanduser(), test_split
        self.batch_size, self.eval_batch_size, self.val_size = batch_size, eval_batch_size, val_size
        self.num_workers, self.image_size, self.on_bad_image, self.seed = num_workers, image_size, on_bad_image, seed
        self.skipped = multiprocessing.Value("i", 0)
        self.class_names: list[str] = []
        self._splits: dict[str, Dataset] = {}

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    def _folder(self, split: str, transform) -> TolerantImageFolder:
        folder = self.root / split
        if not folder.is_dir():
            raise DataError(
                f"no folder {folder}: data.root must hold {split}/ with one sub-folder of images per class"
            )
        try:
            return TolerantImageFolder(str(folder), transform, self.on_bad_image, self.skipped)
        except FileNotFoundError as error:
            raise DataError(f"{folder}: {error}") from None

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        normalize = transforms.Normalize(MEAN, STD)
        train_tf = transforms.Compose([transforms.RandomResizedCrop(self.image_size), transforms.RandomHorizontalFlip(),
                                       transforms.ToTensor(), normalize])
        eval_tf = transforms.Compose([transforms.Resize(round(self.image_size * 256 / 224)),
                                      transforms.CenterCrop(self.image_size), transforms.ToTensor(), normalize])
        train, held_out = self._folder("train", train_tf), self._folder("train", eval_tf)
        test = self._folder(self.test_split, eval_tf)
        if test.classes != train.classes:
            raise DataError(f"{self.root / self.test_split} has other class folders than {self.root / 'train'}")
        if not 0 <= self.val_size < len(train):
            raise ValueError(f"data.val_size={self.val_size}: must be between 0 and the {len(train)} training images")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.class_names = list(train.classes)
        self._splits = {"train": Subset(train, order[self.val_size:]), "val": Subset(held_out, order[: self.val_size]),
                        "test": test}

    def _loader(self, split: str, batch_size: int, **kwargs) -> DataLoader:
        return DataLoader(self._splits[split], batch_size=batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(), **kwargs)

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSeededSampler(len(self._splits["train"]), self.seed)
        return self._loader("train", self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)

    def fetch(self, batch: tuple[Tensor, Tensor], device: torch.device, train: bool, step: int = 0) -> tuple[Tensor, Tensor]:
        """Images arrive augmented and normalised by the workers; only moved to ``device`` here."""
        images, labels = batch
        return images.to(device), labels.to(device)

    @property
    def skipped_images(self) -> int:
        return self.skipped.value
