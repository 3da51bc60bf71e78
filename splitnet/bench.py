"""``python -m splitnet.bench``: training and inference throughput of dense networks and their split trees.

Every tree is built by the project's own split code from balanced groups, and run in each of ``--layouts``: its
branches one after another, or grouped (``splitnet.grouped``). Ratios are against the dense network at its best
setting in the same run; the plain-PyTorch training loop is the reference for training.
With ``--runs``, the final networks of finished training runs are timed instead, against the fastest dense run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import logging
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splitnet.data.base import ImageTensorDataModule
from splitnet.grouped import GroupedTree
from splitnet.module import SplitNetModule, compiled
from splitnet.plan import SplitConfigError, parse_groups
from splitnet.report import SummaryError, count_flops, count_params, format_rows, read_summary
from splitnet.surgery import build_tree, hard_assign

BACKBONES = {
    "wrn16_1": ({"_target_": "splitnet.backbones.wide_resnet", "depth": 16, "width": 1}, (3, 32, 32), 100),
    "wrn16_8": ({"_target_": "splitnet.backbones.wide_resnet", "depth": 16, "width": 8}, (3, 32, 32), 100),
    "wrn16_4": ({"_target_": "splitnet.backbones.wide_resnet", "depth": 16, "width": 4}, (3, 32, 32), 100),
    "resnet18": ({"_target_": "splitnet.backbones.resnet18"}, (3, 224, 224), 1000),
    "resnet50": ({"_target_": "splitnet.backbones.resnet50"}, (3, 224, 224), 1000),
    "alexnet": ({"_target_": "splitnet.backbones.alexnet"}, (3, 224, 224), 1000),
}
SCHEDULE = {phase: {"epochs": 1, "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
                    "lr_schedule": "cosine", "dropout": 0.0} for phase in ("group", "finetune")}


def balanced_tree(model: nn.Module, split: str) -> nn.Module:
    """The tree of ``split`` with equal-size groups (as the split code builds it from uniform assignments)."""
    groups = parse_groups(split, model.split_plan)
    free = model.split_plan.free_groupings(model, groups)
    probs = {key: torch.full((count, size), 1.0 / count) for key, (count, size) in free.items()}
    return build_tree(model, model.split_plan, hard_assign(groups, probs, "balanced"))


def check_splits(parser: argparse.ArgumentParser, backbones: list[str], splits: list[str]) -> None:
    """Refuse, in one line, a split that one of ``backbones`` cannot take (before anything is timed)."""
    for name in backbones:
        config, _, classes = BACKBONES[name]
        dense = instantiate(config, num_classes=classes)
        for split in splits:
            try:
                dense.split_plan.free_groupings(dense, parse_groups(split, dense.split_plan))
            except SplitConfigError as error:
                parser.error(f"--splits {split} ({name}): {error}")


def number(kind: Callable[[str], float] = int, positive: bool = True, many: bool = False) -> Callable[[str], Any]:
    """An argparse ``type``: a positive (or, without ``positive``, non-negative) number of ``kind``, or with ``many``
    a comma list of them; anything else is refused naming the value."""
    rule = f"{'positive' if positive else 'non-negative'} {'integer' if kind is int else 'number'}"

    def parse(text: str) -> Any:
        try:
            values = [kind(part) for part in text.split(",")]
        except ValueError:
            values = []
        # not (v >= 0): NaN is refused too
        if not values or (len(values) > 1 and not many) or any(not (v > 0 if positive else v >= 0) for v in values):
            raise argparse.ArgumentTypeError(f"{text!r} is not {f'a comma list of {rule}s' if many else f'a {rule}'}")
        return values if many else values[0]

    return parse


def device_arg(text: str) -> torch.device:
    """An argparse ``type``: a device this machine has (cpu, cuda or cuda:<index>)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: cpu, cuda or cuda:<index>")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device (torch.cuda.is_available() is "
                                         "false): use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughputs(steps: dict[str, Callable[[], object]], batch: int, device: torch.device, repeats: int,
                warmup: int = 2) -> dict[str, float]:
    """Images per second of each ``step`` (one batch each), from the median of ``repeats`` timed calls.

    The steps take turns, so a slow spell of a shared machine hits them all alike.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: batch / statistics.median(times) for name, times in samples.items()}


def bf16_autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` if ``bf16``, else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# the compiled inference settings and their torch.compile modes (all channels-last); the autotuned ones time kernel
# choices while they compile, so the default settings leave them out
COMPILE_MODES = {"compile": None, "cudagraphs": "reduce-overhead", "autotune": "max-autotune-no-cudagraphs",
                 "autotune_cudagraphs": "max-autotune"}
INFERENCE_SETTINGS = ("eager", "channels_last", *COMPILE_MODES)
# the training settings as SplitNetModule's compile arguments; the plain loop takes the same ``compile``
TRAIN_SETTINGS = {"eager": {"compile": False}, "compile": {"compile": True}, "cudagraphs": {"compile": "reduce-overhead"},
                  "compile_regularisers": {"compile": False, "compile_regularisers": True}}
# how a tree runs: its branches one after another, or each level's packed into grouped layers (``splitnet.grouped``)
LAYOUTS = ("branches", "grouped")


def tree_name(split: str, layout: str) -> str:
    """A tree's label in the tables: its split, and ``grouped`` for the grouped layout."""
    return split if layout == "branches" else f"{split} grouped"


