"""From soft assignments to hard groups (the tree spec), and from the dense network to the split tree."""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from splitnet.plan import IN, OUT, SplitConfigError, SplitPlan
from splitnet.tree import Branch, SplitTree

ASSIGN_METHODS = ("argmax", "balanced", "random")


@dataclass(frozen=True)
class TreeSpec:
    """Hard groups: the group count of every level and the group of every channel of each free grouping.

    Small and serialisable; with the split plan it fixes the tree's whole shape.
    """

    groups: tuple[int, ...]
    labels: dict[str, list[int]]

    def labels_at(self, plan: SplitPlan, level: int, name: str, dims: dict[str, int]) -> Tensor:
        """Group of each channel of grouping ``name`` at ``level`` (upper-level groups merged in contiguous runs);
        ``dims`` holds the channel count of each grouping (``SplitPlan.grouping_dims``)."""
        src_level, key = plan.source(level, name)
        if self.groups[level] == 1:
            return torch.zeros(dims[key], dtype=torch.long)
        return torch.tensor(self.labels[key]) // (self.groups[src_level] // self.groups[level])

    def group_sizes(self) -> dict[str, list[int]]:
        return {key: torch.bincount(torch.tensor(v), minlength=max(v) + 1).tolist() for key, v in self.labels.items()}

    def to_dict(self) -> dict:
        return {"groups": list(self.groups), "labels": self.labels}

    @classmethod
    def from_dict(cls, data: dict) -> TreeSpec:
        return cls(tuple(data["groups"]), {k: list(v) for k, v in data["labels"].items()})


def assign_argmax(q: Tensor, key: str) -> Tensor:
    """Each column to its most probable group (the paper); an empty group is an error."""
    labels = q.argmax(0)
    sizes = torch.bincount(labels, minlength=q.shape[0])
    empty = (sizes == 0).nonzero().flatten().tolist()
    if empty:
        raise SplitConfigError(
            f"split.assign=argmax leaves group {empty[0]} of grouping '{key}' empty (group sizes {sizes.tolist()}); "
            "use split.assign=balanced for equal-size groups closest to the learned assignment"
        )
    return labels


def assign_balanced(q: Tensor) -> Tensor:
    """Equal-size groups (sizes differ by at most one) close to ``q``: columns are placed greedily, most confident first."""
    groups, dim = q.shape
    capacity = [dim // groups + (g < dim % groups) for g in range(groups)]
    labels = [-1] * dim
    for flat in torch.argsort(q.detach().flatten(), descending=True, stable=True).tolist():
        group, column = divmod(flat, dim)
        if labels[column] < 0 and capacity[group] > 0:
            labels[column] = group
            capacity[group] -= 1
    return torch.tensor(labels)


def assign_random(groups: int, dim: int, generator: torch.Generator) -> Tensor:
    """Equal-size groups drawn at random (the paper's random-split baseline)."""
    return torch.randperm(dim, generator=generator) % groups


def hard_assign(
    groups: tuple[int, ...], probs: dict[str, Tensor], method: str = "argmax", seed: int = 0
) -> TreeSpec:
    """Turn each free grouping's soft assignment into hard groups by ``method`` (argmax, balanced or random)."""
    if method not in ASSIGN_METHODS:
        raise SplitConfigError(f"split.assign='{method}' is not one of {', '.join(ASSIGN_METHODS)}")
    generator = torch.Generator().manual_seed(seed)
    labels = {}
    for key, q in probs.items():
        q = q.detach().cpu()
        if method == "argmax":
            hard = assign_argmax(q, key)
        elif method == "balanced":
            hard = assign_balanced(q)
        else:
            hard = assign_random(q.shape[0], q.shape[1], generator)
        labels[key] = hard.tolist()
    return TreeSpec(tuple(groups), labels)


def _slice_layer(layer: nn.Module, in_index: Tensor | None, out_index: Tensor) -> None:
    """Keep only the given input and output channels of a conv / linear / norm layer, in place."""
    device = next(iter(layer.parameters()), torch.empty(0)).device
    out_index = out_index.to(device)
    if isinstance(layer, nn.modules.batchnorm._NormBase):
        for name in ("weight", "bias"):
            if getattr(layer, name) is not None:
                setattr(layer, name, nn.Parameter(getattr(layer, name).detach()[out_index].clone()))
        for name in ("running_mean", "running_var"):
            if getattr(layer, name) is not None:
                setattr(layer, name, getattr(layer, name)[out_index].clone())
        layer.num_features = len(out_index)
        return
    if getattr(layer, "groups", 1) != 1:
        raise SplitConfigError(f"cannot split the grouped layer {layer}: the split plan must list only ungrouped layers")
    weight = layer.weight.detach()[out_index][:, in_index.to(device)]
    layer.weight = nn.Parameter(weight.clone())
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[out_index].clone())
    if isinstance(layer, nn.Linear):
        layer.in_features, layer.out_features = weight.shape[1], weight.shape[0]
    else:
        layer.in_channels, layer.out_channels = weight.shape[1], weight.shape[0]


