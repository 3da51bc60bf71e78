"""Branch-parallel inference and per-part export compute exactly what the tree computes; the speed model's table."""

import json
from pathlib import Path

import pytest
import torch

from splitnet.backbones import wide_resnet
from splitnet.grouped import GroupedTree
from splitnet.parallel import (BranchParallel, ExportedTree, OnnxTree, PartTimes, balanced_placement, export_parts,
                               parallel_units, predict_speedup)
from splitnet.parallel import main as parallel_main
from splitnet.plan import parse_groups
from splitnet.surgery import build_tree, hard_assign
from tests.conftest import learned_spec


def make_tree(split: str, method: str = "random"):
    torch.manual_seed(0)
    model = wide_resnet(16, 2, num_classes=16).eval()
    groups = parse_groups(split, model.split_plan)
    free = model.split_plan.free_groupings(model, groups)
    probs = {key: torch.rand(count, size) for key, (count, size) in free.items()}
    return build_tree(model, model.split_plan, hard_assign(groups, probs, method, seed=3)).eval()


@pytest.mark.parametrize("trunk", ["first", "split"])
@pytest.mark.parametrize("split, devices", [("2-2-2", 2), ("4-4-4", 2), ("4-4-4", 3), ("1-2-4", 2), ("1-1-2", 2),
                                            ("2-4-8", 4)])
def test_branch_parallel_equals_the_tree(split, devices, trunk):
    tree = make_tree(split)
    parallel = BranchParallel(tree, ["cpu"] * devices, (3, 32, 32), trunk=trunk)
    images = torch.randn(5, 3, 32, 32)  # split trunk: slices of 3 and 2, of 2, 2 and 1, ...
    with torch.no_grad():
        torch.testing.assert_close(parallel(images), tree(images), rtol=0, atol=1e-6)
    assert set(parallel.placement.devices) == set(range(devices))  # every device gets work
    assert len(parallel.replicas) == (devices if trunk == "split" else 1)


def test_a_grouped_tree_runs_in_parallel_as_its_branches():
    model = wide_resnet(16, 2, num_classes=16).eval()
    tree = build_tree(model, model.split_plan, learned_spec(model, "1-2-4", "argmax")).eval()  # uneven groups
    grouped = GroupedTree(tree, model.split_plan).eval()
    parallel = BranchParallel(grouped, ["cpu"] * 2, (3, 32, 32))
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(parallel(images), tree(images), rtol=0, atol=1e-6)


def test_split_trunk_with_fewer_images_than_devices():
    tree = make_tree("4-4-4")
    parallel = BranchParallel(tree, ["cpu"] * 4, (3, 32, 32), trunk="split")
    images = torch.randn(3, 3, 32, 32)  # one device gets an empty slice
    with torch.no_grad():
        torch.testing.assert_close(parallel(images), tree(images), rtol=0, atol=1e-6)


def test_unknown_trunk_mode_is_named():
    with pytest.raises(ValueError, match="trunk='both': not one of first, split"):
        BranchParallel(make_tree("2-2-2"), ["cpu"] * 2, (3, 32, 32), trunk="both")