def trees(dense: nn.Module, splits: list[str], layouts: list[str]) -> dict[str, nn.Module]:
    """The balanced tree of every split in every layout, by ``tree_name``."""
    built = {}
    for split in splits:
        tree = balanced_tree(dense, split)
        for layout in layouts:
            built[tree_name(split, layout)] = tree if layout == "branches" else GroupedTree(tree, dense.split_plan)
    return built


def prepared(model: nn.Module, setting: str, device: torch.device) -> Callable[[Tensor], Tensor]:
    """``model`` as run under ``setting``: eager, channels_last, or channels_last through torch.compile in the mode
    of ``COMPILE_MODES[setting]``."""
    model = copy.deepcopy(model).to(device).eval()
    if setting != "eager":
        model = model.to(memory_format=torch.channels_last)
    if setting in COMPILE_MODES:
        return torch.compile(model, mode=COMPILE_MODES[setting])
    return model


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def inference_speed(model: nn.Module, image_shape: tuple[int, ...], batch: int, device: torch.device, bf16: bool,
                    repeats: int = 20) -> dict[str, object]:
    """Images per second of ``model`` (eval mode, channels-last, eager; bf16 autocast if ``bf16``) at ``batch``."""
    images = torch.randn(batch, *image_shape, device=device).contiguous(memory_format=torch.channels_last)
    run = prepared(model, "channels_last", device)
    with torch.inference_mode(), bf16_autocast(device, bf16):
        speed = throughputs({"model": lambda: run(images)}, batch, device, repeats)["model"]
    return {"batch": batch, "img_per_s": round(speed, 1), "setting": "eager channels_last" + (" bf16" if bf16 else ""),
            "device": device_name(device)}


def backbone(name: str, image_size: int | None) -> tuple[dict, tuple[int, ...], int]:
    """Backbone ``name``'s config, image shape (square images of ``image_size`` if given) and class count."""
    config, shape, classes = BACKBONES[name]
    return config, shape if image_size is None else (shape[0], image_size, image_size), classes


def inference_rows(args: argparse.Namespace, device: torch.device) -> Iterator[list[dict]]:
    """The inference rows of ``--backbone``, dense and its balanced trees, one batch size at a time."""
    config, shape, classes = backbone(args.backbone, args.image_size)
    dense = instantiate(config, num_classes=classes).eval()
    models = {"dense": dense} | {name: tree.eval() for name, tree in trees(dense, args.splits, args.layouts).items()}
    flops = {name: count_flops(model, shape) for name, model in models.items()}
    labels = {name: {"model": args.backbone, "split": name} for name in models}
    ratios = {name: flops["dense"] / flops[name] for name in models}
    yield from timed_inference(models, labels, ratios, {"dense"}, shape, args, device)


