"""The benchmark runs on the CPU and reports every row against the dense network of the same run."""

import json

import pytest

from splitnet.bench import main


def test_bench_prints_and_writes_training_and_inference_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--device", "cpu", "--backbone", "wrn16_1", "--splits", "2-2-2,4-4-4", "--infer-batches", "8",
                 "--train-batches", "8", "--repeats", "1", "--settings", "eager,channels_last", "--epoch-steps", "3",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    inference = [r for r in rows if r["mode"] == "inference"]
    training = [r for r in rows if r["mode"] == "training"]
    assert {(r["split"], r["setting"]) for r in inference} == {
        (s, k) for s in ("dense", "2-2-2", "4-4-4") for k in ("eager", "channels_last")}
    assert max(r["vs_dense"] for r in inference if r["split"] == "dense") == 1.0
    assert {r["split"]: r["flop_ratio"] for r in inference}["4-4-4"] > {r["split"]: r["flop_ratio"] for r in inference}["2-2-2"] > 1
    assert {r["setting"] for r in training} == {"plain loop", "lightning", "lightning whole epoch", "lightning group learning",
                                                "lightning finetune"}
    assert [r["vs_dense"] for r in training if r["setting"] == "plain loop"] == [1.0]
    assert "img_per_s" in capsys.readouterr().out and result["device"]


@pytest.mark.parametrize("option, value", [("--settings", "eager,warp"), ("--train-settings", "jit")])
def test_bench_refuses_an_unknown_setting_by_name(option, value, capsys):
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--backbone", "wrn16_1", option, value])
    assert f"{option} {value.split(',')[-1]}: not one of" in capsys.readouterr().err
