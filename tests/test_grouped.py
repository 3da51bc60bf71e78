"""The grouped tree computes what the tree computes, trains as it trains, and runs as many operations whatever its
group count; the module finetunes in it and keeps a checkpoint's layout."""

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from splitnet.backbones import alexnet, resnet18, wide_resnet
from splitnet.bench import SCHEDULE
from splitnet.errors import ConfigError
from splitnet.grouped import MAX_PADDING_SHARE, GroupedTree
from splitnet.module import SplitNetModule
from splitnet.report import count_params
from splitnet.surgery import build_tree
from splitnet.tree import SplitTree
from tests.conftest import TINY_BACKBONE, TINY_SPLIT, DispatchedOperations, learned_spec, randomised_wrn

SPLITS = ["2-2-2", "4-4-4", "1-2-4", "2-4-8", "1-1-2"]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("method", ["argmax", "balanced"])
def test_grouped_tree_computes_the_tree(split, method):
    model = randomised_wrn()
    tree = build_tree(model, model.split_plan, learned_spec(model, split, method)).eval()
    grouped = GroupedTree(tree, model.split_plan).eval()
    images = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = tree(images)
        torch.testing.assert_close(grouped(images), expected, rtol=1e-10, atol=1e-10)
        grouped.to(memory_format=torch.channels_last)
        torch.testing.assert_close(grouped(images.contiguous(memory_format=torch.channels_last)), expected)
    # uneven (argmax) groups are padded to the widest, balanced ones are not
    assert (count_params(grouped) > count_params(tree)) == (method == "argmax")
    assert grouped.class_groups() == tree.class_groups()


@pytest.mark.parametrize("backbone, shape", [(resnet18, (3, 64, 64)), (alexnet, (3, 224, 224))],
                         ids=["resnet18", "alexnet"])
