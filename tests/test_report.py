"""``python -m splitnet.report``: summaries it cannot read are named in one line; the table compares only the config
values that tell runs apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitnet.report import main, mean_over, sweep_rows, unrecorded_keys


def write_run(run_dir: Path, seed: int = 0, **config) -> Path:
    """A finished run's summary.json (made up, as train.py writes it) with ``config`` over a small default one."""
    run_dir.mkdir(parents=True)
    summary = {"backbone": "wrn16_1", "split": "2-2-2", "params": 100, "dense_params": 200, "flops": 10,
               "dense_flops": 20, "val_acc": {"finetune": 0.5}, "test_acc": {"finetune": 0.4 + seed / 100},
               "config": {"seed": seed, "split": {"groups": "2-2-2"}, "data": {"root": "data", "num_workers": 4},
                          "ckpt_path": None} | config}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.mark.parametrize("text, problem", [("{", "not valid JSON"), ("[]", "not a JSON object"),
                                           ('{"split": "2-2-2"}', "has no params, dense_params, flops")])
def test_a_summary_that_cannot_be_read_is_named_in_one_line(text, problem, tmp_path: Path):
    write_run(tmp_path / "good")
    bad = tmp_path / "bad" / "summary.json"
    bad.parent.mkdir()
    bad.write_text(text)
    with pytest.raises(SystemExit) as raised:
        main([str(tmp_path)])
    assert str(raised.value).startswith(f"error: {bad}: {problem}") and "\n" not in str(raised.value)


def test_a_run_without_a_split_record_says_that_it_redraws_nothing(tmp_path: Path, capsys):
    assert main([str(write_run(tmp_path / "run"))]) == 0
    assert f"no pictures redrawn: {tmp_path / 'run'} has no split_record.pt" in capsys.readouterr().out


def test_resuming_and_paths_devices_and_logger_do_not_tell_runs_apart(tmp_path: Path):
    assert {"ckpt_path", "data.root", "data.num_workers", "logger", "trainer.devices"} <= set(unrecorded_keys())
    write_run(tmp_path / "seed0", 0, trainer={"devices": 1, "max_epochs": 3})
    write_run(tmp_path / "seed1", 1, ckpt_path="last", data={"root": "/elsewhere", "num_workers": 0},
              logger={"csv": {"_target_": "CSVLogger"}}, trainer={"devices": 2, "max_epochs": 3})
    write_run(tmp_path / "split444", 0, split={"groups": "4-4-4"}, trainer={"devices": 1, "max_epochs": 3})
    rows = sweep_rows(tmp_path)
    assert list(rows[0])[:4] == ["run", "seed", "split.groups", "split"]  # the config columns between run and split
    means = {row["split.groups"]: row["runs"] for row in mean_over(rows)}
    assert means == {"2-2-2": 2, "4-4-4": 1}  # the resumed seed-1 run joins seed 0
