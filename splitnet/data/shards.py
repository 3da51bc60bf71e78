"""Tar shards (WebDataset) for data sets too large for a file per image, such as ImageNet-22K.

A shard root holds ``train-*.tar`` and ``<test_split>-*.tar`` (samples: an image under ``jpg``, ``jpeg``,
``png`` or ``webp`` and its label under ``cls``), ``classes.txt`` (one class name per line, line i = label i)
and ``counts.json`` (samples per shard). ``python -m splitnet.data.shards FOLDER_ROOT OUT_DIR`` writes all
three from an image-folder tree.

Training draws shards at random with replacement (per rank and worker, seeded), shuffles samples in a
buffer, and ends an epoch after the training set's size in samples, split evenly across ranks so that every
DDP rank runs the same number of steps. The first ``val_shards`` training shards are held out for validation.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from splitnet.data.base import DataError
from splitnet.data.imagefolder import WorkerImageDataModule, imagenet_transforms
from splitnet.errors import ConfigError

IMAGE_KEYS = "jpg;jpeg;png;webp"


class ShardDataModule(WorkerImageDataModule):
    """Train / held-out validation / test loaders over WebDataset tar shards; classes read from ``classes.txt``.

    ``on_bad_image``: ``skip`` (skipped and counted) or ``error`` (stop, naming the sample).
    """

    def __init__(
        self, root: str, test_split: str = "val", batch_size: int = 256, eval_batch_size: int = 256,
        val_shards: int = 1, shuffle_buffer: int = 5000, num_workers: int = 8, image_size: int = 224,
        on_bad_image: str = "skip", seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, 0, num_workers, image_size, on_bad_image, seed)
        self.root, self.test_split = Path(root).expanduser(), test_split
        self.val_shards, self.shuffle_buffer = val_shards, shuffle_buffer
        self._shards: dict[str, list[str]] = {}
        self._counts: dict[str, int] = {}

    def _read(self, name: str) -> str:
        path = self.root / name
        if not path.is_file():
            raise DataError(f"no {path}: data.root must be a shard directory written by "
                            f"`python -m splitnet.data.shards` (classes.txt, counts.json, train-*.tar)")
        return path.read_text()

    def setup(self, stage: str | None = None) -> None:
        if self._shards:
            return
        self.class_names = [line for line in self._read("classes.txt").splitlines() if line]
        try:
            self._counts = {str(k): int(v) for k, v in json.loads(self._read("counts.json")).items()}
        except (ValueError, AttributeError) as error:
            raise DataError(f"{self.root / 'counts.json'} is not a mapping of shard names to counts ({error})") from None
        train = sorted(str(p) for p in self.root.glob("train-*.tar"))
        test = sorted(str(p) for p in self.root.glob(f"{self.test_split}-*.tar"))
        for split, shards in (("train", train), (self.test_split, test)):
            if not shards:
                raise DataError(f"no {split}-*.tar shards in {self.root}")
            missing = [Path(s).name for s in shards if Path(s).name not in self._counts]
            if missing:
                raise DataError(f"{self.root / 'counts.json'} has no count for {', '.join(missing[:3])}")
        if not 0 < self.val_shards < len(train):
            raise ConfigError(f"data.val_shards={self.val_shards}: must be between 1 and {len(train) - 1} "
                             f"(one less than the {len(train)} training shards)")
        self._shards = {"val": train[: self.val_shards], "train": train[self.val_shards :], "test": test}

    def samples(self, split: str) -> int:
        """Samples in ``split`` ("train", "val" or "test"), from counts.json."""
        self.setup()
        return sum(self._counts[Path(s).name] for s in self._shards[split])

    def _handler(self, error: Exception) -> bool:
        """WebDataset's exception handler: the bad-image policy decides; True carries on with the next sample."""
        self.on_bad_image(f"sample in {self.root}", error)
        return True

    def _decoded(self, transform, batch_size: int, partial: bool) -> list:
        return [
            wds.tarfile_to_samples(handler=self._handler),
            *([wds.detshuffle(self.shuffle_buffer, seed=self.seed)] if not partial else []),
            wds.decode("pilrgb", handler=self._handler),
            wds.to_tuple(IMAGE_KEYS, "cls", handler=self._handler),
            wds.map_tuple(transform, int, handler=self._handler),
            wds.batched(batch_size, partial=partial),
        ]

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def train_dataloader(self) -> DataLoader:
        self.setup()
        train_tf, _ = imagenet_transforms(self.image_size)
        workers, ranks, samples = max(1, self.num_workers), self._world_size(), self.samples("train")
        steps_per_worker = samples // (self.batch_size * ranks * workers)
        if steps_per_worker < 1:
            raise DataError(f"{samples} training samples give no full batch of {self.batch_size} "
                            f"for each of {ranks} ranks x {workers} loader workers")
        shards = wds.ResampledShards(self._shards["train"], seed=self.seed, deterministic=True)
        pipeline = wds.DataPipeline(shards, *self._decoded(train_tf, self.batch_size, partial=False))
        pipeline = pipeline.with_epoch(steps_per_worker).with_length(steps_per_worker * workers, silent=True)
        return self._stream_loader(pipeline)

    def _eval_loader(self, split: str) -> DataLoader:
        self.setup()
        shards, ranks = len(self._shards[split]), self._world_size()
        if shards < ranks:  # a rank without a shard would sit out the evaluation the others wait in
            setting = (f"data.val_shards={self.val_shards}" if split == "val"
                       else f"the {self.test_split} split has {shards} shard(s) in {self.root}")
            raise DataError(f"{setting}: each of the {ranks} ranks needs at least one {split} shard "
                            f"(give it at least {ranks}; `python -m splitnet.data.shards --shard-size` makes more)")
        _, eval_tf = imagenet_transforms(self.image_size)
        pipeline = wds.DataPipeline(wds.SimpleShardList(self._shards[split]), wds.split_by_node, wds.split_by_worker,
                                    *self._decoded(eval_tf, self.eval_batch_size, partial=True))
        return self._stream_loader(pipeline)

    def _stream_loader(self, pipeline: wds.DataPipeline) -> DataLoader:
        return DataLoader(pipeline, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


def write_shards(folder_root: Path, out_dir: Path, test_split: str = "val", shard_size: int = 1000,
                 seed: int = 0) -> dict[str, int]:
    """Pack ``folder_root/{train,<test_split>}/<class>/<image>`` into shuffled tar shards of ``shard_size`` images
    in ``out_dir`` with classes.txt and counts.json; the image files are stored as they are (no re-encoding).
    Returns samples per shard."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    class_names: list[str] | None = None
    for split in ("train", test_split):
        folder = folder_root / split
        if not folder.is_dir():
            raise DataError(f"no folder {folder}: expected {split}/ with one sub-folder of images per class")
        try:
            images = ImageFolder(str(folder))
        except FileNotFoundError as error:
            raise DataError(f"{folder}: {error}") from None
        if class_names is not None and images.classes != class_names:
            raise DataError(f"{folder} has other class folders than {folder_root / 'train'}")
        class_names = images.classes
        samples = list(images.samples)
        random.Random(seed).shuffle(samples)
        pattern = str(out_dir / f"{split}-%06d.tar")
        with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as writer:
            for index, (path, label) in enumerate(tqdm(samples, desc=f"packing {split}", unit="img")):
                suffix = Path(path).suffix.lower().lstrip(".")
                writer.write({"__key__": f"{index:09d}", suffix: Path(path).read_bytes(), "cls": label})
                shard = Path(pattern % (index // shard_size)).name
                counts[shard] = counts.get(shard, 0) + 1
    (out_dir / "classes.txt").write_text("\n".join(class_names) + "\n")
    (out_dir / "counts.json").write_text(json.dumps(counts, indent=1))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description="Pack an image-folder data set into WebDataset tar shards.")
    parser.add_argument("folder_root", type=Path, help="holds train/<class>/* and <test-split>/<class>/*")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--test-split", default="val")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    args = parser.parse_args()
    try:
        counts = write_shards(args.folder_root, args.out_dir, args.test_split, args.shard_size, args.seed)
    except DataError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"{len(counts)} shards, {sum(counts.values())} images in {args.out_dir}")


if __name__ == "__main__":
    main()
