"""The shared data pipeline: uint8 image tensors, a seeded train/val split, batch-wise augmentation on the device."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from splitnet.errors import ConfigError, is_whole_number


class DataError(RuntimeError):
    """A data set that is missing, unreadable or malformed; the message says where it was looked for."""


class EpochSeededSampler(Sampler[int]):
    """A random permutation drawn from ``(seed, epoch)``: the same order every time, so a resumed run sees the same batches."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def random_crop_flip(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Reflect-pad, crop back to the original size at a random offset, and flip half the images horizontally."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator, device=generator.device)
    rows = (offsets[0, :, None] + torch.arange(height, device=images.device))[:, None, :, None]
    cols = (offsets[1, :, None] + torch.arange(width, device=images.device))[:, None, None, :]
    flip = torch.rand(batch, generator=generator, device=generator.device) < 0.5
    cols = torch.where(flip[:, None, None, None], cols.flip(3), cols)
    index = torch.arange(batch, device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[index, channels, rows, cols]


class SplitDataModule(pl.LightningDataModule):
    """Train, held-out validation and test loaders, shared by every data module.

    Subclasses fill ``_datasets`` ("train", "val", "test") and ``class_names`` in ``setup`` and turn a
    loader's batch into images and labels on a device in ``fetch``.
    """

    def __init__(self, batch_size: int, eval_batch_size: int, val_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ConfigError(f"data.{name}={value}: must be a positive integer")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers!r}: must be 0 (load in the main process) or more")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size, self.num_workers, self.seed = val_size, num_workers, seed
        self.class_names: list[str] = []
        self._datasets: dict[str, Dataset] = {}

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.class_names)

    def held_out(self, count: int) -> tuple[list[int], list[int]]:
        """A seeded split of ``count`` training images: (train indices, validation indices)."""
        if not 0 <= self.val_size < count:
            raise ConfigError(f"data.val_size={self.val_size}: must be between 0 and the {count} training images")
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed)).tolist()
        return order[self.val_size :], order[: self.val_size]

    def _loader(self, split: str, batch_size: int, **kwargs) -> DataLoader:
        # its own generator (the workers' seeds), so that starting an iterator draws nothing from torch's global one,
        # which the module seeds every epoch for dropout: a resumed run starts its iterators at other moments
        return DataLoader(
            self._datasets[split],
            batch_size=batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.seed),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSeededSampler(len(self._datasets["train"]), self.seed)
        return self._loader("train", self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)

    def fetch(self, batch, device: torch.device, train: bool, step: int = 0) -> tuple[Tensor, Tensor]:
        """A loader's batch -> model-ready images and labels on ``device`` (augmented when ``train``).

        This default is for loaders whose workers already augment and normalise: it only moves the batch.
        """
        images, labels = batch
        return images.to(device), labels.to(device)


class ImageTensorDataModule(SplitDataModule):
    """Base of the in-memory image data modules: subclasses only load uint8 tensors (N x C x H x W) and labels.

    The whole data set lives as one uint8 tensor on the training device; the data loaders yield only
    indices. After the transfer a batch is gathered there, augmented (pad-crop-flip, training only) and
    normalised, so no per-image work runs on the CPU. The augmentation is seeded by (seed, epoch, batch,
    rank), so a resumed run repeats it exactly.
    """

    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.25, 0.25, 0.25)

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        val_size: int = 5000,
        num_workers: int = 0,
        augment: bool = True,
        crop_padding: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, val_size, num_workers, seed)
        if not isinstance(augment, bool):
            raise ConfigError(f"data.augment={augment!r}: must be true or false")
        if not is_whole_number(crop_padding) or crop_padding < 0:
            raise ConfigError(f"data.crop_padding={crop_padding!r}: must be a whole number of pixels, 0 or more")
        self.augment, self.crop_padding = augment, crop_padding
        self._images: Tensor | None = None
        self._labels: Tensor | None = None
        self._resident: dict[torch.device, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
        """Train images, train labels, test images, test labels, class names."""
        raise NotImplementedError

    @property
    def image_shape(self) -> tuple[int, ...]:
        self.setup()
        return tuple(self._images.shape[1:])

    def setup(self, stage: str | None = None) -> None:
        if self._datasets:
            return
        train_x, train_y, test_x, test_y, self.class_names = self.load()
        train, val = self.held_out(len(train_x))
        self._images, self._labels = torch.cat([train_x, test_x]), torch.cat([train_y, test_y])
        self._datasets = {"train": train, "val": val, "test": list(range(len(train_x), len(self._images)))}

    def fetch(self, batch: Tensor, device: torch.device, train: bool, step: int = 0) -> tuple[Tensor, Tensor]:
        """A batch of indices -> normalised float images (augmented when ``train``) and labels, on ``device``."""
        if device not in self._resident:
            mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
            self._resident[device] = (self._images.to(device), self._labels.to(device), mean, std)
        images, labels, mean, std = self._resident[device]
        batch = batch.to(device)
        images = images[batch].float().div_(255)
        if train and self.augment:
            generator = torch.Generator(device).manual_seed(self.seed * 1_000_003 + step)
            images = random_crop_flip(images, self.crop_padding, generator)
        return (images - mean) / std, labels[batch]


    def on_after_batch_transfer(self, batch: Tensor, dataloader_idx: int) -> tuple[Tensor, Tensor]:
        train = self.trainer is not None and self.trainer.training
        step = 0
        if train:
            batch_index = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready
            step = (self.trainer.current_epoch * 1_000_003 + batch_index) * 1009 + self.trainer.global_rank
        return self.fetch(batch, batch.device, train, step)
