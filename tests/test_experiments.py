"""Experiments as users run them: Hydra sweeps collected by the report, wandb offline, pictures."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from splitnet.report import mean_over
from tests.conftest import ROOT, run_train

TINY = ("experiment=smoke", "data=synthetic", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "schedule.group.epochs=1", "schedule.finetune.epochs=1")


def test_sweep_runs_every_combination_and_the_report_collects_them(tmp_path: Path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "train.py", "-m", f"hydra.sweep.dir={sweep}", *TINY, "split=2-2-2,4-4-4", "seed=0,1"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [p.parent.name for p in sweep.rglob("summary.json")]  # each named by its overrides
    for combination in ("seed=0,split=2-2-2", "seed=0,split=4-4-4", "seed=1,split=2-2-2", "seed=1,split=4-4-4"):
        assert sum(combination in run for run in runs) == 1, (combination, runs)
    report = subprocess.run([sys.executable, "-m", "splitnet.report", str(sweep)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert len(rows) == 4
    assert {"split.groups", "seed", "params_M", "GFLOPs", "val_acc", "test_acc"} <= set(rows[0])
    assert "schedule.batch_size" not in rows[0]  # only values that vary between the runs
    by_split = {row["split.groups"]: float(row["params_M"]) for row in rows}
    assert by_split["4-4-4"] < by_split["2-2-2"]
    assert "split.groups" in report.stdout.splitlines()[0]
    assert {"params_cut_%", "flops_cut_%", "test_err_%", "fit_min"} <= set(rows[0])
    means = list(csv.DictReader((sweep / "report_mean.csv").open()))  # one row per split, over both seeds
    assert sorted((row["split.groups"], row["runs"]) for row in means) == [("2-2-2", "2"), ("4-4-4", "2")]


def test_mean_over_seeds_merges_only_runs_that_differ_in_the_seed():
    rows = [{"run": f"r{i}", "seed": seed, "split": split, "test_acc": acc, "test_err_%": round(100 * (1 - acc), 2)}
            for i, (seed, split, acc) in enumerate([(0, "2-2-2", 0.70), (1, "2-2-2", 0.74), (0, "4-4-4", 0.60)])]
    means = {row["split"]: row for row in mean_over(rows)}
    assert means["2-2-2"]["runs"] == 2 and means["2-2-2"]["test_acc"] == pytest.approx(0.72)
    assert means["2-2-2"]["test_err_%"] == pytest.approx(28.0) and means["2-2-2"]["test_err_spread"] == 2.0
    assert means["4-4-4"]["runs"] == 1 and means["4-4-4"]["test_err_spread"] == 0.0


def test_wandb_logs_offline_with_phases_summary_and_pictures(tmp_path: Path):
    # no progress bar: wandb records the console too, where the bar shows the step metrics' names
    run_train(tmp_path, *TINY, "logger=wandb", "trainer.log_every_n_steps=1", "~callbacks.progress_bar",
              "+trainer.enable_progress_bar=false")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    record = next(runs[0].glob("*.wandb")).read_bytes()
    for key in (b"group/train_loss", b"group/disjoint", b"finetune/val_acc", b"finetune/test_acc", b"dense_flops",
                b"gamma3", b"group_sizes/stage2:in"):
        assert key in record, key
    assert len(list((runs[0] / "files" / "media" / "images").rglob("*.png"))) == 3


def test_pictures_are_redrawn_from_a_run_directory(tmp_path: Path):
    run_train(tmp_path, *TINY)
    pictures = sorted(p.name for p in (tmp_path / "pictures").iterdir())
    assert pictures == ["assignments.png", "block_weights.png", "class_tree.png"]
    for picture in (tmp_path / "pictures").iterdir():
        picture.unlink()
    report = subprocess.run([sys.executable, "-m", "splitnet.report", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == pictures


def test_tensorboard_logger_and_a_progress_bar_that_names_the_phase(tmp_path: Path):
    # the bar shows the step values as of the last logging step: here every step
    result = run_train(tmp_path, *TINY, "logger=tensorboard", "trainer.log_every_n_steps=1")
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    output = result.stdout + result.stderr
    bars = output.replace("\r", "\n").splitlines()
    group_bars = [line for line in bars if line.startswith("group learning epoch 0")]
    finetune_bars = [line for line in bars if line.startswith("finetune epoch 1")]
    assert any("group/disjoint=" in line and "group/balance=" in line for line in group_bars)
    assert finetune_bars and not any("group/" in line for line in finetune_bars)
    assert re.search(r"split 2-2-2 at epoch 1: params 0\.175M -> 0\.0\d\dM; class groups \[5, 5\]", output)


def test_the_dense_baseline_trains_both_phases_without_a_split(tmp_path: Path):
    run_train(tmp_path, *TINY, "split=none")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["split"] == "1-1-1" and summary["params"] == summary["dense_params"]
    assert summary["tree_spec"]["labels"] == {} and summary["epochs"] == 2 and set(summary["test_acc"]) == {"group", "split", "finetune"}
