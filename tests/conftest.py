"""Shared fixtures: running train.py in a subprocess, the real CIFAR-100 when the shared copy is present, and a
recorder of the operations torch dispatches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR100 = ROOT.parent / "shared" / "data" / "cifar100" / "unpack.sh"
SMOKE = ("experiment=smoke", "data=synthetic", "callbacks.checkpoint.save_top_k=-1")


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