def run_inference_rows(args: argparse.Namespace, device: torch.device) -> Iterator[list[dict]]:
    """The inference rows of finished training runs (``--runs``): each run's final network, dense or tree, loaded from
    its last checkpoint and timed alone, one run after another; ratios against the best dense run among them."""
    models, labels, ratios, dense = {}, {}, {}, set()
    shapes = set()
    for run_dir in args.runs:
        summary_path, checkpoint = run_dir / "summary.json", run_dir / "checkpoints" / "last.ckpt"
        for path in (summary_path, checkpoint):
            if not path.is_file():
                raise SystemExit(f"--runs {run_dir}: it has no {path.relative_to(run_dir)}, so it is not a finished run")
        try:
            summary = read_summary(summary_path, ("backbone", "split", "flops", "dense_flops"))
        except SummaryError as error:
            raise SystemExit(f"--runs {run_dir}: {error}") from None
        if "image_shape" not in summary:
            raise SystemExit(f"--runs {run_dir}: its summary.json has no image_shape (written before splitnet kept it)")
        name = run_dir.name
        models[name] = SplitNetModule.load_from_checkpoint(checkpoint, map_location="cpu").unpacked_net().eval()
        labels[name] = {"run": name, "model": summary["backbone"], "split": summary["split"]}
        ratios[name] = summary["dense_flops"] / summary["flops"]
        shapes.add(tuple(summary["image_shape"]))
        if set(summary["split"].split("-")) == {"1"}:
            dense.add(name)
    if len(shapes) != 1:
        raise SystemExit(f"--runs: the runs' images differ in shape ({sorted(shapes)}); time them separately")
    yield from timed_inference(models, labels, ratios, dense, shapes.pop(), args, device)


def timed_inference(models: dict[str, nn.Module], labels: dict[str, dict], flop_ratios: dict[str, float],
                    dense: set[str], shape: tuple[int, ...], args: argparse.Namespace,
                    device: torch.device) -> Iterator[list[dict]]:
    """One table per batch size: every model under every setting, ``vs_dense`` against the fastest of the ``dense``
    models in any setting (None without one)."""
    for batch in args.infer_batches:
        images = torch.randn(batch, *shape, device=device)
        steps = {}
        for name, model in models.items():
            for setting in args.settings:
                inputs = images.contiguous(memory_format=torch.channels_last) if setting != "eager" else images
                steps[name, setting] = (lambda run, x: lambda: run(x))(prepared(model, setting, device), inputs)
        with torch.inference_mode(), bf16_autocast(device, args.bf16):
            measured = throughputs(steps, batch, device, args.repeats)
        best_dense = max((v for (name, _), v in measured.items() if name in dense), default=None)
        yield [{"mode": "inference", **labels[name], "batch": batch, "setting": setting, "img_per_s": round(value, 1),
                "vs_dense": None if best_dense is None else round(value / best_dense, 3),
                "flop_ratio": round(flop_ratios[name], 3)} for (name, setting), value in measured.items()]


class _RandomImages(ImageTensorDataModule):
    """Random uint8 images, augmented and normalised like the real data."""

    def __init__(self, shape: tuple[int, ...], classes: int, count: int, **kwargs) -> None:
        super().__init__(val_size=0, **kwargs)
        self.shape, self.classes, self.count = shape, classes, count

    def load(self):
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (self.count, *self.shape), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, self.classes, (self.count,), generator=generator)
        return images, labels, images[:1], labels[:1], [str(i) for i in range(self.classes)]


class _LoopTimer(pl.Callback):
    """Seconds per iteration of the training loop (fetch, transfer, step, hooks: from one batch's start to the
    next's) after ``warmup`` iterations, and each epoch's wall time (no waits for the device in between)."""

    def __init__(self, warmup: int, per_step: bool) -> None:
        self.warmup, self.per_step = warmup, per_step
        self.iterations: list[float] = []
        self.epochs: list[float] = []
        self._batch_start: float | None = None
        self._epoch_start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.per_step:
            return
        _sync(pl_module.device)
        now = time.perf_counter()
        if self._batch_start is not None and batch_idx > self.warmup:
            self.iterations.append(now - self._batch_start)
        self._batch_start = now

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        _sync(pl_module.device)
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        _sync(pl_module.device)
        self.epochs.append(time.perf_counter() - self._epoch_start)


def lightning_throughput(module: SplitNetModule, data: _RandomImages, args, device: torch.device,
                         whole_epochs: bool = False) -> float:
    """Images per second of ``module`` trained by Lightning: the median loop iteration, or with ``whole_epochs`` the
    second of two epochs over all of ``data`` (the first warms up)."""
    timer = _LoopTimer(warmup=2, per_step=not whole_epochs)
    limits = {"max_epochs": 2} if whole_epochs else {"max_steps": 3 + args.repeats}
    trainer = pl.Trainer(
        accelerator=device.type, devices=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
        precision="bf16-mixed" if args.bf16 else "32-true", **limits,
    )
    trainer.fit(module, datamodule=data)
    if whole_epochs:
        return len(data.train_dataloader()) * data.batch_size / timer.epochs[-1]
    return data.batch_size / statistics.median(timer.iterations)


