"""Branch-parallel inference: the trunk on one device, the branches (or subtrees) spread over several, run concurrently.

After the trunk the branches share nothing, so each runs on its own device (a CUDA stream per branch on a
GPU, a thread per device on CPUs) and only the logits come back, in class order.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from splitnet.report import count_flops
from splitnet.tree import Branch, SplitTree, select_channels


def parallel_units(tree: SplitTree, count: int) -> list[list[int]]:
    """Paths (child indices from the roots) of the subtrees to distribute: the first tree level with at least
    ``count`` nodes, or the leaves. Everything above them is shared work done on the first device."""
    level = [[i] for i in range(len(tree.branches))]
    while len(level) < count:
        deeper = [path + [c] for path in level for c in range(len(_node(tree, path).subbranches))]
        if not deeper:
            break
        level = deeper
    return level


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
    """The trunk plus every branch body above the units; returns each unit's input."""

    def __init__(self, tree: SplitTree, units: list[list[int]]) -> None:
        super().__init__()
        self.trunk = tree.trunk
        self.units = units
        prefixes = sorted({tuple(path[:depth]) for path in units for depth in range(1, len(path))})
        self.bodies = nn.ModuleDict({_key(p): _StemOf(_node(tree, list(p))) for p in prefixes})

    def forward(self, x: Tensor) -> list[Tensor]:
        features = {(): self.trunk(x)}
        outputs = []
        for path in self.units:
            for depth in range(1, len(path)):
                prefix = tuple(path[:depth])
                if prefix not in features:
                    features[prefix] = self.bodies[_key(prefix)](features[prefix[:-1]])
            outputs.append(features[tuple(path[:-1])])
        return outputs


def _key(prefix: tuple[int, ...]) -> str:
    return "_".join(map(str, prefix))


class _StemOf(nn.Module):
    """A branch's own input selection and body, without its sub-branches."""

    def __init__(self, branch: Branch) -> None:
        super().__init__()
        self.body = branch.body
        self.register_buffer("in_index", branch.in_index, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x if self.in_index is None else select_channels(x, self.in_index))


class _Unit(nn.Module):
    """One distributed subtree: its input from the shared part, its leaves' logits concatenated."""

    def __init__(self, branch: Branch) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(self.branch(x), 1)


@dataclass(frozen=True)
class Placement:
    units: list[list[int]]
    devices: list[int]
    costs: list[float]


class BranchParallel(nn.Module):
    """Run a split tree with its subtrees on ``devices``; the output equals the tree's (same classes, same order).

    Subtrees are placed by their FLOPs so that the devices carry even loads.
    """

    def __init__(self, tree: SplitTree, devices: Sequence[str | torch.device], image_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.devices = [torch.device(d) for d in devices]
        tree = copy.deepcopy(tree).eval()
        units = parallel_units(tree, len(self.devices))
        costs = [
            float(count_flops(_Unit(_node(tree, path)).eval(), _unit_input_shape(tree, path, image_shape)))
            for path in units
        ]
        self.placement = Placement(units, balanced_placement(costs, len(self.devices)), costs)
        self.shared = _Shared(tree, units).to(self.devices[0])
        self.units = nn.ModuleList(
            _Unit(_node(tree, path)).to(self.devices[d]) for path, d in zip(units, self.placement.devices)
        )
        order = torch.cat([leaf.classes.cpu() for path in units for leaf in _node(tree, path).leaves()])
        self.register_buffer("class_index", torch.argsort(order).to(self.devices[0]), persistent=False)
        self._pool = ThreadPoolExecutor(max_workers=len(self.units))
        self._streams = [torch.cuda.Stream(self.devices[d]) if self.devices[d].type == "cuda" else None
                         for d in self.placement.devices]
        self.eval()

    def _run_unit(self, index: int, x: Tensor, ready: torch.cuda.Event | None) -> Tensor:
        device, stream = self.devices[self.placement.devices[index]], self._streams[index]
        if stream is None:
            return self.units[index](x.to(device)).to(self.devices[0])
        with torch.cuda.stream(stream):
            if ready is not None:
                stream.wait_event(ready)
            out = self.units[index](x.to(device, non_blocking=True))
            return out.to(self.devices[0], non_blocking=True)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        inputs = self.shared(x.to(self.devices[0]))
        ready = None
        if self.devices[0].type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.devices[0]))
        futures = [self._pool.submit(self._run_unit, i, inp, ready) for i, inp in enumerate(inputs)]
        outputs = [f.result() for f in futures]
        main = torch.cuda.current_stream(self.devices[0]) if self.devices[0].type == "cuda" else None
        for stream, out in zip(self._streams, outputs):
            if stream is not None:
                main.wait_stream(stream)
                out.record_stream(main)  # made on a side stream, consumed and freed on the main one
        return torch.cat(outputs, 1).index_select(1, self.class_index)


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

    def timed(fn) -> float:
        samples = []
        for _ in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples.append(time.perf_counter() - start)
        return statistics.median(samples[1:])

    with torch.no_grad():
        images = images.to(device)
        inputs = model.shared(images)
        units = [copy.deepcopy(unit).to(device) for unit in model.units]
        return PartTimes(
            shared=timed(lambda: model.shared(images)),
            units=[timed(lambda u=u, x=x: u(x)) for u, x in zip(units, inputs)],
            input_bytes=[x.numel() * x.element_size() for x in inputs],
        )


