"""ResNet-18/34/50 in torchvision's architecture (module names kept, so torchvision weights load), splittable
in its last residual stages and the classifier."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from splitnet.errors import ConfigError
from splitnet.plan import IN, OUT, SplitLevel, SplitPlan


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(in_channels, width, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    @staticmethod
    def groupings(block_in: str, index: int) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
        mid = f"mid{index}"
        return {"conv1": (block_in, mid), "conv2": (mid, OUT)}, {"bn1": mid, "bn2": OUT}


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(in_channels, width * 4, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    @staticmethod
    def groupings(block_in: str, index: int) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
        reduce, spatial = f"reduce{index}", f"spatial{index}"
        layers = {"conv1": (block_in, reduce), "conv2": (reduce, spatial), "conv3": (spatial, OUT)}
        return layers, {"bn1": reduce, "bn2": spatial, "bn3": OUT}


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))


class Head(nn.Module):
    """Global average pool and the linear classifier (torchvision's ``fc``)."""

    def __init__(self, in_features: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(torch.flatten(x.mean((2, 3)), 1)))


def _stage_level(name: str, stage: nn.Sequential) -> SplitLevel:
    layers: dict[str, tuple[str, str]] = {}
    norms: dict[str, str] = {}
    for i, block in enumerate(stage):
        block_in = IN if i == 0 else OUT
        block_layers, block_norms = block.groupings(block_in, i)
        layers |= {f"{i}.{k}": v for k, v in block_layers.items()}
        norms |= {f"{i}.{k}": v for k, v in block_norms.items()}
        if block.downsample is not None:
            layers[f"{i}.downsample.0"] = (block_in, OUT)
            norms[f"{i}.downsample.1"] = OUT
    return SplitLevel(name, layers, norms)


class ResNet(nn.Module):
    """ResNet for 224x224 images. The last ``split_stages`` residual stages and the classifier are the split levels."""

    def __init__(
        self, block: type[BasicBlock | Bottleneck], layers: tuple[int, int, int, int], num_classes: int = 1000,
        split_stages: int = 2, dropout: float = 0.0, name: str = "resnet",
    ) -> None:
        super().__init__()
        if not 0 <= split_stages <= 4:
            raise ConfigError(f"backbone.split_stages={split_stages}: a ResNet has 4 residual stages (0 to 4 split)")
        self.name = name
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = 64
        for index, (blocks, width) in enumerate(zip(layers, (64, 128, 256, 512))):
            stage = []
            for b in range(blocks):
                stage.append(block(channels, width, 2 if b == 0 and index > 0 else 1))
                channels = width * block.expansion
            setattr(self, f"layer{index + 1}", nn.Sequential(*stage))
        self.head = Head(channels, num_classes, dropout)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        stages = [f"layer{i}" for i in range(1, 5)]
        first_split = getattr(self, stages[4 - split_stages]) if split_stages else None
        if first_split is not None and first_split[0].downsample is None:
            raise ConfigError(
                f"backbone.split_stages={split_stages}: {stages[4 - split_stages]}'s first block adds its input to its "
                f"output without a projection, so the two cannot be grouped apart; split at most {split_stages - 1}"
            )
        self.split_plan = SplitPlan(
            trunk=("conv1", "bn1", "relu", "maxpool", *stages[: 4 - split_stages]),
            levels=(
                *(_stage_level(name, getattr(self, name)) for name in stages[4 - split_stages :]),
                SplitLevel("head", {"fc": (IN, OUT)}),
            ),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.head(self.layer4(self.layer3(self.layer2(self.layer1(x)))))

    def load_torchvision_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load weights saved from ``torchvision.models.resnetNN`` (its ``fc`` is this model's ``head.fc``).

        A classifier of another class count is left at its initialisation; every other weight must match.
        """
        renamed = {("head." + k if k.startswith("fc.") else k): v for k, v in state_dict.items()}
        own = self.state_dict()
        if renamed.get("head.fc.weight", own["head.fc.weight"]).shape != own["head.fc.weight"].shape:
            renamed = {k: v for k, v in renamed.items() if not k.startswith("head.fc.")}
        missing, unexpected = self.load_state_dict(renamed, strict=False)
        if unexpected or set(missing) - {"head.fc.weight", "head.fc.bias"}:
            raise ConfigError(f"not a torchvision {self.name} state dict: missing {missing}, unexpected {unexpected}")


def resnet18(num_classes: int = 1000, split_stages: int = 2, dropout: float = 0.0) -> ResNet:
    """ResNet-18 (11.7M parameters, 3.6 GFLOPs at 224x224)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, split_stages, dropout, "resnet18")


def resnet50(num_classes: int = 1000, split_stages: int = 2, dropout: float = 0.0) -> ResNet:
    """ResNet-50 (25.6M parameters, 8.2 GFLOPs at 224x224)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, split_stages, dropout, "resnet50")