def plain_throughput(model: nn.Module, data: _RandomImages, args, device: torch.device,
                     compile_mode: bool | str) -> float:
    """The reference: a plain PyTorch loop (no Lightning) over the same data pipeline."""
    model = copy.deepcopy(model).to(device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    run = compiled(model, compile_mode) if compile_mode else model
    loader = itertools.cycle(data.train_dataloader())

    def step() -> None:
        images, labels = data.fetch(next(loader), device, train=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with bf16_autocast(device, args.bf16):
            loss = F.cross_entropy(run(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return throughputs({"plain": step}, data.batch_size, device, args.repeats)["plain"]


def training_rows(args: argparse.Namespace, device: torch.device) -> Iterator[list[dict]]:
    """The training rows, one batch size at a time; each against the plain loop in the same setting."""
    config, shape, classes = backbone(args.backbone, args.image_size)
    dense = instantiate(config, num_classes=classes)
    # the group-learning rows (the dense network, on its way to a split) carry their split's ratio, the tree's
    flop_ratio = {"dense": 1.0} | {
        name: count_flops(dense, shape) / count_flops(tree, shape)
        for name, tree in trees(dense, args.splits, list(dict.fromkeys(["branches", *args.layouts]))).items()
    }
    for batch in args.train_batches:
        data = _RandomImages(shape, classes, batch * (args.repeats + 4), batch_size=batch)
        data.setup()
        epoch_data = _RandomImages(shape, classes, batch * args.epoch_steps, batch_size=batch)
        rows = []
        for setting in args.train_settings:
            compile_args, suffix = TRAIN_SETTINGS[setting], "" if setting == "eager" else f" {setting}"

            def module(split: str, layout: str = "branches") -> SplitNetModule:
                split_cfg = {"groups": split, "assign": "balanced", "gamma1": 1.0, "gamma2": 1.0, "gamma3": 10.0}
                return SplitNetModule(config, classes, split_cfg, SCHEDULE, args.channels_last, **compile_args,
                                      grouped_branches=layout == "grouped")

            plain = plain_throughput(module("none").net, data, args, device, compile_args["compile"])
            measured = {("plain loop", "dense"): plain}
            measured["lightning", "dense"] = lightning_throughput(module("none"), data, args, device)
            if args.epoch_steps:
                measured["lightning whole epoch", "dense"] = lightning_throughput(module("none"), epoch_data, args,
                                                                                 device, whole_epochs=True)
            for split in args.splits:
                measured["lightning group learning", split] = lightning_throughput(module(split), data, args, device)
                for layout in args.layouts:
                    tree = module(split, layout)
                    tree.split()
                    measured["lightning finetune", tree_name(split, layout)] = lightning_throughput(tree, data, args,
                                                                                                   device)
            reference = measured["plain loop", "dense"]
            rows += [{"mode": "training", "model": args.backbone, "split": name, "batch": batch,
                      "setting": setting_name + suffix, "img_per_s": round(value, 1),
                      "vs_dense": round(value / reference, 3), "flop_ratio": round(flop_ratio[name], 3)}
                     for (setting_name, name), value in measured.items()]
        yield rows


def cost_rows(backbones: list[str], splits: list[str], image_size: int | None) -> list[dict]:
    """Parameters and FLOPs per image of each backbone, dense and split with balanced groups."""
    rows = []
    for name in backbones:
        config, shape, classes = backbone(name, image_size)
        dense = instantiate(config, num_classes=classes).eval()
        dense_flops = count_flops(dense, shape)
        for split in ["dense", *splits]:
            model = dense if split == "dense" else balanced_tree(dense, split).eval()
            flops = count_flops(model, shape)
            rows.append({"model": name, "input": "x".join(map(str, shape[1:])), "split": split,
                         "params_M": round(count_params(model) / 1e6, 2), "GFLOPs": round(flops / 1e9, 3),
                         "flop_ratio": round(dense_flops / flops, 3)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitnet.bench", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_arg)
    parser.add_argument("--backbone", default="wrn16_8", help=f"one of {', '.join(sorted(BACKBONES))}")
    parser.add_argument("--splits", default="2-2-2,4-4-4", type=lambda s: s.split(","))
    parser.add_argument("--image-size", default=None, type=int,
                        help="square images of this size instead of the backbone's (small ones show the loop's own "
                             "cost; not with --runs, whose runs give theirs)")
    parser.add_argument("--infer-batches", default=None, type=number(many=True))
    parser.add_argument("--train-batches", default=None, type=number(many=True))
    parser.add_argument("--settings", default=None, type=lambda s: s.split(","),
                        help=f"inference settings: {', '.join(INFERENCE_SETTINGS)}")
    parser.add_argument("--train-settings", default="eager", type=lambda s: s.split(","),
                        help="training settings: eager, compile, cudagraphs (torch.compile, mode reduce-overhead), "
                             "for the plain loop and every module; compile_regularisers (only the regularisers)")
    parser.add_argument("--layouts", default="branches,grouped", type=lambda s: s.split(","),
                        help="how the trees run (inference and finetuning): branches (one after another), grouped "
                             "(each level's branches packed into grouped layers; rows '<split> grouped')")
    parser.add_argument("--epoch-steps", default=None, type=number(positive=False),
                        help="steps of the whole-epoch measurement (default: 100 on a GPU, 10 on a CPU; 0: none)")
    parser.add_argument("--repeats", default=10, type=number())
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--runs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="time the final networks of these finished train.py runs (inference only), each alone, "
                             "with separate branches")
    parser.add_argument("--costs", action="store_true",
                        help="only print params and FLOPs of --backbone (a comma list) for dense and --splits")
    parser.add_argument("--json", type=Path, help="also write the rows and the machine to this file")
    args = parser.parse_args(argv)
    # every tree shares one forward: with 8 recompiles (the default) the later trees and batch sizes ran eagerly
    torch._dynamo.config.recompile_limit = 64
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    if args.image_size is not None and (args.image_size < 1 or args.runs):
        parser.error(f"--image-size {args.image_size}: " + ("not with --runs, whose runs give their image size"
                                                            if args.runs else "must be a positive number of pixels"))
    unknown = set(args.backbone.split(",")) - set(BACKBONES)
    if unknown:
        parser.error(f"--backbone {', '.join(sorted(unknown))}: not one of {', '.join(sorted(BACKBONES))}")
    if not args.runs:
        check_splits(parser, args.backbone.split(","), args.splits)
    if args.costs:
        print(format_rows(cost_rows(args.backbone.split(","), args.splits, args.image_size)))
        return 0
    device = args.device
    gpu = device.type == "cuda"
    args.bf16 = args.channels_last = gpu  # as train.py has them by default
    args.epoch_steps = (100 if gpu else 10) if args.epoch_steps is None else args.epoch_steps
    args.infer_batches = args.infer_batches or ([1, 64, 1024] if gpu else [64])
    args.train_batches = args.train_batches or ([128, 512] if gpu else [32])
    args.settings = args.settings or (["eager", "channels_last", "compile"] + (["cudagraphs"] if gpu else []))
    for option, given, known in (("--settings", args.settings, INFERENCE_SETTINGS),
                                 ("--train-settings", args.train_settings, tuple(TRAIN_SETTINGS)),
                                 ("--layouts", args.layouts, LAYOUTS)):
        if set(given) - set(known):
            parser.error(f"{option} {', '.join(sorted(set(given) - set(known)))}: not one of {', '.join(known)}")
    if args.runs:
        parts = [run_inference_rows(args, device)]
    else:
        parts = ([] if args.skip_inference else [inference_rows(args, device)]) + (
            [] if args.skip_train else [training_rows(args, device)])
    tables = collect(itertools.chain(*parts), args.json, device, vars(args))
    if len(tables) > 1:
        print("\nall tables\n" + format_rows([row for table in tables for row in table]))
    return 0


def collect(tables: Iterable[list[dict]], path: Path | None, device: torch.device, command: dict) -> list[list[dict]]:
    """The ``tables``, each printed as it comes and, with ``path``, every row so far written there with the date, the
    machine and the command (so a run cut short keeps what it measured; not the path itself, a path of the machine)."""
    command = {key: value for key, value in command.items() if key != "json"}
    done: list[list[dict]] = []
    rows: list[dict] = []
    for table in tables:
        done.append(table)
        rows += table
        print(format_rows(table), flush=True)
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"date": str(date.today()), "device": device_name(device),
                                        "torch": torch.__version__, "command": command, "rows": rows},
                                       indent=2, default=str))
    return done


if __name__ == "__main__":
    raise SystemExit(main())
