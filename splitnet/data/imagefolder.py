"""Image folders (ILSVRC 2012, ImageNet-22K, or any ``root/<split>/<class>/<image>`` tree), with the standard
224x224 augmentation done per image in worker processes (batches arrive ready; the base ``fetch`` moves them)."""

from __future__ import annotations

import logging
import multiprocessing
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Subset
from torchvision import transforms
from torchvision.datasets import ImageFolder

from splitnet.data.base import DataError, SplitDataModule
from splitnet.errors import ConfigError

log = logging.getLogger(__name__)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BAD_IMAGE_POLICIES = ("skip", "error")


def imagenet_transforms(size: int) -> tuple[transforms.Compose, transforms.Compose]:
    """The standard ImageNet augmentation (random resized crop, flip) and evaluation transform (resize, centre
    crop), both ending in normalised tensors."""
    normalize = transforms.Normalize(MEAN, STD)
    train = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                transforms.ToTensor(), normalize])
    evaluation = transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size),
                                     transforms.ToTensor(), normalize])
    return train, evaluation


class BadImagePolicy:
    """What an unreadable image does: stop with a DataError naming it (``error``), or get skipped and counted
    (``skip``); the count is shared with the loader's worker processes."""

    def __init__(self, policy: str) -> None:
        if policy not in BAD_IMAGE_POLICIES:
            raise ConfigError(f"data.on_bad_image='{policy}' is not one of {', '.join(BAD_IMAGE_POLICIES)}")
        self.policy, self._skipped = policy, multiprocessing.Value("i", 0)

    @property
    def skipped(self) -> int:
        return self._skipped.value

    def __call__(self, what: str, error: Exception) -> None:
        """Handle ``what`` (e.g. "image <path>") that could not be read: raise, or count it and return."""
        if self.policy == "error":
            raise DataError(f"unreadable {what} ({error}); set data.on_bad_image=skip to skip such files") from None
        with self._skipped.get_lock():
            self._skipped.value += 1
        log.warning("skipping unreadable %s (%s)", what, error)


class TolerantImageFolder(ImageFolder):
    """An ImageFolder that hands an unreadable image to its ``BadImagePolicy`` and, if skipped, reads the next."""

    def __init__(self, root: str, transform, on_bad_image: BadImagePolicy) -> None:
        super().__init__(root, transform=transform)
        self.on_bad_image = on_bad_image

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                with Image.open(path) as image:
                    picture = image.convert("RGB")
            except (OSError, UnidentifiedImageError) as error:
                self.on_bad_image(f"image {path}", error)
                continue
            return self.transform(picture), label
        raise DataError(f"no readable image under {self.root}")


class WorkerImageDataModule(SplitDataModule):
    """Base of the data modules whose loader workers decode and augment images (folders, tar shards): square
    ``image_size`` inputs and a ``BadImagePolicy`` from ``on_bad_image``."""

    def __init__(self, batch_size: int, eval_batch_size: int, val_size: int, num_workers: int, image_size: int,
                 on_bad_image: str, seed: int) -> None:
        super().__init__(batch_size, eval_batch_size, val_size, num_workers, seed)
        self.image_size, self.on_bad_image = image_size, BadImagePolicy(on_bad_image)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    @property
    def skipped_images(self) -> int:
        return self.on_bad_image.skipped


class ImageFolderDataModule(WorkerImageDataModule):
    """``root/train`` (a held-out slice of it is the validation set) and ``root/<test_split>`` as the test set.

    The class count and names are read from the folders. ``on_bad_image``: ``skip`` (skipped and counted) or
    ``error`` (stop, naming the file).
    """

    def __init__(
        self, root: str, test_split: str = "val", batch_size: int = 256, eval_batch_size: int = 256,
        val_size: int = 10000, num_workers: int = 8, image_size: int = 224, on_bad_image: str = "skip",
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, val_size, num_workers, image_size, on_bad_image, seed)
        self.root, self.test_split = Path(root).expanduser(), test_split

    def _folder(self, split: str, transform) -> TolerantImageFolder:
        folder = self.root / split
        if not folder.is_dir():
            raise DataError(
                f"no folder {folder}: data.root must hold {split}/ with one sub-folder of images per class"
            )
        try:
            return TolerantImageFolder(str(folder), transform, self.on_bad_image)
        except FileNotFoundError as error:
            raise DataError(f"{folder}: {error}") from None

    def setup(self, stage: str | None = None) -> None:
        if self._datasets:
            return
        train_tf, eval_tf = imagenet_transforms(self.image_size)
        train, held_out = self._folder("train", train_tf), self._folder("train", eval_tf)
        test = self._folder(self.test_split, eval_tf)
        if test.classes != train.classes:
            raise DataError(f"{self.root / self.test_split} has other class folders than {self.root / 'train'}")
        train_indices, val_indices = self.held_out(len(train))
        self.class_names = list(train.classes)
        self._datasets = {"train": Subset(train, train_indices), "val": Subset(held_out, val_indices), "test": test}
