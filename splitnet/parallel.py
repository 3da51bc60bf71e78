"""Branch-parallel inference: the trunk on one device, the branches (or subtrees) spread over several, run concurrently.

After the trunk the branches share nothing, so each runs on its own device (a CUDA stream per branch on a
GPU, a thread per device on CPUs) and only the logits come back, in class order.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from splitnet.bench import (BACKBONES, balanced_tree, bf16_autocast, check_splits, collect, device_arg, device_name,
                            number, throughputs)
from splitnet.grouped import GroupedTree, separate_branches
from splitnet.report import count_flops, format_rows
from splitnet.tree import Branch, SplitTree, select_channels


def split_tree(net: nn.Module, caller: str) -> SplitTree:
    """``net`` as a tree of separate branches (a ``GroupedTree`` unpacked); a dense network is refused for ``caller``."""
    tree = separate_branches(net)
    if not isinstance(tree, SplitTree):
        raise TypeError(f"{caller} needs a split tree, and {type(net).__name__} is a dense network (from a checkpoint "
                        "written before the split, in group learning?)")
    return tree


def parallel_units(tree: SplitTree, count: int) -> list[list[int]]:
    """Paths (child indices from the roots) of the subtrees to distribute: the first tree level with at least
    ``count`` nodes, else the shallowest level with the most nodes. Everything above them is shared work done on
    the first device."""
    levels = [[[i] for i in range(len(tree.branches))]]
    while deeper := [path + [c] for path in levels[-1] for c in range(len(_node(tree, path).subbranches))]:
        levels.append(deeper)
    enough = [level for level in levels if len(level) >= count]
    return enough[0] if enough else max(levels, key=len)


def _node(tree: SplitTree, path: list[int]) -> Branch:
    node = tree.branches[path[0]]
    for index in path[1:]:
        node = node.subbranches[index]
    return node


def balanced_placement(costs: Sequence[float], devices: int) -> list[int]:
    """Assign units to devices, largest first onto the least-loaded device (longest-processing-time rule)."""
    loads, placement = [0.0] * devices, [0] * len(costs)
    for unit in sorted(range(len(costs)), key=lambda u: -costs[u]):
        device = min(range(devices), key=loads.__getitem__)
        placement[unit] = device
        loads[device] += costs[unit]
    return placement


class _Shared(nn.Module):
    """The trunk plus every branch body above the units; returns each unit's input channels, selected here so that
    only those travel to the unit's device."""

    def __init__(self, tree: SplitTree, units: list[list[int]]) -> None:
        super().__init__()
        self.trunk = tree.trunk
        self.units = units
        prefixes = sorted({tuple(path[:depth]) for path in units for depth in range(1, len(path))})
        self.bodies = nn.ModuleDict({_key(p): _StemOf(_node(tree, list(p))) for p in prefixes})
        self.selections = nn.ModuleList(_Selection(_node(tree, path)) for path in units)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = {(): self.trunk(x)}
        outputs = []
        for path, selection in zip(self.units, self.selections):
            for depth in range(1, len(path)):
                prefix = tuple(path[:depth])
                if prefix not in features:
                    features[prefix] = self.bodies[_key(prefix)](features[prefix[:-1]])
            outputs.append(selection(features[tuple(path[:-1])]))
        return outputs


def _key(prefix: tuple[int, ...]) -> str:
    return "_".join(map(str, prefix))


class _Selection(nn.Module):
    """A branch's input channel selection, on its own."""

    def __init__(self, branch: Branch) -> None:
        super().__init__()
        self.register_buffer("in_index", branch.in_index, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x if self.in_index is None else select_channels(x, self.in_index)


class _StemOf(nn.Module):
    """A branch's own input selection and body, without its sub-branches."""

    def __init__(self, branch: Branch) -> None:
        super().__init__()
        self.selection = _Selection(branch)
        self.body = branch.body

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.selection(x))


class _Unit(nn.Module):
    """One subtree as a part of its own, its leaves' logits concatenated. With ``selected`` its input holds only
    the subtree's own channels (selected where they were made); otherwise its parent's whole output."""

    def __init__(self, branch: Branch, selected: bool = False) -> None:
        super().__init__()
        self.branch, self.selected = branch, selected

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(self.branch.from_selected(x) if self.selected else self.branch(x), 1)


