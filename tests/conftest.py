"""Shared fixtures: running train.py in a subprocess, the real CIFAR-100 when the shared copy is present, random
networks and uneven learned groups to split them by, and a recorder of the operations torch dispatches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from splitnet.backbones import wide_resnet
from splitnet.grouping import GroupAssignments
from splitnet.plan import parse_groups
from splitnet.surgery import TreeSpec, hard_assign

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR100 = ROOT.parent / "shared" / "data" / "cifar100" / "unpack.sh"
# dropout on in both phases, so that a resumed run must draw the masks an uninterrupted one draws
SMOKE = ("experiment=smoke", "data=synthetic", "callbacks.checkpoint.save_top_k=-1", "schedule.group.dropout=0.2",
         "schedule.finetune.dropout=0.2")
# the tiny SplitNetModule of the unit tests: WRN-10-1, split 2-2-2
TINY_BACKBONE = {"_target_": "splitnet.backbones.wide_resnet", "depth": 10, "width": 1}
TINY_SPLIT = {"groups": "2-2-2", "gamma1": 1.0, "gamma2": 1.0, "gamma3": 10.0}


def run_train(run_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python train.py`` with Hydra overrides in ``run_dir``; fails the test on a non-zero exit if ``check``."""
    command = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="session")
def cifar100_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real CIFAR-100 unpacked from the shared copy beside the checkout; skips where that copy is absent."""
    if not SHARED_CIFAR100.is_file():
        pytest.skip("the shared CIFAR-100 copy (../shared/data/cifar100 beside the checkout) is absent on this machine")
    root = tmp_path_factory.mktemp("cifar100")
    subprocess.run(["bash", str(SHARED_CIFAR100), str(root)], check=True, capture_output=True)
    return root


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One smoke run on synthetic data (2 group + 2 finetune epochs), keeping every epoch's checkpoint."""
    run_dir = tmp_path_factory.mktemp("smoke")
    run_train(run_dir, *SMOKE)
    return run_dir


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


class DispatchedOperations(TorchDispatchMode):
    """The name of every operation torch dispatches inside it (on a GPU, each that computes is a kernel launch, and
    those that read values on the host wait for the device)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def randomised_wrn(width: int = 2, num_classes: int = 16) -> nn.Module:
    """A float64 WRN-16 in eval mode with random BatchNorm statistics, so every layer matters."""
    torch.manual_seed(0)
    model = wide_resnet(16, width, num_classes=num_classes).double()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    return model.eval()


def learned_spec(model: nn.Module, split: str, method: str) -> TreeSpec:
    """Hard groups of ``split`` for ``model`` by ``method``, from soft assignments leaning to uneven random groups."""
    plan = model.split_plan
    groups = parse_groups(split, plan)
    assignments = GroupAssignments(plan, groups, model)
    with torch.no_grad():
        for alpha in assignments.logits.values():
            count, size = alpha.shape
            uneven = torch.randint(0, count, (size,))
            uneven[torch.randperm(size)[:count]] = torch.arange(count)  # no group empty, sizes uneven
            alpha.normal_(0, 0.5).add_(3 * nn.functional.one_hot(uneven, count).T)
    return hard_assign(groups, assignments.probabilities(), method, seed=1)
