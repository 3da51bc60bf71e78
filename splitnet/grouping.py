"""Soft class/feature-to-group assignments and the three SplitNet regularisers (method.md, "Regularisers")."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splitnet.plan import SplitPlan
from splitnet.surgery import assign_balanced

_TINY = torch.finfo(torch.float32).tiny
_GRAD_FLOOR = 1e-12  # the least RMS an assignment's gradient is divided by: a zero gradient stays zero


def _sqrt(x: Tensor) -> Tensor:
    """Square root with a finite gradient at zero (the group lasso of an exactly zero block)."""
    return x.clamp_min(_TINY).sqrt()


def disjoint_costs(q: Tensor, segments: Tensor) -> Tensor:
    """T of K groupings side by side: ``q`` is G x D (their columns, each a softmax over the G groups) and
    ``segments`` D x K (1 where a column belongs to a grouping). Per grouping, T = sum_{g>h} <q_g, q_h> /
    (D (G-1) / (2G)): 1 for uniform columns, 0 for one-hot ones. With columns summing to one, the pairs' sum is
    (D - |q|^2) / 2."""
    groups = q.shape[0]
    dims = segments.sum(0)
    squares = q.square().sum(0) @ segments
    return (dims - squares) * (groups / (groups - 1)) / dims


def balance_costs(q: Tensor, segments: Tensor) -> Tensor:
    """U of K groupings side by side (as in ``disjoint_costs``): sum_g (sum_d q_g[d])^2 / (D^2 / G) per grouping,
    1 for equal group sizes, G when all its columns are in one group."""
    groups = q.shape[0]
    dims = segments.sum(0)
    return (q @ segments).square().sum(0) * groups / dims.square()


def weight_energy(weight: Tensor) -> Tensor:
    """M[o, i]: the squared weight from input i to output o, averaged over the kernel taps (shape O x I)."""
    squared = weight.square()
    return squared.mean(tuple(range(2, weight.dim()))) if weight.dim() > 2 else squared


def group_weight_scales(groups: int, inputs: int, outputs: int, taps: int) -> tuple[float, float]:
    """The factors of one layer's input sum and output sum in S: S's normaliser 2 (G-1) std / G, std = sqrt(1 /
    (taps I)) the weights' initial scale, with the inputs' 1 / (I sqrt O) and the outputs' 1 / (sqrt I O)."""
    init_std = math.sqrt(1.0 / (taps * inputs))
    scale = groups / (2 * (groups - 1) * init_std)
    return scale / (inputs * math.sqrt(outputs)), scale / (math.sqrt(inputs) * outputs)


def group_weight_costs(energy: Tensor, p: Tensor, q: Tensor, rows_scale: Tensor, cols_scale: Tensor) -> Tensor:
    """S of L layers at once: the normalised group lasso on each layer's off-block-diagonal weights.

    ``energy`` (L x O x I) holds each layer's ``weight_energy``, zero-padded to common sizes; ``p`` (L x G x I) the
    soft groupings of its inputs and ``q`` (L x G x O) of its outputs, padded with ones, so that padding adds
    nothing. Input i's term for group g is sqrt(sum_o q[g, o]^2 M[o, i]) (1 - p[g, i]) (the square root of a product
    of squares; the assignments lie in [0, 1]), and output o's alike; ``rows_scale`` and ``cols_scale`` (L) weigh
    each layer's two sums (``group_weight_scales``).
    """
    rows = (_sqrt(q.square() @ energy) * (1 - p)).sum((1, 2))
    cols = (_sqrt(p.square() @ energy.transpose(1, 2)) * (1 - q)).sum((1, 2))
    return rows * rows_scale + cols * cols_scale


@dataclass(frozen=True)
class RegulariserTerms:
    """The three regularisers, each averaged over its terms."""

    disjoint: Tensor
    group_weight: Tensor
    balance: Tensor


@dataclass(frozen=True)
class _SplitLayer:
    """A split layer: its path in the dense network and the (level, name) of its input and output groupings."""

    path: str
    inputs: tuple[int, str]
    outputs: tuple[int, str]


