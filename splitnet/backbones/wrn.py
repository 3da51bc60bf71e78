"""Pre-activation Wide ResNet (Zagoruyko & Komodakis, 2016) for 32x32 images, as split in the SplitNet paper."""

from __future__ import annotations

from torch import Tensor, nn

from splitnet.errors import ConfigError
from splitnet.plan import IN, OUT, SplitLevel, SplitPlan


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, with a 1x1 projection shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(x).relu()
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(self.bn2(out).relu()))
        return out + residual


class Head(nn.Module):
    """Final BN-ReLU, global average pool, dropout and the linear classifier."""

    def __init__(self, in_features: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_features)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(x).relu().mean((2, 3))
        return self.fc(self.dropout(x))


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        *(
            PreActBlock(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1, dropout)
            for i in range(blocks)
        )
    )


def _stage_level(name: str, stage: nn.Sequential) -> SplitLevel:
    """A stage's groupings: its input, one middle grouping per block, and its output."""
    layers: dict[str, tuple[str, str]] = {}
    norms: dict[str, str] = {}
    for i, block in enumerate(stage):
        block_in, mid = (IN if i == 0 else OUT), f"mid{i}"
        layers[f"{i}.conv1"] = (block_in, mid)
        layers[f"{i}.conv2"] = (mid, OUT)
        if block.shortcut is not None:
            layers[f"{i}.shortcut"] = (block_in, OUT)
        norms[f"{i}.bn1"] = block_in
        norms[f"{i}.bn2"] = mid
    return SplitLevel(name, layers, norms)


class WideResNet(nn.Module):
    """WRN-depth-width: a stem, three stages of pre-activation blocks, and a head.

    The stem and stage 1 form the shared trunk; stage 2, stage 3 and the head are the split levels
    (``G3-G2-G1``). ``dropout`` applies inside the blocks of stages 2-3 and before the classifier.
    """

    def __init__(self, depth: int = 16, width: int = 8, num_classes: int = 100, dropout: float = 0.0) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ConfigError(f"backbone.depth={depth}: a Wide ResNet has depth 6n+4 with n >= 1 (10, 16, 22, 28, ...)")
        if width < 1:
            raise ConfigError(f"backbone.width={width}: the widening factor must be a positive integer")
        blocks = (depth - 4) // 6
        widths = (16, 16 * width, 32 * width, 64 * width)
        self.name = f"wrn{depth}_{width}"
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.stage1 = _stage(widths[0], widths[1], blocks, 1, 0.0)
        self.stage2 = _stage(widths[1], widths[2], blocks, 2, dropout)
        self.stage3 = _stage(widths[2], widths[3], blocks, 2, dropout)
        self.head = Head(widths[3], num_classes, dropout)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        self.split_plan = SplitPlan(
            trunk=("stem", "stage1"),
            levels=(
                _stage_level("stage2", self.stage2),
                _stage_level("stage3", self.stage3),
                SplitLevel("head", {"fc": (IN, OUT)}, {"bn": IN}),
            ),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stage3(self.stage2(self.stage1(self.stem(x)))))


def wide_resnet(depth: int = 16, width: int = 8, num_classes: int = 100, dropout: float = 0.0) -> WideResNet:
    """Build a WRN-``depth``-``width`` for 32x32 inputs (WRN-16-8: 11.0M parameters, 3.10 GFLOPs per image)."""
    return WideResNet(depth, width, num_classes, dropout)
