"""Backbones: plain ``nn.Module``s that declare their split plan (see ``splitnet.plan``)."""

from splitnet.backbones.alexnet import AlexNet, alexnet
from splitnet.backbones.resnet import ResNet, resnet18, resnet50
from splitnet.backbones.wrn import WideResNet, wide_resnet

__all__ = ["AlexNet", "ResNet", "WideResNet", "alexnet", "resnet18", "resnet50", "wide_resnet"]
