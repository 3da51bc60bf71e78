"""ResNet and AlexNet: torchvision's weights load and compute the same logits; their splits are exact."""

import pytest
import torch
import torchvision
from torch import nn

from splitnet.backbones.alexnet import alexnet
from splitnet.backbones.resnet import resnet18, resnet50
from splitnet.errors import ConfigError
from splitnet.plan import parse_groups
from splitnet.surgery import build_tree, hard_assign, masked_dense


@pytest.mark.parametrize(
    "ours, theirs, size",
    [(resnet18, torchvision.models.resnet18, 64), (resnet50, torchvision.models.resnet50, 64),
     (alexnet, torchvision.models.alexnet, 224)],
)
def test_torchvision_weights_give_torchvision_logits(ours, theirs, size):
    torch.manual_seed(0)
    reference = theirs(num_classes=10).eval()
    model = ours(num_classes=10).eval()
    model.load_torchvision_state_dict(reference.state_dict())
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images))


def test_pretrained_classifier_of_another_class_count_is_left_out():
    model = resnet18(num_classes=37)
    model.load_torchvision_state_dict(torchvision.models.resnet18(num_classes=1000).state_dict())
    assert model.head.fc.out_features == 37


def randomise_norms(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.double().eval()


@pytest.mark.parametrize(
    "build, split, size",
    [(lambda: resnet18(num_classes=12), "2-2-4", 64), (lambda: resnet50(num_classes=12), "2-4-4", 64),
     (lambda: resnet18(num_classes=12, split_stages=1), "2-4", 64),
     (lambda: alexnet(num_classes=12), "1-2-4", 224)],
    ids=["resnet18", "resnet50", "resnet18-last-stage", "alexnet"],
)
def test_split_tree_equals_masked_dense(build, split, size):
    torch.manual_seed(0)
    model = randomise_norms(build())
    groups = parse_groups(split, model.split_plan)
    free = model.split_plan.free_groupings(model, groups)
    spec = hard_assign(groups, {k: torch.rand(c, d) for k, (c, d) in free.items()}, "random", seed=2)
    tree = build_tree(model, model.split_plan, spec).eval()
    reference = masked_dense(model, model.split_plan, spec).eval()
    images = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        expected = reference(images)
        assert (tree(images) - expected).abs().max() / expected.abs().max() < 1e-5
    assert sum(p.numel() for p in tree.parameters()) < sum(p.numel() for p in model.parameters())


def test_a_stage_whose_first_block_has_no_projection_is_not_split():
    """ResNet-18's layer1 adds its input to its output unprojected: its input and output cannot be grouped apart."""
    with pytest.raises(ConfigError, match="backbone.split_stages=4: layer1's first block adds its input to its output"):
        resnet18(split_stages=4)
    assert len(resnet50(split_stages=4).split_plan.levels) == 5  # a bottleneck's first block projects
