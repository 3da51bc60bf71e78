"""train.py end to end: all three phases in one run, summaries, checkpoints that load and resume, clear errors."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from splitnet.backbones import resnet18, resnet50
from splitnet.data import SyntheticDataModule
from splitnet.errors import ConfigError
from splitnet.grouped import GroupedTree
from splitnet.module import SplitNetModule
from splitnet.phases import evaluate
from splitnet.report import count_params
from splitnet.surgery import TreeSpec, block_masks
from splitnet.tree import SplitTree
from tests.conftest import ROOT, SMOKE, final_state, read_summary, run_train



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
    assert summary["tree_layout"] == "grouped"  # model.grouped_branches, on by default


def test_checkpoint_after_the_split_loads_in_a_fresh_process(smoke_run: Path):
    summary = read_summary(smoke_run)
    model = SplitNetModule.load_from_checkpoint(smoke_run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert isinstance(model.net, GroupedTree)  # model.grouped_branches, on by default
    tree = model.unpacked_net()
    assert isinstance(tree, SplitTree) and model.net.class_groups() == tree.class_groups() == summary["class_groups"]
    assert count_params(tree) == summary["params"]
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


def test_run_killed_mid_finetune_resumes_with_the_same_command(smoke_run: Path, tmp_path: Path):
    """SIGKILL during finetuning, then the same command plus ckpt_path=last: same tree, same weights, nothing lost."""
    run_dir = tmp_path / "crashed"
    command = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *SMOKE]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    first_finetune_epoch = run_dir / "checkpoints" / "epoch002.ckpt"
    deadline = time.monotonic() + 600
    while not first_finetune_epoch.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # let last.ckpt follow; we are now inside the second finetune epoch
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run_dir / "summary.json").exists()

    def digests() -> dict[str, str]:
        files = [*(run_dir / "checkpoints").glob("epoch00[0-2].ckpt"), *(run_dir / "csv").rglob("*.csv")]
        return {str(f.relative_to(run_dir)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}

    before = digests()
    refused = run_train(run_dir, *SMOKE, check=False)  # the same command alone must not start over
    assert refused.returncode != 0 and "ckpt_path=last" in refused.stderr
    run_train(run_dir, *SMOKE, "ckpt_path=last")
    after = digests()
    assert {k: after.get(k) for k in before} == before  # nothing written before the crash was lost or changed
    expected, actual = final_state(smoke_run), final_state(run_dir)
    assert all(torch.equal(expected[k], actual[k]) for k in expected) and expected.keys() == actual.keys()
    assert read_summary(run_dir)["class_groups"] == read_summary(smoke_run)["class_groups"]
    timer_states = torch.load(first_finetune_epoch, weights_only=False)["callbacks"]
    before_crash = next(v for k, v in timer_states.items() if k.startswith("Timer"))["time_elapsed"]["train"]
    assert read_summary(run_dir)["fit_time_s"] > before_crash  # the fit time goes on from the checkpoint's


def test_smoke_on_real_cifar100(cifar100_root: Path, tmp_path: Path):
    run_train(tmp_path, "experiment=smoke", "data=cifar100", f"data.root={cifar100_root}", "data.download=false")
    summary = read_summary(tmp_path)
    assert summary["params"] < summary["dense_params"] and summary["flops"] < summary["dense_flops"]
    assert len(summary["class_names"]) == 100 and summary["class_names"][0] == "apple"
    assert summary["test_acc"]["finetune"] > 0.02  # chance is 0.01
    assert summary["fit_time_s"] > 0 and "inference" not in summary  # measured on a GPU only, by default
    assert 0.0 <= summary["semantics"]["superclass_purity"] <= 1.0 and 0.0 <= summary["semantics"]["nmi"] <= 1.0
    superclass_of, names = torch.load(tmp_path / "split_record.pt", weights_only=False)["superclasses"]
    assert len(superclass_of) == 100 and names[4] == "fruit_and_vegetables"  # the class tree colours by them


def test_cifar100_superclasses_are_read(cifar100_root: Path):
    from splitnet.data import CIFAR100DataModule

    data = CIFAR100DataModule(root=str(cifar100_root), download=False)
    data.setup()
    assert data.class_names[0] == "apple" and data.superclass_of[0] == 4
    assert len(data.superclass_names) == 20 and data.superclass_names[4] == "fruit_and_vegetables"
    assert sorted(data.superclass_of.count(s) for s in range(20)) == [5] * 20
    sizes = [len(loader.dataset) for loader in (data.train_dataloader(), data.val_dataloader(), data.test_dataloader())]
    assert sizes == [45000, 5000, 10000]


def test_ckpt_path_auto_resumes_only_where_there_is_a_checkpoint(tmp_path: Path):
    from train import resolve_ckpt_path

    assert resolve_ckpt_path("auto", str(tmp_path)) is None  # a fresh start
    (tmp_path / "last.ckpt").write_bytes(b"")
    assert resolve_ckpt_path("auto", str(tmp_path)) == str(tmp_path / "last.ckpt")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("split.groups=4-2-2",), "group counts may not decrease going up (4 > 2)"),
        (("split.groups=2-3-6",), "2 does not divide 3"),
        (("split.groups=2-two-2",), "split.groups='2-two-2' is not a split string"),
        (("split.assign=nearest",), "split.assign='nearest' is not one of argmax, balanced, random"),
        (("split.groups=32-32-32",), "32 groups in grouping 'stage2:in', which has only 16 channels"),
        (("ckpt_path=/nonexistent/last.ckpt",), "ckpt_path=/nonexistent/last.ckpt: no checkpoint at"),
        (("split=3-3-3",), "Could not find 'split/3-3-3'"),
        (("pretrained=resnet18.pth",), "pretrained=resnet18.pth: backbone WideResNet takes no torchvision weights"),
        (("backbone=resnet1000",), "Could not find 'backbone/resnet1000'"),
        (("data=mnist",), "Could not find 'data/mnist'"),
        (("schedule.group.lr_schedule=bogus",), "schedule.group.lr_schedule='bogus' is not one of step, onecycle"),
        (("schedule.group.assignment_lr_scale=0",), "schedule.group.assignment_lr_scale=0: must be a positive"),
        (("schedule.group.assignment_commit=1.5",), "schedule.group.assignment_commit=1.5: must be a share"),
        (("schedule.group.assignment_update=adam",), "schedule.group.assignment_update='adam' is not one of sgd"),
        (("data.val_size=-3",), "data.val_size=-3: must be between 0 and the 2000 training images"),
        (("backbone.depth=15",), "backbone.depth=15: a Wide ResNet has depth 6n+4"),
        (("model.compile=turbo",), "model.compile='turbo': Unrecognized mode=turbo"),
        (("model.compile_regularisers=maybe",), "model.compile_regularisers='maybe': must be true or false"),
        (("split.gamma1=-1",), "split.gamma1=-1: must be a number, 0 or more"),
        (("split.gamma2=nan",), "split.gamma2=nan: must be a number, 0 or more"),
        (("schedule.group.epochs=1.5",), "schedule.group.epochs=1.5: must be a whole number"),
        (("schedule.group.momentum=-1",), "schedule.group.momentum=-1: must be a number, between 0 and 1"),
        (("schedule.finetune.dropout=1.5",), "schedule.finetune.dropout=1.5: must be a number, between 0 and 1"),
        (("schedule.group.nesterov=true", "schedule.group.momentum=0"), "nesterov=true needs momentum above 0"),
        (("schedule.group.assignment_commit=1.0",), "schedule.group.assignment_commit=1.0 falls on epoch 2 of a "
                                                    "2-epoch phase, where the split comes"),
        (("inference_batch=-1",), "inference_batch=-1: must be a positive integer, or null"),
        (("seed=abc",), "seed='abc': must be a whole number from 0 to 2**32 - 1"),
        (("seed=-1",), "seed=-1: must be a whole number from 0 to 2**32 - 1"),
        (("schedule.finetune.epochs=0",), "schedule.finetune.epochs=0: the split comes at the start of the first"),
        (("+trainer.max_epochs=1",), "trainer.max_epochs=1: a run's epochs are schedule.group.epochs + "),
        (("data.augment=maybe",), "data.augment='maybe': must be true or false"),
        (("data.num_workers=-1",), "data.num_workers=-1: must be 0"),
        (("ckpt_path=README.md",), "ckpt_path=README.md: README.md is not a checkpoint (not a file written by torch"),
    ],
)
def test_bad_config_fails_with_its_message(tmp_path: Path, overrides: tuple[str, ...], message: str):
    result = run_train(tmp_path, "experiment=smoke", "data=synthetic", *overrides, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_nan_loss_names_the_last_good_checkpoint(tmp_path: Path):
    result = run_train(tmp_path, "experiment=smoke", "data=synthetic", "schedule.finetune.lr=1e30", check=False)
    assert result.returncode != 0
    assert "the finetune loss was not finite on a batch of epoch 2, step" in result.stderr
    assert f"the last good checkpoint is {tmp_path / 'checkpoints' / 'last.ckpt'}" in result.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [(("backbone.width=2",), "the checkpoint's backbone"), (("split=4-4-4",), "trained for split 2-2-2"),
     (("data.num_classes=20",), "the checkpoint was trained on 10 classes, this run's data has 20")],
    ids=["other-backbone", "other-split", "other-classes"],
)
def test_checkpoint_of_another_model_is_refused(smoke_run: Path, tmp_path: Path, overrides, message):
    for epoch in ("001", "003"):  # before and after the split
        checkpoint = smoke_run / "checkpoints" / f"epoch{epoch}.ckpt"
        result = run_train(tmp_path / epoch, *SMOKE, *overrides, f"ckpt_path={checkpoint}", check=False)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_pretrained_weights_that_do_not_fit_are_refused(tmp_path: Path):
    from train import load_pretrained

    text, tensor, other = tmp_path / "notes.txt", tmp_path / "tensor.pth", tmp_path / "resnet50.pth"
    text.write_text("not weights")
    torch.save(torch.zeros(3), tensor)
    torch.save(resnet50(num_classes=10).state_dict(), other)
    for path, message in ((text, "not a state dict written by torch.save"), (tensor, "holds a Tensor, not a state dict"),
                          (other, "not a torchvision resnet18 state dict: size mismatch for")):
        with pytest.raises(ConfigError, match=f"pretrained={path}: {message}"):
            load_pretrained(resnet18(num_classes=10), str(path))


def test_a_run_without_validation_batches_still_writes_its_summary(tmp_path: Path):
    run_train(tmp_path, *SMOKE, "data.val_size=0", "trainer.limit_train_batches=2", "schedule.group.epochs=1",
              "schedule.finetune.epochs=1")
    summary = read_summary(tmp_path)
    assert summary["val_acc"] == {} and set(summary["test_acc"]) == {"group", "split", "finetune"}


def test_a_run_stopped_early_writes_no_summary_and_goes_on_when_resumed(tmp_path: Path):
    """trainer.max_steps (or a time limit) ending the fit before its last epoch is not a finished run. (Lightning counts
    the epoch it cut short as done: the resumed run goes on with the next.)"""
    result = run_train(tmp_path, *SMOKE, "trainer.limit_train_batches=2", "+trainer.max_steps=7")  # in the last epoch
    assert ("the run stopped with 4 of 4 epochs begun (step 7): no test and no summary; the same command plus "
            f"ckpt_path=auto goes on from {tmp_path / 'checkpoints' / 'last.ckpt'}") in result.stdout
    assert not (tmp_path / "summary.json").exists()
    run_train(tmp_path, *SMOKE, "trainer.limit_train_batches=2", "ckpt_path=auto")
    assert read_summary(tmp_path)["epochs"] == 4


def test_corrupt_cifar100_is_reported(tmp_path: Path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(b"not a pickle")
    result = run_train(tmp_path / "run", "experiment=smoke", f"data.root={tmp_path}", "data.download=false", check=False)
    assert result.returncode != 0 and "or its files are corrupt" in result.stderr and "Traceback" not in result.stderr


def test_missing_cifar100_says_where_it_looked(tmp_path: Path):
    empty = tmp_path / "empty"
    result = run_train(tmp_path / "run", "experiment=smoke", f"data.root={empty}", "data.download=false", check=False)
    assert result.returncode != 0
    assert f"CIFAR-100 was not found in {empty / 'cifar-100-python'}" in result.stderr
    assert "set data.root" in result.stderr


def test_compiled_network_trains_through_the_split_and_the_fade_makes_the_cut_lossless(tmp_path: Path):
    """model.compile=true: the dense network and, after the split, the tree run compiled; checkpoints keep plain keys.
    With off_block_fade the group phase ends with the off-block weights at zero, and the cut keeps the accuracy."""
    run_train(tmp_path, "experiment=smoke", "data=synthetic", "model.compile=true", "trainer.limit_train_batches=3",
              "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "schedule.group.epochs=2",
              "schedule.finetune.epochs=1", "schedule.group.assignment_commit=0.5", "schedule.group.off_block_fade=true",
              "callbacks.checkpoint.save_top_k=-1")
    summary = read_summary(tmp_path)
    assert summary["epochs"] == 3
    for split in ("val_acc", "test_acc"):
        assert summary[split]["split"] == pytest.approx(summary[split]["group"], abs=1e-6), split
    state = final_state(tmp_path)
    assert any(key.startswith("net.levels.") for key in state) and not any("_orig_mod" in key for key in state)
    spec = TreeSpec.from_dict(torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["splitnet"]["tree_spec"])
    dense = SplitNetModule.load_from_checkpoint(tmp_path / "checkpoints" / "epoch001.ckpt", map_location="cpu").net
    for name, mask in block_masks(dense, dense.split_plan, spec).items():
        weight = dense.get_submodule(name).weight.detach()
        assert (weight * (1 - mask)).abs().max() == 0 and (weight * mask).abs().max() > 0, name


def test_no_group_epochs_cuts_the_initial_network_and_finetunes_every_epoch(tmp_path: Path):
    """schedule.group.epochs=0: the random tree from scratch (README's CIFAR-100 section), cut before the first step."""
    run_train(tmp_path, *SMOKE, "split.assign=random", "split.gamma1=0", "split.gamma2=0", "split.gamma3=0",
              "schedule.group.epochs=0", "schedule.finetune.epochs=2", "trainer.limit_train_batches=3")
    summary = read_summary(tmp_path)
    assert summary["epochs"] == 2 and set(summary["test_acc"]) == {"group", "split", "finetune"}
    assert sorted(len(group) for group in summary["class_groups"]) == [5, 5]
    first = torch.load(tmp_path / "checkpoints" / "epoch000.ckpt", map_location="cpu", weights_only=False)
    assert first["splitnet"]["tree_spec"] is not None and first["global_step"] == 3


def test_the_main_job_needs_none_of_the_optional_packages(tmp_path: Path):
    """The GPU kit has no wandb, tensorboard, onnx or webdataset (../shared/gpu/README.md): a run must not need them."""
    optional = ["wandb", "tensorboard", "onnx", "onnxruntime", "onnxscript", "webdataset"]
    script = (
        "import runpy, sys\n"
        f"sys.modules.update(dict.fromkeys({optional!r}))  # None: importing them fails, as if not installed\n"
        f"sys.argv = ['train.py', 'hydra.run.dir={tmp_path}', *{list(SMOKE)!r}]\n"
        "runpy.run_path('train.py', run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(read_summary(tmp_path)["test_acc"]) == {"group", "split", "finetune"}
