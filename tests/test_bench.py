"""The benchmark runs on the CPU and reports every row against the dense network of the same run."""

import json

import pytest

from splitnet.bench import main
from tests.conftest import SMOKE, run_train


def test_bench_prints_and_writes_training_and_inference_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--device", "cpu", "--backbone", "wrn16_1", "--splits", "2-2-2,4-4-4", "--infer-batches", "8",
                 "--train-batches", "8", "--repeats", "1", "--settings", "eager,channels_last", "--epoch-steps", "3",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    inference = [r for r in rows if r["mode"] == "inference"]
    training = [r for r in rows if r["mode"] == "training"]
    trees = ("2-2-2", "4-4-4", "2-2-2 grouped", "4-4-4 grouped")  # both layouts by default
    assert {(r["split"], r["setting"]) for r in inference} == {
        (s, k) for s in ("dense", *trees) for k in ("eager", "channels_last")}
    assert max(r["vs_dense"] for r in inference if r["split"] == "dense") == 1.0
    flop_ratio = {r["split"]: r["flop_ratio"] for r in inference}
    assert flop_ratio["4-4-4"] > flop_ratio["2-2-2"] > 1
    assert flop_ratio["2-2-2 grouped"] == flop_ratio["2-2-2"]  # balanced groups: nothing padded
    assert {r["setting"] for r in training} == {"plain loop", "lightning", "lightning whole epoch", "lightning group learning",
                                                "lightning finetune"}
    assert {r["split"] for r in training if r["setting"] == "lightning finetune"} == set(trees)
    assert [r["vs_dense"] for r in training if r["setting"] == "plain loop"] == [1.0]
    printed = capsys.readouterr().out
    assert "img_per_s" in printed and result["device"]
    assert printed.count("plain loop") == 2  # its table as it came, then once in all tables together


def test_bench_times_one_layout_alone(tmp_path):
    out = tmp_path / "grouped.json"
    assert main(["--device", "cpu", "--backbone", "wrn16_1", "--image-size", "8", "--splits", "2-2-2", "--layouts",
                 "grouped", "--skip-inference", "--train-batches", "2", "--repeats", "1", "--epoch-steps", "0",
                 "--json", str(out)]) == 0
    rows = {(r["split"], r["setting"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("dense", "plain loop"), ("dense", "lightning"), ("2-2-2", "lightning group learning"),
                         ("2-2-2 grouped", "lightning finetune")}
    ratios = (rows["2-2-2", "lightning group learning"]["flop_ratio"], rows["2-2-2 grouped", "lightning finetune"]["flop_ratio"])
    assert ratios[0] == ratios[1] > 1


@pytest.mark.parametrize("option, value", [("--settings", "eager,warp"), ("--train-settings", "jit"),
                                           ("--layouts", "branches,stacked")])
def test_bench_refuses_an_unknown_setting_by_name(option, value, capsys):
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--backbone", "wrn16_1", option, value])
    assert f"{option} {value.split(',')[-1]}: not one of" in capsys.readouterr().err


def test_bench_image_size_changes_the_images_and_refuses_a_bad_size(capsys):
    assert main(["--backbone", "wrn16_1", "--costs", "--splits", "2-2-2", "--image-size", "16"]) == 0
    printed = capsys.readouterr().out
    assert "16x16" in printed and "32x32" not in printed
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--backbone", "wrn16_1", "--image-size", "0"])
    assert "--image-size 0: must be a positive number of pixels" in capsys.readouterr().err


def test_bench_times_finished_runs_alone_against_the_dense_run(smoke_run, tmp_path, capsys):
    dense_run = tmp_path / "dense"
    run_train(dense_run, *SMOKE, "split=none", "trainer.limit_train_batches=2", "schedule.group.epochs=1",
              "schedule.finetune.epochs=1")
    out = tmp_path / "runs.json"
    assert main(["--device", "cpu", "--runs", str(dense_run), str(smoke_run), "--infer-batches", "4", "--repeats", "1",
                 "--settings", "eager,channels_last", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["run"], r["split"], r["setting"]) for r in rows} == {
        (run.name, split, setting) for run, split in ((dense_run, "1-1-1"), (smoke_run, "2-2-2"))
        for setting in ("eager", "channels_last")}
    assert max(r["vs_dense"] for r in rows if r["run"] == "dense") == 1.0
    tree = [r for r in rows if r["split"] == "2-2-2"]
    assert all(r["img_per_s"] > 0 and r["flop_ratio"] > 1 for r in tree)
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert tree[0]["flop_ratio"] == round(summary["dense_flops"] / summary["flops"], 3)


def test_bench_names_a_run_that_has_not_finished(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(SystemExit, match=f"--runs {tmp_path}: it has no summary.json, so it is not a finished run"):
        main(["--device", "cpu", "--runs", str(tmp_path)])


@pytest.mark.parametrize("option, value, rule", [
    ("--device", "bogus", "is not a device: cpu, cuda or cuda:<index>"),
    ("--repeats", "0", "is not a positive integer"),
    ("--epoch-steps", "-3", "is not a non-negative integer"),
    ("--infer-batches", "8,0", "is not a comma list of positive integers"),
    ("--train-batches", "-2", "is not a comma list of positive integers")])
def test_bench_refuses_a_bad_number_or_device_in_one_line(option, value, rule, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["--backbone", "wrn16_1", "--device", "cpu", option, value])
    assert raised.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: argument {option}: '{value}' {rule}")


def test_bench_refuses_cuda_on_a_machine_without_it(monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["--backbone", "wrn16_1", "--device", "cuda"])
    assert "argument --device: 'cuda': this machine has no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("split, rule", [("3-2-2", "group counts may not decrease"),
                                         ("32-32-32", "split asks for 32 groups")])
def test_bench_refuses_a_bad_split_in_one_line_before_timing_anything(split, rule, capsys):
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--backbone", "wrn16_1", "--splits", f"2-2-2,{split}"])
    captured = capsys.readouterr()
    assert not captured.out and "Traceback" not in captured.err
    assert f"error: --splits {split} (wrn16_1): " in captured.err and rule in captured.err


def test_bench_costs_name_the_dense_row_dense(capsys):
    assert main(["--backbone", "wrn16_1", "--costs", "--splits", "2-2-2"]) == 0
    splits = [line.split()[2] for line in capsys.readouterr().out.splitlines()[1:]]
    assert splits == ["dense", "2-2-2"]