class _CountGroupings(nn.Module):
    """The free groupings of one group count side by side: one softmax and one ``disjoint_costs`` /
    ``balance_costs`` call serve them all."""

    def __init__(self, keys: list[str], dims: list[int]) -> None:
        super().__init__()
        self.keys = keys
        self.starts = list(itertools.accumulate(dims, initial=0))
        segments = torch.zeros(self.starts[-1], len(keys))
        for k in range(len(keys)):
            segments[self.starts[k]:self.starts[k + 1], k] = 1
        self.register_buffer("segments", segments, persistent=False)

    def columns(self, logits: nn.ParameterDict) -> Tensor:
        """G x D: every grouping's softmax over the groups, side by side."""
        return torch.softmax(torch.cat([logits[key] for key in self.keys], 1), 0)

    def split(self, columns: Tensor) -> dict[str, Tensor]:
        return {key: columns[:, self.starts[k]:self.starts[k + 1]] for k, key in enumerate(self.keys)}


class _LayerBucket(nn.Module):
    """The split layers of the levels of one group count, padded to common sizes so that one ``group_weight_costs``
    call serves them all: their weights' paths and padding, and where their assignments' columns come from."""

    def __init__(self, groups: int, layers: list[_SplitLayer], model: nn.Module) -> None:
        super().__init__()
        self.groups = groups
        self.paths = [layer.path for layer in layers]
        shapes = [model.get_submodule(path).weight.shape for path in self.paths]
        self.outputs, self.inputs = max(shape[0] for shape in shapes), max(shape[1] for shape in shapes)
        self.pads = [(0, self.inputs - shape[1], 0, self.outputs - shape[0]) for shape in shapes]
        # the layers' groupings side by side, then one column of ones that pads every layer's assignments
        sizes: dict[tuple[int, str], int] = {}
        for layer, shape in zip(layers, shapes):
            sizes[layer.inputs], sizes[layer.outputs] = shape[1], shape[0]
        self.groupings = list(sizes)
        starts = dict(zip(sizes, itertools.accumulate(sizes.values(), initial=0)))
        ones = sum(sizes.values())

        def index(grouping: tuple[int, str], padded: int) -> Tensor:
            size = sizes[grouping]
            return torch.cat([torch.arange(size) + starts[grouping], torch.full((padded - size,), ones)])

        self.register_buffer("in_index", torch.cat([index(layer.inputs, self.inputs) for layer in layers]),
                             persistent=False)
        self.register_buffer("out_index", torch.cat([index(layer.outputs, self.outputs) for layer in layers]),
                             persistent=False)
        scales = [group_weight_scales(groups, shape[1], shape[0], math.prod(shape[2:])) for shape in shapes]
        self.register_buffer("rows_scale", torch.tensor([rows for rows, _ in scales]), persistent=False)
        self.register_buffer("cols_scale", torch.tensor([cols for _, cols in scales]), persistent=False)
        self.register_buffer("ones", torch.ones(groups, 1), persistent=False)

    def costs(self, model: nn.Module, groupings: dict[tuple[int, str], Tensor]) -> Tensor:
        """S of every layer of the bucket (L); ``groupings`` holds the G x D assignment of each of its groupings."""
        columns = torch.cat([*(groupings[grouping] for grouping in self.groupings), self.ones], 1)
        count = len(self.paths)
        p = columns.index_select(1, self.in_index).view(self.groups, count, self.inputs).transpose(0, 1)
        q = columns.index_select(1, self.out_index).view(self.groups, count, self.outputs).transpose(0, 1)
        energies = [weight_energy(model.get_submodule(path).weight) for path in self.paths]
        energy = torch.stack([F.pad(m, pad) if any(pad) else m for m, pad in zip(energies, self.pads)])
        return group_weight_costs(energy, p, q, self.rows_scale, self.cols_scale)