_SPLITTABLE = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase)


def _check_plan_covers(plan: SplitPlan, model: nn.Module) -> None:
    for level in plan.levels:
        listed = set(level.layers) | set(level.norms)
        for name, module in model.get_submodule(level.module).named_modules():
            if isinstance(module, _SPLITTABLE) and name not in listed:
                raise SplitConfigError(
                    f"split plan: level '{level.module}' does not list its layer '{name}', so it cannot be split"
                )


def build_tree(dense: nn.Module, plan: SplitPlan, spec: TreeSpec) -> SplitTree:
    """Cut ``dense`` into a tree: each split layer becomes one smaller layer per group, holding its diagonal block."""
    _check_plan_covers(plan, dense)
    dims = plan.grouping_dims(dense)

    def build(level_index: int, group: int, parent_channels: Tensor) -> Branch:
        level = plan.levels[level_index]
        members = {
            name: (spec.labels_at(plan, level_index, name, dims) == group).nonzero().flatten() for name in level.names
        }
        body = copy.deepcopy(dense.get_submodule(level.module))
        for layer_name, (in_name, out_name) in level.layers.items():
            _slice_layer(body.get_submodule(layer_name), members[in_name], members[out_name])
        for norm_name, name in level.norms.items():
            _slice_layer(body.get_submodule(norm_name), None, members[name])
        in_channels = members[IN]
        in_index = None if torch.equal(in_channels, parent_channels) else torch.searchsorted(parent_channels, in_channels)
        device = next(body.parameters()).device
        if level_index + 1 == len(plan.levels):
            return Branch(body, _to(in_index, device), classes=members[OUT].to(device))
        ratio = spec.groups[level_index + 1] // spec.groups[level_index]
        children = [build(level_index + 1, group * ratio + c, members[OUT]) for c in range(ratio)]
        return Branch(body, _to(in_index, device), children)

    trunk = nn.Sequential(OrderedDict((name, copy.deepcopy(dense.get_submodule(name))) for name in plan.trunk))
    roots = [build(0, g, torch.arange(dims[plan.source(0, IN)[1]])) for g in range(spec.groups[0])]
    return SplitTree(trunk, roots)


def _to(index: Tensor | None, device: torch.device) -> Tensor | None:
    return None if index is None else index.to(device)


def block_masks(dense: nn.Module, plan: SplitPlan, spec: TreeSpec) -> dict[str, Tensor]:
    """For every split layer of ``dense`` (by its full name): 1 where a weight joins channels of one group, 0 off the
    diagonal blocks, shaped to multiply the layer's weight."""
    dims = plan.grouping_dims(dense)
    masks = {}
    for index, level in enumerate(plan.levels):
        for layer_name, (in_name, out_name) in level.layers.items():
            name = level.layer_path(layer_name)
            weight = dense.get_submodule(name).weight
            rows = spec.labels_at(plan, index, out_name, dims)
            cols = spec.labels_at(plan, index, in_name, dims)
            mask = (rows[:, None] == cols[None, :]).to(weight.device, weight.dtype)
            masks[name] = mask.view(*mask.shape, *([1] * (weight.dim() - 2)))
    return masks


def masked_dense(dense: nn.Module, plan: SplitPlan, spec: TreeSpec) -> nn.Module:
    """A copy of ``dense`` with every off-block weight of the split layers set to zero: what the tree must compute."""
    masked = copy.deepcopy(dense)
    with torch.no_grad():
        for name, mask in block_masks(masked, plan, spec).items():
            masked.get_submodule(name).weight.mul_(mask)
    return masked
