"""Soft class/feature-to-group assignments and the three SplitNet regularisers (method.md, "Regularisers")."""

from __future__ import annotations

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


def disjoint_cost(q: Tensor) -> Tensor:
    """T(q) = sum_{g>h} <q_g, q_h> / (D (G-1) / (2G)): 1 for uniform columns, 0 for one-hot ones."""
    groups, dim = q.shape
    gram = q @ q.T
    pairs = (gram.sum() - gram.diagonal().sum()) / 2
    return pairs / (dim * (groups - 1) / (2 * groups))


def balance_cost(q: Tensor) -> Tensor:
    """U(q) = sum_g (sum_d q_g[d])^2 / (D^2 / G): 1 for equal group sizes, G when all columns are in one group."""
    groups, dim = q.shape
    return q.sum(1).square().sum() / (dim**2 / groups)


def weight_energy(weight: Tensor) -> Tensor:
    """M[o, i]: the squared weight from input i to output o, averaged over the kernel taps (shape O x I)."""
    squared = weight.square()
    return squared.mean(tuple(range(2, weight.dim()))) if weight.dim() > 2 else squared


@dataclass(frozen=True)
class SoftGroups:
    """A soft grouping (G x D) with the two terms that every layer it touches needs: its square and 1 - it.

    Built once per grouping and step, then shared by the layers that grouping feeds or comes from.
    """

    squared: Tensor
    rest: Tensor

    @classmethod
    def of(cls, q: Tensor) -> SoftGroups:
        return cls(q.square(), 1 - q)


def group_weight_cost(weight: Tensor, p: Tensor | SoftGroups, q: Tensor | SoftGroups) -> Tensor:
    """S: the normalised group lasso on the off-block-diagonal weights of one layer.

    ``weight`` is a conv (O x I x k x k) or linear (O x I) weight, ``p`` (G x I) the soft grouping of its
    inputs and ``q`` (G x O) of its outputs. With M[o, i] the squared weight from input i to output o averaged
    over the kernel taps, input i's term for group g is sqrt(sum_o q[g, o]^2 M[o, i]) (1 - p[g, i]) (the
    square root of a product of squares; the assignments lie in [0, 1]), and output o's alike.
    """
    p = p if isinstance(p, SoftGroups) else SoftGroups.of(p)
    q = q if isinstance(q, SoftGroups) else SoftGroups.of(q)
    groups, inputs = p.squared.shape
    outputs = q.squared.shape[1]
    energy = weight_energy(weight)
    rows = torch.dot(_sqrt(q.squared @ energy).flatten(), p.rest.flatten())  # inputs: G x I against 1 - p
    cols = torch.dot(_sqrt(p.squared @ energy.T).flatten(), q.rest.flatten())  # outputs: G x O against 1 - q
    init_std = math.sqrt(1.0 / (math.prod(weight.shape[2:]) * inputs))
    scale = groups / (2 * (groups - 1) * init_std)
    return torch.add(rows * (scale / (inputs * math.sqrt(outputs))), cols, alpha=scale / (math.sqrt(inputs) * outputs))


@dataclass(frozen=True)
class RegulariserTerms:
    """The three regularisers, each averaged over its terms."""

    disjoint: Tensor
    group_weight: Tensor
    balance: Tensor


class GroupAssignments(nn.Module):
    """Learned soft groupings of every split level: ``softmax(alpha, dim=0)`` over G x D logits, alpha ~ N(0, 0.01^2).

    They never enter the forward pass; the regularisers couple them to the network's weights.
    """

    def __init__(self, plan: SplitPlan, groups: tuple[int, ...], free: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.plan = plan
        self.groups = groups
        self.logits = nn.ParameterDict(
            {key: nn.Parameter(torch.randn(count, size) * 0.01) for key, (count, size) in free.items()}
        )

    def probabilities(self) -> dict[str, Tensor]:
        """Each free grouping's G x D soft assignment."""
        return {key: torch.softmax(alpha, 0) for key, alpha in self.logits.items()}

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
        for alpha in self.logits.values():
            if alpha.grad is not None:
                alpha.grad.div_(alpha.grad.square().mean().sqrt().clamp_min(_GRAD_FLOOR))

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
        probs = self.probabilities()
        soft_groups: dict[tuple[int, str], SoftGroups] = {}  # each grouping's terms, shared by its layers

        def level_groups(level: int, name: str) -> SoftGroups:
            if (level, name) not in soft_groups:
                soft_groups[level, name] = SoftGroups.of(self.level_probabilities(probs, level, name))
            return soft_groups[level, name]

        layer_costs = []
        for index, level in enumerate(self.plan.levels):
            if self.groups[index] == 1:
                continue
            body = model.get_submodule(level.module)
            for layer_name, (in_name, out_name) in level.layers.items():
                weight = body.get_submodule(layer_name).weight
                p, q = level_groups(index, in_name), level_groups(index, out_name)
                layer_costs.append(group_weight_cost(weight, p, q))
        costs = torch.stack(layer_costs)
        weights = costs.detach()
        return RegulariserTerms(
            disjoint=torch.stack([disjoint_cost(q) for q in probs.values()]).mean(),
            group_weight=(weights * costs).sum() / weights.sum().clamp_min(_TINY),
            balance=torch.stack([balance_cost(q) for q in probs.values()]).mean(),
        )