def test_units_run_in_their_threads_under_the_callers_autocast_and_without_grad():
    tree = make_tree("2-2-2")
    parallel = BranchParallel(tree, ["cpu"] * 2, (3, 32, 32))
    modes = []
    for unit in parallel.units:
        unit.register_forward_hook(lambda *_: modes.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"))))
    images = torch.randn(5, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = parallel(images)
        with torch.no_grad():
            expected = tree(images)
    assert modes == [(False, True), (False, True)]
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (one GPU, a stream per branch)")
def test_branch_parallel_on_one_gpu_with_streams_equals_the_tree():
    tree = make_tree("4-4-4").cuda()
    parallel = BranchParallel(tree, ["cuda"] * 4, (3, 32, 32))
    images = torch.randn(64, 3, 32, 32, device="cuda")
    with torch.no_grad():
        expected = tree(images)
    split_trunk = BranchParallel(tree, ["cuda"] * 4, (3, 32, 32), trunk="split")
    for _ in range(3):  # the streams' work is waited for before the logits are gathered, every time
        torch.testing.assert_close(parallel(images), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(split_trunk(images), expected, rtol=1e-5, atol=1e-5)


def test_speed_model_table(tmp_path: Path):
    out = tmp_path / "parallel.json"
    assert parallel_main(["--device", "cpu", "--backbone", "wrn16_1", "--splits", "2-2-2,1-2-4", "--batch", "4",
                          "--devices", "2,4", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["split"], r["devices"], r["units"]) for r in rows] == [("2-2-2", 2, 2), ("2-2-2", 4, 2), ("1-2-4", 2, 2),
                                                                     ("1-2-4", 4, 4)]
    for row in rows:
        assert len(row["unit_ms"].split()) == row["units"] and row["moved_MB"] > 0
        assert row["predicted_no_transfer"] >= row["predicted"] > 0 and row["predicted_split_trunk"] > 0
        assert row["one_device_streams"] > 0 and row["one_device_streams_split_trunk"] > 0


def test_hierarchical_trees_are_distributed_below_the_shared_levels():
    tree = make_tree("1-2-4")
    assert parallel_units(tree, 2) == [[0, 0], [0, 1]]  # stage 2 is one group: shared, stage 3 subtrees spread
    assert parallel_units(tree, 4) == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]


def test_more_devices_than_branches_keep_whole_branches_apart():
    assert parallel_units(make_tree("2-2-2"), 4) == [[0], [1]]  # not their classifiers, with the rest shared
    assert parallel_units(make_tree("1-1-2"), 2) == [[0, 0, 0], [0, 0, 1]]  # the first fan-out is at the classifier


def test_balanced_placement_evens_the_load():
    assert balanced_placement([5, 4, 3, 3, 3], 2) == [0, 1, 1, 0, 1]  # largest first: loads 8 and 10
    assert sorted(balanced_placement([1.0] * 8, 4)) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_speed_model():
    times = PartTimes(shared=1.0, units=[2.0, 2.0, 2.0, 2.0], input_bytes=[100] * 4)
    assert predict_speedup(times, [0, 0, 0, 0], 1, bandwidth=1e9) == pytest.approx(1.0)
    assert predict_speedup(times, [0, 1, 0, 1], 2, bandwidth=float("inf")) == pytest.approx(9 / 5)
    assert predict_speedup(times, [0, 1, 2, 3], 4, bandwidth=100.0) == pytest.approx(9 / 4)  # 1 s per transfer
    # the shared part split four ways (0.25 s), each unit's input arriving three quarters from elsewhere (0.75 s)
    assert predict_speedup(times, [0, 1, 2, 3], 4, bandwidth=100.0, trunk="split") == pytest.approx(9 / 3)
    assert predict_speedup(times, [0, 1, 2, 3], 4, bandwidth=float("inf"), trunk="split") == pytest.approx(9 / 2.25)


@pytest.mark.parametrize("split, onnx", [("2-2-2", True), ("1-2-4", False)])
def test_exported_parts_reload_equal(split, onnx, tmp_path: Path):
    tree = make_tree(split, "argmax" if split == "2-2-2" else "balanced")
    export_parts(tree, torch.randn(1, 3, 32, 32), tmp_path, onnx=onnx)  # exported from one image ...
    parts = ["trunk", *(f"branch{i}" for i in range(len(tree.branches)))]
    suffixes = [".pt2", ".onnx"] if onnx else [".pt2"]
    assert {p.name for p in tmp_path.iterdir()} == {"manifest.json", *(n + s for n in parts for s in suffixes)}
    images = torch.randn(5, 3, 32, 32)  # ... run on a batch of another size
    with torch.no_grad():
        expected = tree(images)
        torch.testing.assert_close(ExportedTree(tmp_path)(images), expected, rtol=1e-5, atol=1e-6)
        # the trunk part hands each branch only that branch's channels
        branch_inputs = torch.export.load(tmp_path / "trunk.pt2").module()(images)
        features = tree.trunk(images)
        for inputs, branch in zip(branch_inputs, tree.branches, strict=True):
            own = features if branch.in_index is None else features[:, branch.in_index]
            torch.testing.assert_close(inputs, own)
    if onnx:
        logits = OnnxTree(tmp_path, providers=["CPUExecutionProvider"])(images.numpy())
        torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-5)


def test_loading_a_directory_without_a_manifest_names_it(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="not a directory written by export_parts"):
        ExportedTree(tmp_path)


def test_loading_an_export_of_an_older_format_asks_for_a_new_one(tmp_path: Path):
    (tmp_path / "manifest.json").write_text(json.dumps({"branches": 2, "class_index": [0, 1]}))
    with pytest.raises(ValueError, match="exported in format 1, this version reads format 2 .*: export it again"):
        ExportedTree(tmp_path)


@pytest.mark.parametrize("option, value, rule", [
    ("--devices", "0", "is not a comma list of positive integers"), ("--devices", "2,-1", "is not a comma list"),
    ("--bandwidth", "0", "is not a positive number"), ("--bandwidth", "-1", "is not a positive number"),
    ("--batch", "0", "is not a positive integer"), ("--device", "bogus", "is not a device")])
def test_speed_model_refuses_a_bad_option_in_one_line(option, value, rule, capsys):
    with pytest.raises(SystemExit) as raised:
        parallel_main(["--device", "cpu", "--backbone", "wrn16_1", option, value])
    assert raised.value.code == 2
    assert f"error: argument {option}: '{value}' {rule}" in capsys.readouterr().err


def test_speed_model_refuses_a_bad_split_in_one_line(capsys):
    with pytest.raises(SystemExit):
        parallel_main(["--device", "cpu", "--backbone", "wrn16_1", "--splits", "2-2"])
    assert "error: --splits 2-2 (wrn16_1): split.groups='2-2' gives 2 group counts" in capsys.readouterr().err


def test_branch_parallel_needs_a_device():
    with pytest.raises(ValueError, match=r"devices=\[\]: BranchParallel needs at least one device"):
        BranchParallel(make_tree("2-2-2"), [], (3, 32, 32))


def test_a_dense_network_is_refused_as_not_split(tmp_path: Path):
    dense = wide_resnet(16, 2, num_classes=16).eval()  # e.g. unpacked_net() of a group-learning checkpoint
    with pytest.raises(TypeError, match="BranchParallel needs a split tree, and WideResNet is a dense network"):
        BranchParallel(dense, ["cpu"] * 2, (3, 32, 32))
    with pytest.raises(TypeError, match="export_parts needs a split tree"):
        export_parts(dense, torch.randn(1, 3, 32, 32), tmp_path / "parts")
    assert not (tmp_path / "parts").exists()
