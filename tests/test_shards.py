"""Tar-shard data (WebDataset) packed from small generated image folders: counts, loaders, errors, a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from splitnet.data import DataError
from splitnet.data.shards import ShardDataModule, write_shards
from tests.conftest import read_summary, run_train
from tests.test_imagefolder import CLASSES, make_folders


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    write_shards(make_folders(tmp_path / "folders"), tmp_path / "shards", shard_size=10)
    return tmp_path / "shards"


def module(root: Path, **kwargs) -> ShardDataModule:
    defaults = {"batch_size": 4, "eval_batch_size": 5, "val_shards": 1, "num_workers": 0, "image_size": 32}
    return ShardDataModule(str(root), **(defaults | kwargs))


def test_packing_writes_shards_classes_and_counts(shards: Path):
    counts = json.loads((shards / "counts.json").read_text())
    assert counts == {**{f"train-{i:06d}.tar": 10 for i in range(4)}, "train-000004.tar": 8,  # 48 training images
                      "val-000000.tar": 10, "val-000001.tar": 2}
    assert {p.name for p in shards.glob("*.tar")} == set(counts)
    assert (shards / "classes.txt").read_text().split() == CLASSES


def test_loaders_cover_each_split(shards: Path):
    data = module(shards)
    data.setup()
    assert data.num_classes == 4 and data.class_names == CLASSES
    assert (data.samples("train"), data.samples("val"), data.samples("test")) == (38, 10, 12)
    train = list(data.train_dataloader())
    assert len(train) == len(data.train_dataloader()) == 38 // 4  # an epoch is the training set's size
    assert all(images.shape == (4, 3, 32, 32) for images, _ in train)
    test_labels = torch.cat([labels for _, labels in data.test_dataloader()])
    assert sorted(test_labels.tolist()) == sorted([c for c in range(4) for _ in range(3)])  # each test image once
    assert sum(len(labels) for _, labels in data.val_dataloader()) == 10


def test_training_order_is_seeded(shards: Path):
    first = [labels.tolist() for _, labels in module(shards).train_dataloader()]
    again = [labels.tolist() for _, labels in module(shards).train_dataloader()]
    other = [labels.tolist() for _, labels in module(shards, seed=1).train_dataloader()]
    assert first == again and first != other


def test_missing_or_malformed_shard_directories_are_named(shards: Path, tmp_path: Path):
    with pytest.raises(DataError, match=f"no {tmp_path / 'nothing' / 'classes.txt'}"):
        module(tmp_path / "nothing").setup()
    with pytest.raises(ValueError, match="data.val_shards=5: must be between 1 and 4"):
        module(shards, val_shards=5).setup()
    (shards / "counts.json").write_text('{"train-000000.tar": 10}')
    with pytest.raises(DataError, match="no count for train-000001.tar"):
        module(shards).setup()


def test_unreadable_samples_are_skipped_and_counted_or_an_error(tmp_path: Path):
    folders = make_folders(tmp_path / "folders")
    (folders / "val" / "n002" / "1.png").write_bytes(b"not an image")
    write_shards(folders, tmp_path / "shards", shard_size=10)
    data = module(tmp_path / "shards")
    assert sum(len(labels) for _, labels in data.test_dataloader()) == 11 and data.skipped_images == 1
    with pytest.raises(DataError, match="unreadable sample.*data.on_bad_image=skip"):
        list(module(tmp_path / "shards", on_bad_image="error").test_dataloader())


def test_packing_a_missing_folder_is_an_error(tmp_path: Path):
    with pytest.raises(DataError, match=f"no folder {tmp_path / 'train'}"):
        write_shards(tmp_path, tmp_path / "out")


SHARD_RUN = ("experiment=smoke", "data=imagenet22k_shards", "data.test_split=val", "data.image_size=32",
             "data.num_workers=0", "data.shuffle_buffer=16", "backbone=resnet18", "~backbone.width",
             "split.groups=2-2-4")


def test_resnet18_smoke_run_on_shards(shards: Path, tmp_path: Path):
    run_train(
        tmp_path / "run", *SHARD_RUN, f"data.root={shards}", "data.val_shards=1", "data.eval_batch_size=8",
        "schedule.batch_size=8", "trainer.limit_train_batches=3",
    )
    summary = read_summary(tmp_path / "run")
    assert summary["backbone"] == "resnet18" and len(summary["class_groups"]) == 4
    assert summary["params"] < summary["dense_params"] and summary["skipped_images"] == 0


def test_two_ddp_ranks_share_the_shards(shards: Path, tmp_path: Path):
    probe = tmp_path / "ranks"
    ddp = (*SHARD_RUN, f"data.root={shards}", "data.eval_batch_size=4", "schedule.batch_size=4", "trainer=ddp",
           "trainer.devices=2")
    run_train(tmp_path / "run", *ddp, "data.val_shards=2", "+callbacks.probe._target_=tests.ddp_probe.SaveRankState",
              f"+callbacks.probe.out_dir={probe}", "+callbacks.labels._target_=tests.ddp_probe.SaveSeenLabels",
              f"+callbacks.labels.out_dir={probe}")
    ranks = [torch.load(probe / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["tree_spec"] == ranks[1]["tree_spec"]
    assert all(torch.equal(v, ranks[1]["state_dict"][k]) for k, v in ranks[0]["state_dict"].items())
    seen = [torch.load(probe / f"labels{r}.pt") for r in (0, 1)]
    assert len(seen[0]["train"]) == len(seen[1]["train"]) > 0 and seen[0]["train"] != seen[1]["train"]  # own draws
    tested = seen[0]["test"] + seen[1]["test"]
    assert seen[0]["test"] and seen[1]["test"] and sorted(tested) == sorted(c for c in range(4) for _ in range(3))
    # one validation shard for two ranks: one rank would have nothing to evaluate
    result = run_train(tmp_path / "bad", *ddp, "data.val_shards=1", check=False)
    assert result.returncode != 0
    assert "error: data.val_shards=1: each of the 2 ranks needs at least one val shard" in result.stderr
