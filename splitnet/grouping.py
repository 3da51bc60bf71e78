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


@dataclass(frozen=True)
class SoftGroups:
    """Soft groupings (... x G x D) as the group-weight term uses them: their squares and one minus them."""

    squared: Tensor
    rest: Tensor


def group_weight_costs(energy: Tensor, p: SoftGroups, q: SoftGroups, rows_scale: Tensor, cols_scale: Tensor) -> Tensor:
    """S of L layers of one shape at once: the normalised group lasso on each layer's off-block-diagonal weights.

    ``energy`` (L x O x I) holds each layer's ``weight_energy``, ``p`` (L x G x I) the soft groupings of its inputs
    and ``q`` (L x G x O) of its outputs. Input i's term for group g is sqrt(sum_o q[g, o]^2 M[o, i]) (1 - p[g, i])
    (the square root of a product of squares; the assignments lie in [0, 1]), and output o's alike; ``rows_scale``
    and ``cols_scale`` (L) weigh each layer's two sums (``group_weight_scales``).
    """
    rows = (_sqrt(q.squared @ energy) * p.rest).sum((1, 2))
    cols = (_sqrt(p.squared @ energy.transpose(1, 2)) * q.rest).sum((1, 2))
    return torch.addcmul(rows * rows_scale, cols, cols_scale)


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
    in_grouping: tuple[int, str]
    out_grouping: tuple[int, str]


class _FreeGroupingsOfCount(nn.Module):
    """The free groupings (the learned logits) of one group count side by side: one softmax and one
    ``disjoint_costs`` / ``balance_costs`` call serve them all."""

    def __init__(self, keys: list[str], dims: list[int]) -> None:
        super().__init__()
        self.keys = keys
        self.starts = list(itertools.accumulate(dims, initial=0))
        segments = torch.zeros(self.starts[-1], len(keys))
        for k in range(len(keys)):
            segments[self.starts[k]:self.starts[k + 1], k] = 1
        self.register_buffer("segments", segments, persistent=False)

    def columns(self, logits: nn.ParameterDict) -> Tensor:
        """G x D, the free columns: every grouping's softmax over the groups, side by side."""
        return torch.softmax(torch.cat([logits[key] for key in self.keys], 1), 0)

    def split(self, columns: Tensor) -> dict[str, Tensor]:
        """``columns`` cut back into each grouping's G x D assignment."""
        return {key: columns[:, self.starts[k]:self.starts[k + 1]] for k, key in enumerate(self.keys)}


class _LayersOfShape(nn.Module):
    """Split layers of one group count and one weight-energy shape (outputs x inputs), so that one
    ``group_weight_costs`` call serves them all: their weights' paths, the normalisation of each, and where their
    input and output columns lie among the level columns of their group count."""

    def __init__(self, count: int, layers: list[_SplitLayer], shapes: list[torch.Size],
                 starts: dict[tuple[int, str], int]) -> None:
        super().__init__()
        self.count = count
        self.paths = [layer.path for layer in layers]
        self.outputs, self.inputs = shapes[0][:2]
        # per layer its input columns, then its output columns
        index = [torch.cat([torch.arange(self.inputs) + starts[layer.in_grouping],
                            torch.arange(self.outputs) + starts[layer.out_grouping]]) for layer in layers]
        self.register_buffer("index", torch.cat(index), persistent=False)
        scales = [group_weight_scales(count, shape[1], shape[0], math.prod(shape[2:])) for shape in shapes]
        self.register_buffer("rows_scale", torch.tensor([rows for rows, _ in scales]), persistent=False)
        self.register_buffer("cols_scale", torch.tensor([cols for _, cols in scales]), persistent=False)

    def costs(self, model: nn.Module, squares_then_rests: Tensor) -> Tensor:
        """S of each of the layers (L). ``squares_then_rests`` (2G x D): the level columns' squares, then one minus
        them."""
        picked = squares_then_rests.index_select(1, self.index)  # 2G x L(I+O)
        # -> 2 x G x L x (I+O) -> 2 x L x G x (I+O): squares and rests, each L x G x (inputs, then outputs)
        squared, rest = picked.view(2, self.count, len(self.paths), self.inputs + self.outputs).transpose(1, 2)
        p = SoftGroups(squared[..., :self.inputs], rest[..., :self.inputs])
        q = SoftGroups(squared[..., self.inputs:], rest[..., self.inputs:])
        energies = [weight_energy(model.get_submodule(path).weight) for path in self.paths]
        energy = energies[0][None] if len(energies) == 1 else torch.stack(energies)
        return group_weight_costs(energy, p, q, self.rows_scale, self.cols_scale)


