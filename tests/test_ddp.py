"""DDP with two CPU processes (gloo) through the whole run, the split at the phase boundary included."""

from pathlib import Path

import torch

from splitnet.module import SplitNetModule
from splitnet.grouped import GroupedTree
from tests.conftest import SMOKE, read_summary, run_train


def test_ddp_two_processes_end_with_the_same_tree_and_weights(tmp_path: Path):
    probe = tmp_path / "ranks"
    run_train(
        tmp_path / "run", "experiment=smoke", "data=synthetic", "trainer=ddp", "trainer.devices=2",
        "trainer.limit_train_batches=6", "+callbacks.probe._target_=tests.ddp_probe.SaveRankState",
        f"+callbacks.probe.out_dir={probe}",
    )
    ranks = [torch.load(probe / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["tree_spec"] == ranks[1]["tree_spec"]
    assert ranks[0]["state_dict"].keys() == ranks[1]["state_dict"].keys()
    for key, value in ranks[0]["state_dict"].items():
        assert torch.equal(value, ranks[1]["state_dict"][key]), key
    # only rank 0 writes; its checkpoint, written under DDP, loads on one device
    assert (tmp_path / "run" / "summary.json").exists()
    model = SplitNetModule.load_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu")
    assert isinstance(model.net, GroupedTree)
    assert all(torch.equal(v, ranks[0]["state_dict"][k]) for k, v in model.state_dict().items())


def test_single_device_checkpoint_resumes_under_ddp(smoke_run: Path, tmp_path: Path):
    checkpoint = smoke_run / "checkpoints" / "epoch002.ckpt"  # after the split, written on one device
    run_train(tmp_path, *SMOKE, "trainer=ddp", "trainer.devices=2", f"ckpt_path={checkpoint}")
    resumed, original = read_summary(tmp_path), read_summary(smoke_run)
    assert resumed["class_groups"] == original["class_groups"] and resumed["epochs"] == 4


def test_a_loss_diverged_on_one_rank_stops_every_rank_before_a_checkpoint(tmp_path: Path):
    """The epoch's last batch diverges on rank 1 only. Each rank's finite flag is all-reduced at the same check, so
    rank 0 stops too instead of waiting forever in the gradient all-reduce, and the epoch's checkpoint is not
    written."""
    result = run_train(
        tmp_path, "experiment=smoke", "data=synthetic", "trainer=ddp", "trainer.devices=2",
        "trainer.limit_train_batches=4", "trainer.log_every_n_steps=50",
        "+callbacks.nan._target_=tests.ddp_probe.NanLossOnRank", "+callbacks.nan.rank=1", "+callbacks.nan.batch=3",
        check=False,
    )
    assert result.returncode != 0
    assert "the group loss was not finite on a batch of epoch 0, steps 0-3 (at step 3: nan)" in result.stderr
    assert "another process's group loss is not finite (epoch 0, steps 0-3)" in result.stderr
    assert not list((tmp_path / "checkpoints").glob("*.ckpt"))
