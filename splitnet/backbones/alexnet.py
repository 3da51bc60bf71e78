"""AlexNet in torchvision's architecture, splittable in its three fully connected layers (fc6, fc7, fc8)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from splitnet.plan import IN, OUT, SplitLevel, SplitPlan

# torchvision's classifier indices -> this model's modules
_TORCHVISION_NAMES = {"classifier.1.": "fc6.1.", "classifier.4.": "fc7.1.", "classifier.6.": "fc8."}


class AlexNet(nn.Module):
    """Convolutional features (the trunk), then fc6, fc7 and the classifier fc8, each a split level (``G6-G7-G8``)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.name = "alexnet"
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.flatten = nn.Flatten()
        self.fc6 = nn.Sequential(nn.Dropout(dropout), nn.Linear(256 * 36, 4096), nn.ReLU(inplace=True))
        self.fc7 = nn.Sequential(nn.Dropout(dropout), nn.Linear(4096, 4096), nn.ReLU(inplace=True))
        self.fc8 = nn.Linear(4096, num_classes)
        self.split_plan = SplitPlan(
            trunk=("features", "avgpool", "flatten"),
            levels=(
                SplitLevel("fc6", {"1": (IN, OUT)}),
                SplitLevel("fc7", {"1": (IN, OUT)}),
                SplitLevel("fc8", {"": (IN, OUT)}),
            ),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.fc8(self.fc7(self.fc6(self.flatten(self.avgpool(self.features(x))))))

    def load_torchvision_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load weights saved from ``torchvision.models.alexnet``."""
        renamed = {}
        for key, value in state_dict.items():
            for old, new in _TORCHVISION_NAMES.items():
                if key.startswith(old):
                    key = new + key[len(old):]
            renamed[key] = value
        self.load_state_dict(renamed)


def alexnet(num_classes: int = 1000, dropout: float = 0.5) -> AlexNet:
    """AlexNet (61.1M parameters, 1.4 GFLOPs at 224x224)."""
    return AlexNet(num_classes, dropout)
