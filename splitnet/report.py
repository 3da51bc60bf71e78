"""Run summaries: parameter and FLOP counts, summary.json, and the table printed at the end of a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, image_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass on one image (2 per multiply-add), counted by torch.utils.flop_counter."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    image = torch.zeros(1, *image_shape, device=param.device, dtype=param.dtype)
    with FlopCounterMode(display=False) as counter:
        model(image)
    model.train(was_training)
    return counter.get_total_flops()


def format_table(summary: dict[str, Any]) -> str:
    """A short text table of a run: size, cost and accuracy after each phase."""
    lines = [
        f"backbone {summary['backbone']}  split {summary['split']}",
        f"{'':10}{'params':>12}{'GFLOPs':>10}",
        f"{'dense':10}{summary['dense_params'] / 1e6:>11.3f}M{summary['dense_flops'] / 1e9:>10.3f}",
        f"{'split':10}{summary['params'] / 1e6:>11.3f}M{summary['flops'] / 1e9:>10.3f}",
        f"{'phase':10}{'val acc':>12}{'test acc':>10}",
    ]
    nan = float("nan")
    for phase in summary["val_acc"]:
        val, test = summary["val_acc"].get(phase, nan), summary["test_acc"].get(phase, nan)
        lines.append(f"{phase:10}{val:>12.4f}{test:>10.4f}")
    return "\n".join(lines)


def write_summary(summary: dict[str, Any], run_dir: str | Path) -> Path:
    path = Path(run_dir) / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    return path