@dataclass(frozen=True)
class Placement:
    units: list[list[int]]
    devices: list[int]
    costs: list[float]


TRUNK_MODES = ("first", "split")


class BranchParallel(nn.Module):
    """Run a split tree with its subtrees on ``devices``; the output equals the tree's (same classes, same order). A
    ``GroupedTree`` is unpacked into its branches first.

    Subtrees are placed by their FLOPs so that the devices carry even loads. ``trunk="first"`` runs the shared part
    (the trunk, and for hierarchical splits the bodies above the subtrees) on the first device; ``"split"``
    replicates it on every device, each running it on its slice of the batch, and every subtree gathers its
    channels from all slices.
    """

    def __init__(self, tree: SplitTree | GroupedTree, devices: Sequence[str | torch.device],
                 image_shape: tuple[int, ...], trunk: str = "first") -> None:
        super().__init__()
        if trunk not in TRUNK_MODES:
            raise ValueError(f"trunk={trunk!r}: not one of {', '.join(TRUNK_MODES)}")
        if not devices:
            raise ValueError("devices=[]: BranchParallel needs at least one device")
        self.devices = [torch.device(d) for d in devices]
        self.trunk = trunk
        tree = copy.deepcopy(split_tree(tree, "BranchParallel")).eval()
        units = parallel_units(tree, len(self.devices))
        parts = [_Unit(_node(tree, path), selected=True).eval() for path in units]
        costs = [float(count_flops(part, _unit_input_shape(tree, path, image_shape)))
                 for part, path in zip(parts, units)]
        self.placement = Placement(units, balanced_placement(costs, len(self.devices)), costs)
        shared = _Shared(tree, units).to(self.devices[0])
        replicas = self.devices if trunk == "split" else self.devices[:1]
        self.replicas = nn.ModuleList([shared] + [copy.deepcopy(shared).to(d) for d in replicas[1:]])
        self.units = nn.ModuleList(part.to(self.devices[d]) for part, d in zip(parts, self.placement.devices))
        order = torch.cat([leaf.classes.cpu() for path in units for leaf in _node(tree, path).leaves()])
        self.register_buffer("class_index", torch.argsort(order).to(self.devices[0]), persistent=False)
        self._pool = ThreadPoolExecutor(max_workers=max(len(self.units), len(self.replicas)))
        self._unit_streams = [_side_stream(self._device(u)) for u in range(len(self.units))]
        self._replica_streams = [_side_stream(d) for d in replicas]
        self.eval()

    @property
    def shared(self) -> nn.Module:
        """The shared part on the first device."""
        return self.replicas[0]

    def _device(self, unit: int) -> torch.device:
        return self.devices[self.placement.devices[unit]]

    def _run_replica(self, index: int, x: Tensor, ready: torch.cuda.Event | None,
                     modes: dict[str, tuple[bool, torch.dtype]]) -> tuple[list[Tensor], torch.cuda.Event | None]:
        """The shared part on device ``index`` for its slice ``x`` of the batch; its units' inputs and a done event."""
        device, stream = self.devices[index], self._replica_streams[index]
        with _worker_modes(device, modes), _on(stream, ready):
            inputs = self.replicas[index](x.to(device, non_blocking=True))
            return inputs, _recorded(stream)

    def _run_unit(self, index: int, slices: list[Tensor], done: list[torch.cuda.Event | None],
                  modes: dict[str, tuple[bool, torch.dtype]]) -> Tensor:
        """Unit ``index`` on its input gathered from every slice of the batch; its logits on the first device."""
        device, stream = self._device(index), self._unit_streams[index]
        with _worker_modes(device, modes), _on(stream, *done):
            if stream is not None:
                for part in slices:  # made on another stream: not to be freed before this one has read it
                    part.record_stream(stream)
            x = torch.cat([part.to(device, non_blocking=True) for part in slices])
            return self.units[index](x).to(self.devices[0], non_blocking=True)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.devices[0])
        ready = _recorded(torch.cuda.current_stream(self.devices[0])) if self.devices[0].type == "cuda" else None
        modes = {kind: (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
                 for kind in {d.type for d in self.devices}}
        chunks = torch.tensor_split(x, len(self.replicas))
        replicas = [self._pool.submit(self._run_replica, i, chunk, ready, modes) for i, chunk in enumerate(chunks)]
        sliced, done = zip(*(f.result() for f in replicas))
        futures = [self._pool.submit(self._run_unit, u, [inputs[u] for inputs in sliced], list(done), modes)
                   for u in range(len(self.units))]
        outputs = [f.result() for f in futures]
        if self.devices[0].type == "cuda":
            main = torch.cuda.current_stream(self.devices[0])
            for stream, out in zip(self._unit_streams, outputs):
                if stream is not None:
                    main.wait_stream(stream)
                    out.record_stream(main)  # made on a side stream, consumed and freed on the main one
        return torch.cat(outputs, 1).index_select(1, self.class_index)


def _side_stream(device: torch.device) -> torch.cuda.Stream | None:
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def _recorded(stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


@contextlib.contextmanager
def _on(stream: torch.cuda.Stream | None, *events: torch.cuda.Event | None) -> Iterator[None]:
    """Work on ``stream`` (if any) once ``events`` have happened."""
    if stream is None:
        yield
        return
    with torch.cuda.stream(stream):
        for event in events:
            if event is not None:
                stream.wait_event(event)
        yield


@contextlib.contextmanager
def _worker_modes(device: torch.device, modes: dict[str, tuple[bool, torch.dtype]]) -> Iterator[None]:
    """No grad and the caller's autocast, in a worker thread (both are per thread)."""
    enabled, dtype = modes[device.type]
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=enabled):
        yield


def _unit_input_shape(tree: SplitTree, path: list[int], image_shape: tuple[int, ...]) -> tuple[int, ...]:
    with torch.no_grad():
        param = next(tree.parameters())
        inputs = _Shared(tree, [path])(torch.zeros(1, *image_shape, device=param.device, dtype=param.dtype))[0]
    return tuple(inputs.shape[1:])


@dataclass(frozen=True)
class PartTimes:
    """Measured seconds per batch: the shared part (trunk and bodies above the units) and each unit, on one device,
    and the bytes of each unit's input (what moves to another device)."""

    shared: float
    units: list[float]
    input_bytes: list[int]


def measure_parts(model: BranchParallel, images: Tensor, repeats: int = 10) -> PartTimes:
    """Time the shared part and each unit one after another on the first device (median of ``repeats``)."""
    device = model.devices[0]
    with torch.no_grad():
        images = images.to(device)
        inputs = model.shared(images)
        units = [copy.deepcopy(unit).to(device) for unit in model.units]
        steps = {"shared": lambda: model.shared(images)} | {
            i: (lambda u=u, x=x: u(x)) for i, (u, x) in enumerate(zip(units, inputs))
        }
        seconds = {name: 1.0 / per_s for name, per_s in throughputs(steps, 1, device, repeats).items()}
    return PartTimes(shared=seconds["shared"], units=[seconds[i] for i in range(len(units))],
                     input_bytes=[x.numel() * x.element_size() for x in inputs])


def predict_speedup(times: PartTimes, placement: Sequence[int], devices: int, bandwidth: float,
                    trunk: str = "first") -> float:
    """Speedup of ``devices`` devices over one: the shared part, then the busiest device (its units plus the
    transfer of their inputs at ``bandwidth`` bytes/s). With ``trunk="first"`` the shared part runs on the first
    device and the inputs of units elsewhere travel whole; with ``"split"`` every device runs it on its share of the
    batch, and each unit's input arrives from the other devices' shares."""
    loads = [0.0] * devices
    for unit, device in enumerate(placement):
        moved = (devices - 1) / devices if trunk == "split" else float(device != 0)
        loads[device] += times.units[unit] + moved * times.input_bytes[unit] / bandwidth
    shared = times.shared / devices if trunk == "split" else times.shared
    return (times.shared + sum(times.units)) / (shared + max(loads))


def speed_rows(tree: SplitTree, image_shape: tuple[int, ...], batch: int, device: torch.device,
               device_counts: Sequence[int], bandwidth: float, repeats: int) -> list[dict]:
    """For each device count k: the tree's time on one device, its parts' times, the speedups the model predicts on
    k devices at ``bandwidth`` bytes/s (shared part on the first device, and split over all), and those measured
    on the one device with k streams (threads on a CPU).

    The threaded runs come last: on a CPU, worker threads that have run keep intra-op thread pools of their own,
    which would slow every later measurement in the calling thread.
    """
    images = torch.randn(batch, *image_shape, device=device).contiguous(memory_format=torch.channels_last)
    tree = copy.deepcopy(tree).to(device, memory_format=torch.channels_last).eval()
    models = {(count, trunk): BranchParallel(tree, [device] * count, image_shape, trunk)
              for count in device_counts for trunk in TRUNK_MODES}
    tree_s = batch / throughputs({"tree": lambda: tree(images)}, batch, device, repeats)["tree"]
    parts = {count: measure_parts(models[count, "first"], images, repeats) for count in device_counts}
    threaded = throughputs({key: (lambda m=model: m(images)) for key, model in models.items()}, batch, device,
                           repeats)
    rows = []
    for count in device_counts:
        times, placement = parts[count], models[count, "first"].placement.devices
        moved = sum(b for b, d in zip(times.input_bytes, placement) if d)
        rows.append({
            "devices": count, "units": len(times.units), "tree_ms": round(1e3 * tree_s, 2),
            "shared_ms": round(1e3 * times.shared, 2), "unit_ms": " ".join(f"{1e3 * t:.2f}" for t in times.units),
            "moved_MB": round(moved / 1e6, 3),
            "predicted": round(predict_speedup(times, placement, count, bandwidth), 3),
            "predicted_no_transfer": round(predict_speedup(times, placement, count, float("inf")), 3),
            "predicted_split_trunk": round(predict_speedup(times, placement, count, bandwidth, "split"), 3),
            "one_device_streams": round(threaded[count, "first"] * tree_s / batch, 3),
            "one_device_streams_split_trunk": round(threaded[count, "split"] * tree_s / batch, 3),
        })
    return rows


# 2: the trunk part returns each branch's own input channels (1: its whole output)
EXPORT_FORMAT = 2


def export_parts(tree: SplitTree | GroupedTree, example: Tensor, out_dir: Path, onnx: bool = False) -> Path:
    """Export the trunk and each top-level branch separately with a free batch size: ``trunk.pt2`` (the trunk,
    returning each branch's own input channels, so that only those travel to it) and ``branch<i>.pt2`` (torch.export),
    with ``onnx`` also ``trunk.onnx`` (outputs ``branch<i>``) and ``branch<i>.onnx``, and a manifest holding the class
    order. A ``GroupedTree`` is unpacked into its branches first."""
    tree = copy.deepcopy(split_tree(tree, "export_parts")).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    if example.shape[0] < 2:  # torch.export specialises a batch of one; two keep the batch dimension free
        example = example.expand(2, *example.shape[1:]).contiguous()
    names = [f"branch{i}" for i in range(len(tree.branches))]
    parts = {"trunk": _Shared(tree, [[i] for i in range(len(names))]).eval(),
             **{name: _Unit(branch, selected=True).eval() for name, branch in zip(names, tree.branches)}}
    batch = {0: torch.export.Dim("batch", min=1)}
    with torch.no_grad():
        branch_inputs = dict(zip(names, parts["trunk"](example)))
        for name, part in parts.items():
            inputs = (example if name == "trunk" else branch_inputs[name],)
            torch.export.save(torch.export.export(part, inputs, dynamic_shapes=(batch,)), out_dir / f"{name}.pt2")
            if onnx:
                torch.onnx.export(part, inputs, out_dir / f"{name}.onnx", dynamo=True, dynamic_shapes=(batch,),
                                  input_names=["input"], output_names=names if name == "trunk" else ["output"],
                                  external_data=False, verbose=False)
    manifest = {"format": EXPORT_FORMAT, "branches": len(tree.branches), "class_index": tree.class_index.tolist()}
    (out_dir / "manifest.json").write_text(json.dumps(manifest))
    return out_dir


def _manifest(directory: Path) -> dict:
    path = directory / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a directory written by export_parts")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{directory} was exported in format {manifest.get('format', 1)}, this version reads format "
                         f"{EXPORT_FORMAT} (its trunk hands each branch only its own channels): export it again")
    return manifest


