"""train.py end to end: all three phases in one run, summaries, checkpoints that load and resume, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from splitnet.data import SyntheticDataModule
from splitnet.module import SplitNetModule
from splitnet.phases import evaluate
from splitnet.report import count_params
from splitnet.tree import SplitTree
from tests.conftest import run_train

SMOKE = ("experiment=smoke", "data=synthetic", "callbacks.checkpoint.save_top_k=-1")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One smoke run on synthetic data (2 group + 2 finetune epochs), keeping every epoch's checkpoint."""
    run_dir = tmp_path_factory.mktemp("smoke")
    run_train(run_dir, *SMOKE)
    return run_dir


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def test_smoke_run_writes_a_summary_of_all_phases(smoke_run: Path):
    summary = read_summary(smoke_run)
    for key in ("backbone", "split", "params", "flops", "dense_params", "dense_flops", "class_groups",
                "group_sizes", "val_acc", "test_acc", "config"):
        assert key in summary, key
    assert summary["backbone"] == "wrn16_1" and summary["split"] == "2-2-2"
    assert summary["params"] < summary["dense_params"] and summary["flops"] < summary["dense_flops"]
    assert sorted(c for group in summary["class_groups"] for c in group) == list(range(10))
    assert len(summary["class_groups"]) == 2
    assert set(summary["val_acc"]) == set(summary["test_acc"]) == {"group", "split", "finetune"}
    assert summary["test_acc"]["finetune"] > 0.1 + 0.1  # well above chance (10 classes)
    assert summary["epochs"] == 4
    assert "stage2:in" in summary["group_sizes"] and sum(summary["group_sizes"]["stage2:in"]) == 16


def test_checkpoint_after_the_split_loads_in_a_fresh_process(smoke_run: Path):
    summary = read_summary(smoke_run)
    model = SplitNetModule.load_from_checkpoint(smoke_run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert isinstance(model.net, SplitTree)
    assert model.net.class_groups() == summary["class_groups"]
    assert count_params(model.net) == summary["params"]
    data = SyntheticDataModule(seed=0, eval_batch_size=250, val_size=250)
    data.setup()
    assert evaluate(model, data.test_dataloader(), data, max_batches=4) == pytest.approx(summary["test_acc"]["finetune"])


def test_group_phase_checkpoint_is_dense(smoke_run: Path):
    checkpoint = torch.load(smoke_run / "checkpoints" / "epoch001.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["splitnet"]["tree_spec"] is None
    assert any(key.startswith("grouping.logits") for key in checkpoint["state_dict"])


@pytest.mark.parametrize("epoch", ["002", "000"], ids=["mid-finetune", "before-split"])
def test_resumed_run_continues_where_it_stopped(smoke_run: Path, tmp_path: Path, epoch: str):
    """Resuming from a checkpoint after or before the split ends with bit-identical weights and the same tree."""
    resumed = tmp_path / "resumed"
    run_train(resumed, *SMOKE, f"ckpt_path={smoke_run / 'checkpoints' / f'epoch{epoch}.ckpt'}")
    expected, actual = final_state(smoke_run), final_state(resumed)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert read_summary(resumed)["class_groups"] == read_summary(smoke_run)["class_groups"]
    assert read_summary(resumed)["epochs"] == 4


def test_smoke_on_real_cifar100(cifar100_root: Path, tmp_path: Path):
    run_train(tmp_path, "experiment=smoke", "data=cifar100", f"data.root={cifar100_root}", "data.download=false")
    summary = read_summary(tmp_path)
    assert summary["params"] < summary["dense_params"] and summary["flops"] < summary["dense_flops"]
    assert len(summary["class_names"]) == 100 and summary["class_names"][0] == "apple"
    assert summary["test_acc"]["finetune"] > 0.02  # chance is 0.01


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("split.groups=4-2-2",), "group counts may not decrease going up (4 > 2)"),
        (("split.groups=2-3-6",), "2 does not divide 3"),
        (("split.groups=2-two-2",), "split.groups='2-two-2' is not a split string"),
        (("split.assign=nearest",), "split.assign='nearest' is not one of argmax, balanced, random"),
        (("split.groups=32-32-32",), "32 groups in grouping 'stage2:in', which has only 16 channels"),
        (("ckpt_path=/nonexistent/last.ckpt",), "ckpt_path=/nonexistent/last.ckpt: no checkpoint at"),
    ],
)
def test_bad_config_fails_with_its_message(tmp_path: Path, overrides: tuple[str, ...], message: str):
    result = run_train(tmp_path, "experiment=smoke", "data=synthetic", *overrides, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_cifar100_says_where_it_looked(tmp_path: Path):
    empty = tmp_path / "empty"
    result = run_train(tmp_path / "run", "experiment=smoke", f"data.root={empty}", "data.download=false", check=False)
    assert result.returncode != 0
    assert f"CIFAR-100 was not found in {empty / 'cifar-100-python'}" in result.stderr
    assert "set data.root" in result.stderr