class GroupAssignments(nn.Module):
    """Learned soft groupings of every split level: ``softmax(alpha, dim=0)`` over G x D logits, alpha ~ N(0, 0.01^2).

    They never enter the forward pass; the regularisers couple them to the network's weights. The regularisers are
    computed for all groupings, and all layers, of one group count at once: beyond each layer's weight energy, a
    fixed number of operations whatever the number of layers (on a GPU each operation is a kernel launch, and
    small ones are bound by the launches, not by their arithmetic).
    """

    def __init__(self, plan: SplitPlan, groups: tuple[int, ...], model: nn.Module) -> None:
        """``model``: the dense network the plan describes (its layers' shapes)."""
        super().__init__()
        self.plan = plan
        self.groups = groups
        free = plan.free_groupings(model, groups)
        self.logits = nn.ParameterDict(
            {key: nn.Parameter(torch.randn(count, size) * 0.01) for key, (count, size) in free.items()}
        )
        self.free_by_count = nn.ModuleList()
        for count in sorted({count for count, _ in free.values()}):
            keys = [key for key, (key_count, _) in free.items() if key_count == count]
            self.free_by_count.append(_CountGroupings(keys, [free[key][1] for key in keys]))
        layers: dict[int, list[_SplitLayer]] = {}
        for index, level in enumerate(plan.levels):
            if groups[index] > 1:
                layers.setdefault(groups[index], []).extend(
                    _SplitLayer(f"{level.module}.{name}", (index, in_name), (index, out_name))
                    for name, (in_name, out_name) in level.layers.items()
                )
        self.layer_buckets = nn.ModuleList(_LayerBucket(count, members, model) for count, members in layers.items())

    def probabilities(self) -> dict[str, Tensor]:
        """Each free grouping's G x D soft assignment."""
        probs = {key: q for free in self.free_by_count for key, q in free.split(free.columns(self.logits)).items()}
        return {key: probs[key] for key in self.logits}

    @torch.no_grad()
    def commit(self, sharpness: float = 20.0) -> None:
        """Harden every free grouping to its balanced hard groups: ``alpha = sharpness * one_hot`` (within (G-1) e^-20
        of one-hot)."""
        for alpha in self.logits.values():
            labels = assign_balanced(torch.softmax(alpha, 0))
            alpha.copy_(sharpness * F.one_hot(labels.to(alpha.device), alpha.shape[0]).T.to(alpha.dtype))

    @torch.no_grad()
    def normalise_gradients(self) -> None:
        """Rescale each free grouping's gradient to unit RMS, so that a step moves its logits by the learning rate
        whatever the size of the regularisers' gradient (about 1/D per entry); the direction is kept."""
        gradients = [alpha.grad for alpha in self.logits.values() if alpha.grad is not None]
        if not gradients:
            return
        # all groupings in a handful of multi-tensor operations (as torch.optim steps), not a few per grouping
        rms = torch._foreach_norm(gradients)
        torch._foreach_div_(rms, [math.sqrt(gradient.numel()) for gradient in gradients])
        torch._foreach_clamp_min_(rms, _GRAD_FLOOR)
        torch._foreach_div_(gradients, rms)

    def level_probabilities(self, probs: dict[str, Tensor], level: int, name: str) -> Tensor:
        """Soft assignment of grouping ``name`` at ``level``, merging an upper level's groups where needed."""
        src_level, key = self.plan.source(level, name)
        q = probs[key]
        ratio = self.groups[src_level] // self.groups[level]
        if ratio > 1:
            q = q.view(self.groups[level], ratio, -1).sum(1)
        return q

    def regularisers(self, model: nn.Module) -> RegulariserTerms:
        """The disjoint, group-weight and balance costs for ``model``'s current weights, in float32 whatever autocast
        is on (under bf16 their matmuls and dot products would round the assignments and weight energies)."""
        with torch.autocast(next(iter(self.logits.values())).device.type, enabled=False):
            return self._terms(model)

    def _terms(self, model: nn.Module) -> RegulariserTerms:
        columns = [free.columns(self.logits) for free in self.free_by_count]
        probs = {key: q for free, cols in zip(self.free_by_count, columns) for key, q in free.split(cols).items()}
        costs = torch.cat([
            bucket.costs(model, {g: self.level_probabilities(probs, *g) for g in bucket.groupings})
            for bucket in self.layer_buckets
        ])
        weights = costs.detach()
        return RegulariserTerms(
            disjoint=torch.cat([disjoint_costs(c, f.segments) for f, c in zip(self.free_by_count, columns)]).mean(),
            group_weight=(weights * costs).sum() / weights.sum().clamp_min(_TINY),
            balance=torch.cat([balance_costs(c, f.segments) for f, c in zip(self.free_by_count, columns)]).mean(),
        )
