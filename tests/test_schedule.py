"""The per-phase optimiser: the assignments' own learning rate under every LR schedule, their delay and their commit."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from splitnet.errors import ConfigError
from splitnet.grouping import RegulariserTerms
from splitnet.module import SplitNetModule
from splitnet.schedule import build_optimizer, check_schedule
from splitnet.surgery import assign_balanced
from tests.conftest import TINY_BACKBONE, TINY_SPLIT

SETTINGS = {"epochs": 2, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "milestones": [1], "lr_decay": 0.1}


@pytest.mark.parametrize("lr_schedule", ["step", "onecycle", "cosine"])
def test_assignments_learn_at_their_scaled_rate(lr_schedule: str):
    weights, assignments = nn.Linear(3, 3).parameters(), [nn.Parameter(torch.zeros(2, 5))]
    settings = SETTINGS | {"lr_schedule": lr_schedule, "assignment_lr_scale": 20.0}
    optimizer, scheduler = build_optimizer(weights, assignments, settings, steps_per_epoch=10)
    network, grouping = optimizer.param_groups
    assert (network["weight_decay"], grouping["weight_decay"]) == (5e-4, 0.0)  # no decay pulling them to uniform
    for _ in range(12):
        assert grouping["lr"] == pytest.approx(20.0 * network["lr"])
        optimizer.step()
        scheduler.step()


def test_without_a_scale_the_assignments_follow_the_network():
    optimizer, _ = build_optimizer(nn.Linear(3, 3).parameters(), [nn.Parameter(torch.zeros(2, 5))],
                                   SETTINGS | {"lr_schedule": "onecycle"}, steps_per_epoch=10)
    assert optimizer.param_groups[0]["lr"] == optimizer.param_groups[1]["lr"]


def small_module(assign: str = "argmax", **group_settings) -> SplitNetModule:
    schedule = {phase: SETTINGS | {"lr_schedule": "cosine"} for phase in ("group", "finetune")}
    schedule["group"] |= group_settings
    return SplitNetModule(TINY_BACKBONE, 10, TINY_SPLIT | {"assign": assign}, schedule)


def assignments_held(module: SplitNetModule) -> list[bool]:
    """Which assignments ``on_before_optimizer_step`` holds still (drops their gradients)."""
    for alpha in module.grouping.parameters():
        alpha.grad = torch.ones_like(alpha)
    module.on_before_optimizer_step(torch.optim.SGD(module.parameters(), lr=0.1))
    assert all(p.grad is None for p in module.net.parameters())  # the network's own gradients are left alone
    return [alpha.grad is None for alpha in module.grouping.parameters()]


@pytest.mark.parametrize("delay, held", [(0.5, True), (0.0, False)])
def test_assignments_are_held_during_the_delay(delay: float, held: bool):
    assert set(assignments_held(small_module(assignment_delay=delay))) == {held}  # epoch 0, no trainer


def test_commit_hardens_the_assignments_to_balanced_groups_and_holds_them():
    module = small_module(epochs=4, assignment_commit=0.5)  # hardened from group epoch 2 on
    soft = {key: torch.softmax(alpha.detach(), 0) for key, alpha in module.grouping.logits.items()}
    for epoch, held in ((1, False), (2, True), (3, True)):
        module._trainer = SimpleNamespace(current_epoch=epoch, global_rank=0)
        module.on_train_epoch_start()
        assert set(assignments_held(module)) == {held}
    hard = module.grouping.probabilities()
    for key, q in hard.items():
        assert q.max(0).values.min() > 0.999
        assert torch.equal(q.argmax(0), assign_balanced(soft[key]))  # the groups the soft assignment was closest to
    spec = module.split()  # argmax of the committed assignments: the balanced groups
    assert all(len(set(torch.bincount(torch.tensor(labels)).tolist())) == 1 for labels in spec.labels.values())


def test_commit_leaves_the_disjoint_term_out():
    terms = RegulariserTerms(torch.tensor(0.5), torch.tensor(2.0), torch.tensor(1.5))
    assert small_module().regularisation(terms).item() == pytest.approx(0.5 + 2.0 + 15.0)
    assert small_module(assignment_commit=0.5).regularisation(terms).item() == pytest.approx(2.0 + 15.0)


def test_a_delay_as_long_as_the_phase_is_refused():
    schedule = {phase: SETTINGS | {"lr_schedule": "cosine", "assignment_delay": 1.0} for phase in ("group", "finetune")}
    with pytest.raises(ConfigError, match="schedule.group.assignment_delay=1.0: must be a share of the phase's epochs"):
        check_schedule(schedule, ("group",))


@pytest.mark.parametrize("commit", [0.25, 1.5])
def test_a_commit_outside_the_delay_and_the_phase_is_refused(commit: float):
    schedule = {phase: SETTINGS | {"assignment_delay": 0.25, "assignment_commit": commit} for phase in ("group",)}
    with pytest.raises(ConfigError, match=f"schedule.group.assignment_commit={commit}: must be a share"):
        check_schedule(schedule, ("group",))


@pytest.mark.parametrize("commit, epochs", [(1.0, 15), (0.97, 15), (0.9, 4)])
def test_a_commit_that_falls_on_the_split_is_refused(commit: float, epochs: int):
    """The split comes at the start of the epoch after the group phase: a commit rounding to it would never happen (yet
    would still leave the disjoint term out)."""
    schedule = {"group": SETTINGS | {"epochs": epochs, "assignment_commit": commit}}
    with pytest.raises(ConfigError, match=rf"schedule.group.assignment_commit={commit} falls on epoch {epochs} of a "
                                          rf"{epochs}-epoch phase, where the split comes"):
        check_schedule(schedule, ("group",))


@pytest.mark.parametrize("commit, epochs", [(0.96, 15), (0.7, 0)])
def test_a_commit_before_the_split_or_a_phase_of_no_epochs_is_accepted(commit: float, epochs: int):
    check_schedule({"group": SETTINGS | {"epochs": epochs, "assignment_commit": commit}}, ("group",))


def test_max_steps_ends_the_run_early_without_squeezing_the_lr_schedule():
    """The schedule spans the phase's epochs of batches whatever ``trainer.max_steps`` (3 here) cuts off."""
    module = small_module(epochs=4)
    module._trainer = SimpleNamespace(estimated_stepping_batches=3, num_training_batches=5, accumulate_grad_batches=2,
                                      max_epochs=8)
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert scheduler.T_max == 4 * 3  # cosine over 4 epochs of ceil(5 / 2) steps