class ExportedTree(nn.Module):
    """A tree reassembled from ``export_parts``' torch.export files: what a server would load, one part per
    device or process."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        manifest = _manifest(directory)
        self.trunk = torch.export.load(directory / "trunk.pt2").module()
        self.branches = nn.ModuleList(
            torch.export.load(directory / f"branch{i}.pt2").module() for i in range(manifest["branches"])
        )
        self.register_buffer("class_index", torch.tensor(manifest["class_index"]), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        branch_inputs = self.trunk(x)
        logits = [branch(inputs) for branch, inputs in zip(self.branches, branch_inputs, strict=True)]
        return torch.cat(logits, 1).index_select(1, self.class_index)


class OnnxTree:
    """The same tree from ``export_parts``' ONNX files, run by onnxruntime: one session per part, each with its
    own execution providers (e.g. a branch per GPU with ``CUDAExecutionProvider`` and its ``device_id``)."""

    def __init__(self, directory: Path, providers: Sequence | None = None) -> None:
        import onnxruntime

        manifest = _manifest(directory)
        names = ["trunk", *(f"branch{i}" for i in range(manifest["branches"]))]
        self.sessions = {
            name: onnxruntime.InferenceSession(directory / f"{name}.onnx", providers=providers) for name in names
        }
        self.class_index = manifest["class_index"]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Logits (N x classes, class order) for float32 images (N x C x H x W)."""
        branch_inputs = self.sessions["trunk"].run(None, {"input": images})
        logits = [self.sessions[f"branch{i}"].run(None, {"input": inputs})[0] for i, inputs in enumerate(branch_inputs)]
        return np.concatenate(logits, 1)[:, self.class_index]


