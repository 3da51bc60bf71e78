"""The per-phase optimiser: the assignments' own learning rate under every LR schedule."""

import pytest
import torch
from torch import nn

from splitnet.schedule import build_optimizer

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
