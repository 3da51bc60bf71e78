"""Image-folder data (ILSVRC / ImageNet-22K layout) on small generated folders, with its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from splitnet.data import DataError, ImageFolderDataModule
from tests.conftest import read_summary, run_train

CLASSES = ["n001", "n002", "n003", "n004"]


def make_folders(root: Path, per_class: int = 12) -> Path:
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", per_class), ("val", 3)):
        for index, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (torch.rand(40, 48, 3, generator=generator) * 60 + index * 60).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


def module(root: Path, **kwargs) -> ImageFolderDataModule:
    defaults = {"batch_size": 4, "eval_batch_size": 4, "val_size": 8, "num_workers": 0, "image_size": 32}
    return ImageFolderDataModule(str(root), **(defaults | kwargs))


def test_classes_and_splits_come_from_the_folders(tmp_path: Path):
    data = module(make_folders(tmp_path))
    data.setup()
    assert data.num_classes == 4 and data.class_names == CLASSES
    assert len(data.train_dataloader().dataset) == 40 and len(data.val_dataloader().dataset) == 8
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.max() < 4
    assert len(data.test_dataloader().dataset) == 12


def test_missing_folder_is_named(tmp_path: Path):
    with pytest.raises(DataError, match=f"no folder {tmp_path / 'train'}"):
        module(tmp_path).setup()


def test_empty_class_folder_is_named(tmp_path: Path):
    make_folders(tmp_path)
    for image in (tmp_path / "train" / "n003").iterdir():
        image.unlink()
    with pytest.raises(DataError, match="n003"):
        module(tmp_path).setup()


def test_unreadable_images_are_skipped_and_counted_or_an_error(tmp_path: Path):
    make_folders(tmp_path)
    bad = tmp_path / "val" / "n002" / "1.png"
    bad.write_bytes(b"not an image")
    data = module(tmp_path)
    data.setup()
    seen = sum(len(labels) for _, labels in data.test_dataloader())
    assert seen == 12 and data.skipped_images == 1  # replaced by the next readable image, and counted
    strict = module(tmp_path, on_bad_image="error")
    strict.setup()
    with pytest.raises(DataError, match=f"unreadable image {bad}.*data.on_bad_image=skip"):
        list(strict.test_dataloader())


def test_resnet18_smoke_run_on_image_folders_from_torchvision_weights(tmp_path: Path):
    root = make_folders(tmp_path / "images")
    pretrained = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), pretrained)
    run_train(
        tmp_path / "run", "experiment=smoke", "data=imagenet", f"data.root={root}", "data.image_size=32",
        "data.val_size=8", "data.num_workers=0", "data.eval_batch_size=8", "backbone=resnet18", "~backbone.width", "split.groups=2-2-4",
        "schedule.batch_size=8", "trainer.limit_train_batches=3", f"pretrained={pretrained}",
    )
    summary = read_summary(tmp_path / "run")
    assert summary["backbone"] == "resnet18" and len(summary["class_groups"]) == 4
    assert summary["params"] < summary["dense_params"] and summary["flops"] < summary["dense_flops"]