class _SplitLayersOfCount(nn.Module):
    """The split layers of the levels of one group count: the level groupings they use, side by side (the level
    columns: free groupings, or an upper level's merged), and the layers by the shape of their weight energy."""

    def __init__(self, count: int, layers: list[_SplitLayer], model: nn.Module) -> None:
        super().__init__()
        sizes: dict[tuple[int, str], int] = {}
        by_shape: dict[tuple[int, int], list[tuple[_SplitLayer, torch.Size]]] = {}
        for layer in layers:
            shape = model.get_submodule(layer.path).weight.shape
            sizes[layer.in_grouping], sizes[layer.out_grouping] = shape[1], shape[0]
            by_shape.setdefault((shape[0], shape[1]), []).append((layer, shape))
        self.groupings = list(sizes)
        starts = dict(zip(self.groupings, itertools.accumulate(sizes.values(), initial=0)))
        self.shapes = nn.ModuleList(
            _LayersOfShape(count, [layer for layer, _ in members], [shape for _, shape in members], starts)
            for members in by_shape.values()
        )

    def costs(self, model: nn.Module, groupings: dict[tuple[int, str], Tensor]) -> Tensor:
        """S of every layer; ``groupings`` holds the G x D assignment of each (level, name) grouping."""
        columns = torch.cat([groupings[grouping] for grouping in self.groupings], 1)
        squares_then_rests = torch.cat([columns.square(), 1 - columns])
        return torch.cat([layers.costs(model, squares_then_rests) for layers in self.shapes])


class GroupAssignments(nn.Module):
    """Learned soft groupings of every split level: ``softmax(alpha, dim=0)`` over G x D logits, alpha ~ N(0, 0.01^2).

    They never enter the forward pass; the regularisers couple them to the network's weights. On a GPU each
    operation is a kernel launch and small ones cost their launch, not their arithmetic, so the regularisers are
    computed a group count, and a layer shape, at a time: the logits of one group count side by side, one softmax
    (the free columns; disjoint and balance terms), each level's groupings picked or merged from them (the level
    columns), their squares and one minus them, and for the layers of each weight-energy shape one index_select of
    their columns and one batched ``group_weight_costs``. Beyond each layer's weight energy that is a fixed number
    of operations per group count and shape. The helper modules hold index and scale buffers, which follow the
    module's device and dtype and stay out of checkpoints.
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
            self.free_by_count.append(_FreeGroupingsOfCount(keys, [free[key][1] for key in keys]))
        layers: dict[int, list[_SplitLayer]] = {}
        for index, level in enumerate(plan.levels):
            if groups[index] == 1:
                continue
            for name, (in_name, out_name) in level.layers.items():
                layers.setdefault(groups[index], []).append(
                    _SplitLayer(level.layer_path(name), (index, in_name), (index, out_name)))
        self.layers_by_count = nn.ModuleList(
            _SplitLayersOfCount(count, members, model) for count, members in sorted(layers.items())
        )

    def probabilities(self) -> dict[str, Tensor]:
        """Each free grouping's G x D soft assignment."""
        probs = self._split_columns([free.columns(self.logits) for free in self.free_by_count])
        return {key: probs[key] for key in self.logits}

    def _split_columns(self, columns: list[Tensor]) -> dict[str, Tensor]:
        """Each group count's free columns -> each free grouping's assignment."""
        return {key: q for free, side in zip(self.free_by_count, columns) for key, q in free.split(side).items()}

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
        probs = self._split_columns(columns)
        costs = torch.cat([
            layers.costs(model, {g: self.level_probabilities(probs, *g) for g in layers.groupings})
            for layers in self.layers_by_count
        ])
        weights = costs.detach()
        disjoint, balance = zip(*[(disjoint_costs(side, free.segments), balance_costs(side, free.segments))
                                  for free, side in zip(self.free_by_count, columns)])
        return RegulariserTerms(
            disjoint=torch.cat(disjoint).mean(),
            group_weight=(weights * costs).sum() / weights.sum().clamp_min(_TINY),
            balance=torch.cat(balance).mean(),
        )
