"""The split is physical and exact: the tree computes what the dense network with off-block weights zeroed computes."""

import pytest
import torch
from torch import nn

from splitnet.backbones import wide_resnet
from splitnet.plan import SplitConfigError, parse_groups
from splitnet.report import count_flops
from splitnet.surgery import assign_argmax, assign_balanced, build_tree, hard_assign, masked_dense
from splitnet.tree import SplitTree
from tests.conftest import learned_spec, randomised_wrn

SPLITS = ["1-1-2", "1-2-2", "2-2-2", "4-4-4", "1-2-4", "2-4-8", "1-1-4"]  # FC-only, shallow, deep, hierarchical


def conv_linear_params(model: nn.Module) -> int:
    return sum(
        p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters()
    )


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("method", ["balanced", "random", "argmax"])
def test_tree_equals_masked_dense(split, method):
    model = randomised_wrn()
    spec = learned_spec(model, split, method)
    tree = build_tree(model, model.split_plan, spec).eval()
    reference = masked_dense(model, model.split_plan, spec).eval()
    images = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected, actual = reference(images), tree(images)
    assert (actual - expected).abs().max() / expected.abs().max() < 1e-5
    # and the masking mattered: the unmasked dense network computes something else
    with torch.no_grad():
        assert not torch.allclose(model(images), expected)


@pytest.mark.parametrize("split", ["2-2-2", "1-2-4"])
def test_split_is_physical(split):
    model = randomised_wrn()
    spec = learned_spec(model, split, "balanced")
    tree = build_tree(model, model.split_plan, spec)
    reference = masked_dense(model, model.split_plan, spec)
    # separate smaller modules: each leaf classifier sees only its own features and classes
    leaves = list(tree.leaves())
    assert len(leaves) == spec.groups[-1]
    for leaf in leaves:
        assert leaf.body.fc.weight.shape == (len(leaf.classes), 128 // spec.groups[-1])
    # off-block weights are gone: the tree holds exactly the masked network's non-zero split weights
    masked_nonzero = sum(int((m.weight != 0).sum()) for m in reference.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    tree_weights = sum(m.weight.numel() for m in tree.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert tree_weights == masked_nonzero
    assert conv_linear_params(tree) < conv_linear_params(model)


@pytest.mark.parametrize("split", ["1-2-4", "2-4-8", "1-1-2"])
def test_hierarchy_lower_groups_are_unions_of_upper_groups(split):
    model = randomised_wrn()
    spec = learned_spec(model, split, "argmax")
    tree = build_tree(model, model.split_plan, spec).eval()

    def classes(branch) -> set[int]:
        if not branch.subbranches:
            return set(branch.classes.tolist())
        return set().union(*(classes(child) for child in branch.subbranches))

    def check(branch, inputs: torch.Tensor, level: int) -> None:
        if branch.in_index is not None:
            inputs = inputs.index_select(1, branch.in_index)
        outputs = branch.body(inputs)
        if not branch.subbranches:
            return
        assert len(branch.subbranches) == spec.groups[level + 1] // spec.groups[level]
        # the children partition this branch's output channels: each lower group is a union of upper groups
        taken = torch.cat([
            torch.arange(outputs.shape[1]) if c.in_index is None else c.in_index for c in branch.subbranches
        ])
        assert sorted(taken.tolist()) == list(range(outputs.shape[1]))
        for child in branch.subbranches:
            check(child, outputs, level + 1)

    with torch.no_grad():
        features = tree.trunk(torch.randn(2, 3, 32, 32, dtype=torch.float64))
        for root in tree.branches:
            check(root, features, 0)
    root_classes = [classes(root) for root in tree.branches]
    assert sorted(c for group in root_classes for c in group) == list(range(16))
    assert sorted(c for group in tree.class_groups() for c in group) == list(range(16))


# method.md's table; params count conv and linear weights and biases. Its 1-1-2 entry (10.98M) is 0.005M
# above the exact count (10.975M = dense minus half the 512x100 classifier), so compare to within 0.01.
@pytest.mark.parametrize(
    "split, params, gflops",
    [("none", 11.00, 3.10), ("1-1-2", 10.98, 3.10), ("1-2-2", 6.78, 2.56), ("2-2-2", 5.73, 2.02),
     ("4-4-4", 3.10, 1.49), ("8-8-8", 1.78, 1.22), ("1-2-4", 6.77, 2.56), ("2-4-8", 3.62, 1.75)],
)
def test_balanced_wrn16_8_matches_method_table(split, params, gflops):
    model = wide_resnet(16, 8, num_classes=100).eval()
    groups = parse_groups(split, model.split_plan)
    free = model.split_plan.free_groupings(model, groups)
    probs = {key: torch.full((count, size), 1.0 / count) for key, (count, size) in free.items()}
    tree = build_tree(model, model.split_plan, hard_assign(groups, probs, "balanced"))
    assert isinstance(tree, SplitTree)
    assert abs(round(conv_linear_params(tree) / 1e6, 2) - params) <= 0.0101
    assert round(count_flops(tree, (3, 32, 32)) / 1e9, 2) == gflops


def test_argmax_empty_group_is_a_clear_error():
    q = torch.tensor([[0.9, 0.8, 0.6], [0.1, 0.2, 0.4]])
    with pytest.raises(SplitConfigError, match=r"group 1 of grouping 'head:out' empty.*split.assign=balanced"):
        assign_argmax(q, "head:out")


def test_balanced_gives_equal_groups_closest_to_the_soft_assignment():
    q = torch.tensor([[0.9, 0.8, 0.6, 0.7], [0.1, 0.2, 0.4, 0.3]])
    assert assign_balanced(q).tolist() == [0, 0, 1, 1]  # the two least group-0-like columns move
    confident = torch.tensor([[0.9, 0.1, 0.8, 0.3, 0.7], [0.1, 0.9, 0.2, 0.7, 0.3]])
    assert assign_balanced(confident).tolist() == assign_argmax(confident, "x").tolist()  # already balanced-ish
    assert torch.bincount(assign_balanced(torch.rand(4, 103))).tolist() == [26, 26, 26, 25]


def test_unknown_assign_method_is_rejected():
    with pytest.raises(SplitConfigError, match="split.assign='nearest'"):
        hard_assign((2,), {}, "nearest")
