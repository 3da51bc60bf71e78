"""The per-phase optimiser: the assignments' own learning rate under every LR schedule, and their delay."""

import pytest
import torch
from torch import nn

from splitnet.errors import ConfigError
from splitnet.module import SplitNetModule
from splitnet.schedule import build_optimizer, check_schedule

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


@pytest.mark.parametrize("delay, held", [(0.5, True), (0.0, False)])
def test_assignments_are_held_during_the_delay(delay: int, held: bool):
    schedule = {phase: SETTINGS | {"lr_schedule": "cosine", "assignment_delay": delay}
                for phase in ("group", "finetune")}
    module = SplitNetModule({"_target_": "splitnet.backbones.wide_resnet", "depth": 10, "width": 1}, 10,
                            {"groups": "2-2-2", "assign": "balanced", "gamma1": 1, "gamma2": 1, "gamma3": 10}, schedule)
    for alpha in module.grouping.parameters():
        alpha.grad = torch.ones_like(alpha)
    module.on_before_optimizer_step(torch.optim.SGD(module.parameters(), lr=0.1))  # epoch 0, no trainer
    assert all((alpha.grad is None) == held for alpha in module.grouping.parameters())
    assert all(p.grad is None for p in module.net.parameters())  # the network's own gradients are left alone


def test_a_delay_as_long_as_the_phase_is_refused():
    schedule = {phase: SETTINGS | {"lr_schedule": "cosine", "assignment_delay": 1.0} for phase in ("group", "finetune")}
    with pytest.raises(ConfigError, match="schedule.group.assignment_delay=1.0: must be a share of the phase's epochs"):
        check_schedule(schedule, ("group",))