def test_grouped_tree_computes_the_tree_of_other_backbones(backbone, shape):
    torch.manual_seed(0)
    model = backbone(num_classes=10).eval()
    tree = build_tree(model, model.split_plan, learned_spec(model, "2-2-2", "argmax")).eval()
    grouped = GroupedTree(tree, model.split_plan).eval()
    images = torch.randn(2, *shape)
    with torch.no_grad():
        torch.testing.assert_close(grouped(images), tree(images), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("split", ["2-2-2", "2-4-8"])
def test_grouped_tree_trains_as_the_tree_and_its_padding_stays_zero(split):
    """SGD steps (momentum, weight decay, batch norm in training mode) on uneven groups: the unpacked grouped tree ends
    where the tree ends, and packing it again gives the grouped tree's parameters exactly, padding (zeros) included."""
    model = randomised_wrn().train()
    tree = build_tree(model, model.split_plan, learned_spec(model, split, "argmax")).train()
    grouped = GroupedTree(tree, model.split_plan).train()
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
                  for net in (tree, grouped)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        images = torch.randn(8, 3, 32, 32, dtype=torch.float64, generator=generator)
        labels = torch.randint(0, 16, (8,), generator=generator)
        for net, optimizer in zip((tree, grouped), optimizers):
            optimizer.zero_grad()
            F.cross_entropy(net(images), labels).backward()
            optimizer.step()
    unpacked = grouped.unpack()
    assert unpacked.state_dict().keys() == tree.state_dict().keys()
    for (name, expected), actual in zip(tree.state_dict().items(), unpacked.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12, msg=name)
    repacked = GroupedTree(unpacked, model.split_plan)
    for (name, actual), expected in zip(grouped.named_parameters(), repacked.parameters()):
        assert torch.equal(actual, expected), name


def test_grouped_tree_runs_as_many_operations_whatever_its_group_count():
    """Forward and backward dispatch one operation per layer for all branches: the dense network's count plus the
    levels' input gathers for every split, where the tree run branch after branch dispatches one per branch."""
    model = wide_resnet(16, 1, num_classes=16)
    images, labels = torch.randn(2, 3, 8, 8), torch.randint(0, 16, (2,))

    def operations(net: torch.nn.Module) -> int:
        with DispatchedOperations() as dispatched:
            F.cross_entropy(net(images), labels).backward()
        return len(dispatched.names)

    dense = operations(model)
    trees = {split: build_tree(model, model.split_plan, learned_spec(model, split, "balanced"))
             for split in ("2-2-2", "4-4-4", "2-4-8")}
    grouped = {split: operations(GroupedTree(tree, model.split_plan)) for split, tree in trees.items()}
    branches = {split: operations(tree) for split, tree in trees.items()}
    assert max(grouped.values()) <= dense + 25, (dense, grouped)
    assert branches["4-4-4"] > 1.5 * branches["2-2-2"] > 1.5 * grouped["2-2-2"], (branches, grouped)


def test_a_nan_in_one_branch_stays_in_it():
    """Padding channels are filled, not multiplied, with zeros: an inf in the trunk's channel 0, which one branch
    takes and the padding picks up before it is filled, leaves the other branches' logits finite, as in the tree."""
    model = randomised_wrn()
    tree = build_tree(model, model.split_plan, learned_spec(model, "4-4-4", "argmax")).eval()
    grouped = GroupedTree(tree, model.split_plan).eval()
    assert grouped.levels[0].padding is not None  # uneven groups below the dense trunk: some channels are filled
    for net in (tree, grouped):
        net.trunk.register_forward_hook(lambda module, inputs, out: out.index_fill(1, torch.tensor([0]), float("inf")))
    with torch.no_grad():
        images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        expected, actual = tree(images).isfinite(), grouped(images).isfinite()
    assert not expected.all() and expected.any()
    assert torch.equal(actual, expected)


def test_unpack_follows_the_grouped_trees_type_and_mode():
    model = randomised_wrn()
    grouped = GroupedTree(build_tree(model, model.split_plan, learned_spec(model, "2-2-2", "argmax")), model.split_plan)
    grouped.float().eval()
    unpacked = grouped.unpack()
    assert next(unpacked.parameters()).dtype == torch.float32 and not unpacked.training
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(unpacked(images), grouped(images))


def test_groups_too_uneven_to_pack_are_finetuned_branch_after_branch(caplog: pytest.LogCaptureFixture):
    module = _module(True)
    spec = learned_spec(module.net, "2-2-2", "argmax")
    spec = type(spec)(spec.groups, {key: [0] * (len(v) - 1) + [1] for key, v in spec.labels.items()})  # all but one
    padded = GroupedTree(build_tree(module.net, module.plan, spec), module.plan).padding_share()
    assert padded > MAX_PADDING_SHARE
    with caplog.at_level(logging.WARNING, logger="splitnet.module"):
        module.apply_split(spec)
    assert isinstance(module.net, SplitTree) and module.hparams.grouped_branches is False
    assert f"packing the branches would pad {100 * padded:.0f}% of their weights" in caplog.text


def _module(grouped_branches: object) -> SplitNetModule:
    split = TINY_SPLIT | {"assign": "balanced"}
    return SplitNetModule(TINY_BACKBONE, 10, split, SCHEDULE, grouped_branches=grouped_branches)


def test_module_finetunes_the_grouped_tree_and_counts_the_unpacked_one():
    module = _module(True)
    module.split()
    assert isinstance(module.net, GroupedTree)
    tree = module.unpacked_net()
    assert isinstance(tree, SplitTree)
    images = torch.randn(4, 3, 32, 32)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(images), tree.eval()(images), rtol=1e-5, atol=1e-6)


def test_grouped_branches_must_be_a_boolean():
    with pytest.raises(ConfigError, match="model.grouped_branches='maybe': must be true or false"):
        _module("maybe")


def test_a_checkpoint_goes_on_in_its_own_layout(smoke_run: Path, caplog: pytest.LogCaptureFixture):
    """A tree checkpointed grouped loads grouped although the run asks for branches (its optimiser state is so)."""
    checkpoint = smoke_run / "checkpoints" / "last.ckpt"
    with caplog.at_level(logging.WARNING, logger="splitnet.module"):
        model = SplitNetModule.load_from_checkpoint(checkpoint, map_location="cpu", grouped_branches=False)
    assert isinstance(model.net, GroupedTree)
    assert "the checkpoint's tree was finetuned grouped: it goes on grouped, whatever model.grouped_branches=false" \
        in caplog.text
