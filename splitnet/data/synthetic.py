"""A small generated image classification set: each class is a smooth random pattern plus noise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from splitnet.data.base import ImageTensorDataModule
from splitnet.errors import ConfigError


class SyntheticDataModule(ImageTensorDataModule):
    """Learnable in a few steps; for smoke runs and tests with no data set on disk."""

    def __init__(
        self,
        num_classes: int = 10,
        train_size: int = 2000,
        test_size: int = 500,
        image_size: int = 32,
        noise: float = 0.35,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ConfigError(f"data.num_classes={num_classes}: a classifier needs at least 2 classes")
        self._num_classes, self.train_size, self.test_size = num_classes, train_size, test_size
        self.image_size, self.noise = image_size, noise

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
        generator = torch.Generator().manual_seed(self.seed)
        coarse = torch.rand(self._num_classes, 3, 4, 4, generator=generator)
        prototypes = F.interpolate(coarse, size=self.image_size, mode="bilinear", align_corners=False)

        def sample(count: int) -> tuple[Tensor, Tensor]:
            labels = torch.randint(0, self._num_classes, (count,), generator=generator)
            noise = torch.randn(count, 3, self.image_size, self.image_size, generator=generator) * self.noise
            images = (prototypes[labels] + noise).clamp(0, 1).mul(255).round().to(torch.uint8)
            return images, labels

        train_x, train_y = sample(self.train_size)
        test_x, test_y = sample(self.test_size)
        return train_x, train_y, test_x, test_y, [f"class_{i}" for i in range(self._num_classes)]