def main(argv: list[str] | None = None) -> int:
    """``python -m splitnet.parallel``: the branch-parallel speed model for balanced split trees, one table.

    Per split and device count k: the single-device tree time, the shared part and each unit (one after another
    on one device), the activation megabytes sent to the other devices, the speedup predicted for k devices at
    --bandwidth (the shared part on the first device, the same with free transfers, and the shared part split
    over the devices by batch), and, as a check, the speedups BranchParallel measures in both trunk modes on the
    one device with k streams (on a GPU) or threads (on a CPU), where the parts compete for the same device.
    """
    parser = argparse.ArgumentParser(prog="python -m splitnet.parallel", description=main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_arg)
    parser.add_argument("--backbone", default="wrn16_8", choices=sorted(BACKBONES))
    parser.add_argument("--splits", default="2-2-2,4-4-4,8-8-8", type=lambda s: s.split(","))
    parser.add_argument("--batch", type=number(), help="images per batch (default: 1024 on a GPU, 64 on a CPU)")
    parser.add_argument("--devices", default="2,4,8", type=number(many=True),
                        help="device counts to predict for")
    parser.add_argument("--bandwidth", default=50.0, type=number(float),
                        help="GB/s between devices (default 50: PCIe 5.0 x16; NVLink 4 carries about 450)")
    parser.add_argument("--repeats", default=20, type=number())
    parser.add_argument("--json", type=Path, help="also write the rows and the machine to this file")
    args = parser.parse_args(argv)
    check_splits(parser, [args.backbone], args.splits)
    device = args.device
    batch = args.batch if args.batch is not None else 1024 if device.type == "cuda" else 64
    config, shape, classes = BACKBONES[args.backbone]
    dense = instantiate(config, num_classes=classes).eval()
    tables = ([{"model": args.backbone, "split": split, "batch": batch} | row for row in speed_rows(
        balanced_tree(dense, split), shape, batch, device, args.devices, args.bandwidth * 1e9, args.repeats)]
        for split in args.splits)
    with torch.inference_mode(), bf16_autocast(device, bf16=device.type == "cuda"):
        done = collect(tables, args.json, device, vars(args))  # one table per split
    print(f"\n{device_name(device)}, bandwidth {args.bandwidth:g} GB/s")
    if len(done) > 1:
        print("all tables\n" + format_rows([row for table in done for row in table]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
