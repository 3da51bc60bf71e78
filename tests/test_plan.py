"""Split strings: the hierarchy rule, malformed strings and group counts that do not fit, each with its message."""

import pytest
from torch import nn

from splitnet.backbones import wide_resnet
from splitnet.plan import IN, OUT, SplitConfigError, SplitLevel, SplitPlan, parse_groups

PLAN = wide_resnet(16, 1, num_classes=10).split_plan


@pytest.mark.parametrize(
    "text, groups",
    [("none", (1, 1, 1)), ("1-1-2", (1, 1, 2)), ("2-2-2", (2, 2, 2)), ("1-2-4", (1, 2, 4)), ("2-4-8", (2, 4, 8)),
     ("3-3-6", (3, 3, 6))],
)
def test_valid_splits(text, groups):
    assert parse_groups(text, PLAN) == groups


@pytest.mark.parametrize(
    "text, message",
    [
        ("4-2-2", r"split.groups='4-2-2': group counts may not decrease going up \(4 > 2\)"),
        ("2-3-6", r"split.groups='2-3-6': each level's group count must divide the next one's \(2 does not divide 3\)"),
        ("2-x-2", r"split.groups='2-x-2' is not a split string: expected G3-G2-G1"),
        ("2-2", r"split.groups='2-2' gives 2 group counts, but this backbone has 3 split levels \(stage2, stage3, head\)"),
        ("0-2-2", r"group counts must be at least 1"),
    ],
)
def test_invalid_splits_name_the_value_and_the_rule(text, message):
    with pytest.raises(SplitConfigError, match=message):
        parse_groups(text, PLAN)


def test_more_groups_than_channels_is_rejected():
    model = wide_resnet(16, 1, num_classes=10)
    with pytest.raises(SplitConfigError, match=r"32 groups in grouping 'stage2:in', which has only 16 channels"):
        model.split_plan.free_groupings(model, (32, 32, 32))


def test_a_plan_whose_layers_disagree_names_the_layer():
    """A backbone's plan that gives one grouping two channel counts fails naming the layer by its path (a level that
    is a single layer, as AlexNet's fc8, by the level's name alone)."""
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(5, 4))  # 6 outputs feed a layer that takes 5
    plan = SplitPlan(trunk=(), levels=(SplitLevel("0", {"": (IN, OUT)}), SplitLevel("1", {"": (IN, OUT)})))
    with pytest.raises(SplitConfigError, match=r"split plan: layer '1' gives grouping '1:in' 5 channels, another layer 6$"):
        plan.grouping_dims(model)