def predict_speedup(times: PartTimes, placement: Sequence[int], devices: int, bandwidth: float) -> float:
    """Speedup of ``devices`` devices over one: the shared part, then the busiest device (its units plus the
    transfer of their inputs at ``bandwidth`` bytes/s when it is not the first device)."""
    loads = [0.0] * devices
    for unit, device in enumerate(placement):
        loads[device] += times.units[unit] + (times.input_bytes[unit] / bandwidth if device else 0.0)
    return (times.shared + sum(times.units)) / (times.shared + max(loads))


def export_parts(tree: SplitTree, example: Tensor, out_dir: Path, onnx: bool = False) -> Path:
    """Export the trunk and each top-level branch separately with a free batch size: ``trunk.pt2`` and
    ``branch<i>.pt2`` (torch.export), with ``onnx`` also ``trunk.onnx`` and ``branch<i>.onnx``, and a manifest
    holding the class order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tree = copy.deepcopy(tree).eval()
    if example.shape[0] < 2:  # torch.export specialises a batch of one; two keep the batch dimension free
        example = example.expand(2, *example.shape[1:]).contiguous()
    parts = {"trunk": tree.trunk, **{f"branch{i}": _Unit(branch).eval() for i, branch in enumerate(tree.branches)}}
    batch = {0: torch.export.Dim("batch", min=1)}
    with torch.no_grad():
        features = tree.trunk(example)
        for name, part in parts.items():
            inputs = (example if name == "trunk" else features,)
            torch.export.save(torch.export.export(part, inputs, dynamic_shapes=(batch,)), out_dir / f"{name}.pt2")
            if onnx:
                torch.onnx.export(part, inputs, out_dir / f"{name}.onnx", dynamo=True, dynamic_shapes=(batch,),
                                  input_names=["input"], output_names=["output"], external_data=False,
                                  verbose=False)
    manifest = {"branches": len(tree.branches), "class_index": tree.class_index.tolist()}
    (out_dir / "manifest.json").write_text(json.dumps(manifest))
    return out_dir


def _manifest(directory: Path) -> dict:
    path = directory / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a directory written by export_parts")
    return json.loads(path.read_text())


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
        features = self.trunk(x)
        return torch.cat([branch(features) for branch in self.branches], 1).index_select(1, self.class_index)


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
        features = self.sessions["trunk"].run(None, {"input": images})[0]
        logits = [session.run(None, {"input": features})[0] for name, session in self.sessions.items()
                  if name != "trunk"]
        return np.concatenate(logits, 1)[:, self.class_index]