@pytest.mark.parametrize("update", ["sgd", "unit_rms"])
def test_unit_rms_rescales_each_assignment_gradient_between_delay_and_commit(update: str):
    module = small_module(assignment_update=update)
    gradients = []
    for alpha in module.grouping.parameters():
        alpha.grad = 1e-6 * torch.randn_like(alpha)
        gradients.append(alpha.grad.clone())
    module.on_before_optimizer_step(torch.optim.SGD(module.parameters(), lr=0.1))
    for alpha, gradient in zip(module.grouping.parameters(), gradients, strict=True):
        expected = gradient / gradient.square().mean().sqrt() if update == "unit_rms" else gradient
        torch.testing.assert_close(alpha.grad, expected)


def test_an_unknown_assignment_update_is_refused():
    schedule = {"group": SETTINGS | {"assignment_update": "adam"}}
    with pytest.raises(ConfigError, match="schedule.group.assignment_update='adam' is not one of sgd, unit_rms"):
        check_schedule(schedule, ("group",))


def off_block_norms(module: SplitNetModule, masks: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The split layers' weights off and on their diagonal blocks (``masks``: 1 off them), as one norm per layer."""
    off, on = [], []
    for name, mask in masks.items():
        weight = module.net.get_submodule(name).weight.detach()
        off.append((weight * mask).norm())
        on.append((weight * (1 - mask)).norm())
    return torch.stack(off), torch.stack(on)


@pytest.mark.parametrize("assign", ["argmax", "random"])
def test_off_block_fade_empties_the_off_blocks_by_the_split_so_that_the_cut_changes_nothing(assign: str):
    module = small_module(assign, epochs=4, assignment_commit=0.5, off_block_fade=True)  # fades over epochs 2 and 3
    module.net.eval()
    images = torch.randn(6, 3, 32, 32)
    before_fade = module.net(images)
    steps, done = 2 * 3, 0
    for epoch in (2, 3):
        module._trainer = SimpleNamespace(current_epoch=epoch, global_rank=0, num_training_batches=3)
        module.on_train_epoch_start()
        if done == 0:
            start_off, start_on = off_block_norms(module, module._off_block_masks)
            assert start_off.min() > 0
        for batch in range(3):
            module.on_train_batch_end(None, None, batch)
            done += 1
            off, on = off_block_norms(module, module._off_block_masks)
            torch.testing.assert_close(off, start_off * (steps - done) / steps)  # linear, with no other updates
            torch.testing.assert_close(on, start_on, rtol=0, atol=0)  # the diagonal blocks are left alone
    assert off.max() == 0
    dense = module.net(images)
    assert (dense - before_fade).abs().max() > 1e-3  # the fade did change the dense network
    module.split()  # the groups of split.assign (random: the seed's), which the fade followed
    module.net.eval()
    torch.testing.assert_close(module.net(images), dense, rtol=1e-5, atol=1e-5)


def test_a_fade_without_a_commit_is_refused():
    with pytest.raises(ConfigError, match="schedule.group.off_block_fade=true needs assignment_commit"):
        check_schedule({"group": SETTINGS | {"off_block_fade": True}}, ("group",))


def dropout_by_part(net: nn.Module) -> dict[str, set[float]]:
    """The dropout probabilities in each top-level part of a network (trunk, stage2, branches, ...)."""
    parts: dict[str, set[float]] = {}
    for name, module in net.named_modules():
        if isinstance(module, nn.Dropout):
            parts.setdefault(name.split(".")[0], set()).add(module.p)
    return parts


def test_a_phases_dropout_goes_to_the_split_levels_not_the_trunk():
    """method.md: dropout in the split blocks and before the classifier; the trunk (WRN's stage 1) is never split."""
    module = small_module(dropout=0.5)
    module.hparams.schedule["finetune"]["dropout"] = 0.25
    assert dropout_by_part(module.net) == {"stage1": {0.0}, "stage2": {0.5}, "stage3": {0.5}, "head": {0.5}}
    module.split()
    assert dropout_by_part(module.unpacked_net()) == {"trunk": {0.0}, "branches": {0.25}}
