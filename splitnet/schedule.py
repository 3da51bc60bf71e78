"""Per-phase optimiser and learning-rate schedule: SGD with step, one-cycle or cosine decay, stepped per batch."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, MultiStepLR, OneCycleLR

from splitnet.errors import ConfigError, is_number, is_whole_number

LR_SCHEDULES = ("step", "onecycle", "cosine")
# how the assignments' gradient enters their SGD step: as it is (the paper), or rescaled to unit RMS per grouping
ASSIGNMENT_UPDATES = ("sgd", "unit_rms")


def build_optimizer(
    weights: Iterable[nn.Parameter], assignments: list[nn.Parameter], settings: Mapping[str, Any], steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """SGD over the network's weights (with weight decay) and the assignments (without), and its LR schedule.

    ``settings``: epochs, lr, momentum, nesterov, weight_decay, lr_schedule (step | onecycle | cosine),
    for ``step`` the epochs in ``milestones`` where the rate is multiplied by ``lr_decay``, and
    ``assignment_lr_scale``: the assignments' rate as a multiple of ``lr`` (default 1, as in the paper); with
    ``assignment_update: unit_rms`` the module rescales their gradients before each step, so this rate is then
    the RMS size of their steps in logits (before momentum).
    """
    scale = settings.get("assignment_lr_scale", 1.0)
    groups = [{"params": list(weights), "weight_decay": settings["weight_decay"], "lr": settings["lr"]}]
    if assignments:
        groups.append({"params": assignments, "weight_decay": 0.0, "lr": settings["lr"] * scale})
    optimizer = torch.optim.SGD(
        groups, lr=settings["lr"], momentum=settings["momentum"], nesterov=settings.get("nesterov", False)
    )
    total = max(1, settings["epochs"] * steps_per_epoch)
    kind = settings.get("lr_schedule", "step")
    if kind == "step":
        milestones = [epoch * steps_per_epoch for epoch in settings.get("milestones", [])]
        return optimizer, MultiStepLR(optimizer, milestones, gamma=settings.get("lr_decay", 0.1))
    if kind == "onecycle":
        # OneCycleLR needs a few steps per segment; a phase of fewer steps ends early in its cycle
        return optimizer, OneCycleLR(optimizer, max_lr=[g["lr"] for g in groups], total_steps=max(total + 1, 8),
                                     pct_start=0.25)
    if kind == "cosine":
        return optimizer, CosineAnnealingLR(optimizer, T_max=total)
    raise ConfigError(f"lr_schedule='{kind}' is not one of {', '.join(LR_SCHEDULES)}")


def check_schedule(schedule: Mapping[str, Any], phases: Iterable[str]) -> None:
    """Fail early, naming the key, on a phase's settings that ``build_optimizer`` could not use."""
    for phase in phases:
        settings = schedule[phase]
        kind = settings.get("lr_schedule", "step")
        if kind not in LR_SCHEDULES:
            raise ConfigError(f"schedule.{phase}.lr_schedule='{kind}' is not one of {', '.join(LR_SCHEDULES)}")
        if not is_whole_number(settings["epochs"]) or settings["epochs"] < 0:
            raise ConfigError(f"schedule.{phase}.epochs={settings['epochs']!r}: must be a whole number, 0 or more")
        for key, default, upper in (("lr", None, None), ("weight_decay", None, None), ("momentum", None, 1.0),
                                    ("dropout", 0.0, 1.0), ("lr_decay", 0.1, None)):
            value = settings.get(key, default)
            if not is_number(value) or not 0 <= value <= (math.inf if upper is None else upper):
                bounds = "0 or more" if upper is None else f"between 0 and {upper:g}"
                raise ConfigError(f"schedule.{phase}.{key}={value!r}: must be a number, {bounds}")
        if settings.get("nesterov", False) and not settings["momentum"] > 0:
            raise ConfigError(f"schedule.{phase}.nesterov=true needs momentum above 0 (momentum={settings['momentum']})")
        scale = settings.get("assignment_lr_scale", 1.0)
        if not scale > 0:
            raise ConfigError(f"schedule.{phase}.assignment_lr_scale={scale}: must be a positive number")
        update = settings.get("assignment_update", "sgd")
        if update not in ASSIGNMENT_UPDATES:
            raise ConfigError(f"schedule.{phase}.assignment_update='{update}' is not one of "
                              f"{', '.join(ASSIGNMENT_UPDATES)}")
        delay = settings.get("assignment_delay", 0)
        if not 0 <= delay < 1:
            raise ConfigError(f"schedule.{phase}.assignment_delay={delay}: must be a share of the phase's epochs, "
                              "at least 0 and below 1")
        commit = settings.get("assignment_commit")
        if settings.get("off_block_fade", False) and commit is None:
            raise ConfigError(f"schedule.{phase}.off_block_fade=true needs assignment_commit (a share of the phase's "
                              "epochs): the off-block weights fade from the commit on, towards its groups")
        if commit is not None and not delay < commit <= 1:
            raise ConfigError(f"schedule.{phase}.assignment_commit={commit}: must be a share of the phase's epochs, "
                              f"above assignment_delay={delay} and at most 1 (or null: never)")
        epochs = settings["epochs"]
        if commit is not None and epochs > 0 and round(commit * epochs) >= epochs:
            raise ConfigError(f"schedule.{phase}.assignment_commit={commit} falls on epoch {round(commit * epochs)} of "
                              f"a {epochs}-epoch phase, where the split comes: the assignments would never be committed; "
                              f"choose a share below {(epochs - 0.5) / epochs:.3f}")
