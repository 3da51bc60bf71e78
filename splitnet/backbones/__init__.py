"""Backbones: plain ``nn.Module``s that declare their split plan (see ``splitnet.plan``)."""

from splitnet.backbones.wrn import WideResNet, wide_resnet

__all__ = ["WideResNet", "wide_resnet"]
