"""The split tree with each level's sibling branches packed side by side, so that one grouped layer runs them all.

Run branch after branch, a tree of G branches launches G small kernels per layer where the dense network launched
one, and on a GPU small kernels are bound by their launches. ``GroupedTree`` lays a level's branches out in one
tensor, branch j in channels ``[j * m, j * m + n_j)`` with ``m`` the widest branch's ``n``: its convolutions become
one grouped convolution, its norms one norm, its linear layers one batched matrix product. Narrower branches are
padded with zero weights and zero-scaled norms and fed zero channels, so the padding stays zero, gets zero
gradients, and stays zero under SGD with weight decay. Equal groups need no padding (balanced ones differ by at
most one channel where a count does not divide); uneven ones cost the padding's arithmetic (``padding_share`` counts
its weights; its share of the FLOPs is of the same order, but not the same, since levels differ in image size). It
computes what the tree computes (tests), and ``unpack`` gives the tree back with the trained weights.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import Tensor, nn

from splitnet.plan import IN, OUT, SplitLevel, SplitPlan
from splitnet.tree import Branch, SplitTree, select_channels

# finetuning packs a tree only while at most this share of its packed weights would be padding (its share of the FLOPs
# is of the same order): a guess at where the padding's arithmetic outweighs the launches it saves, not measured
MAX_PADDING_SHARE = 0.2


class GroupedLinear(nn.Module):
    """``groups`` independent linear layers over consecutive slices of the features, as one batched product."""

    def __init__(self, groups: int, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.groups, self.in_features, self.out_features = groups, in_features, out_features
        self.weight = nn.Parameter(torch.zeros(groups, out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(groups, out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        leading = x.shape[:-1]
        x = x.reshape(-1, self.groups, self.in_features).transpose(0, 1)  # groups x rows x in
        weight = self.weight.transpose(1, 2)
        out = torch.bmm(x, weight) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), x, weight)
        return out.transpose(0, 1).reshape(*leading, self.groups * self.out_features)

    def extra_repr(self) -> str:
        return (f"groups={self.groups}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


def _packed_layer(first: nn.Module, groups: int, in_width: int | None, out_width: int) -> nn.Module:
    """A zero layer of ``first``'s kind holding ``groups`` branches' copies of it, each padded to the widths."""
    like = next(itertools.chain(first.parameters(), first.buffers()))
    factory = {"device": like.device, "dtype": like.dtype if like.is_floating_point() else None}
    if isinstance(first, nn.modules.batchnorm._NormBase):
        packed = type(first)(groups * out_width, first.eps, first.momentum, first.affine, first.track_running_stats,
                             **factory)
    elif isinstance(first, nn.Linear):
        packed = GroupedLinear(groups, in_width, out_width, first.bias is not None, **factory)
    else:
        packed = type(first)(groups * in_width, groups * out_width, first.kernel_size, first.stride, first.padding,
                             first.dilation, groups=groups, bias=first.bias is not None,
                             padding_mode=first.padding_mode, **factory)
    with torch.no_grad():
        for parameter in packed.parameters():
            parameter.zero_()
    return packed


def _block(packed: nn.Module, groups: int, group: int, layer: nn.Module) -> dict[str, Tensor]:
    """Views of ``packed``'s tensors that hold branch ``group``'s ``layer``, by the layer's own tensor names."""
    views = {}
    for name, tensor in [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]:
        target = getattr(packed, name)
        if name == "num_batches_tracked":
            views[name] = target
            continue
        if not isinstance(packed, GroupedLinear):  # branch j's rows start at j times the padded width
            width = target.shape[0] // groups
            target = target[group * width: (group + 1) * width]
        else:
            target = target[group]
        views[name] = target[tuple(slice(0, size) for size in tensor.shape)]
    return views


def tree_levels(tree: SplitTree) -> list[tuple[list[Branch], list[int]]]:
    """The tree's branches level by level, each with the index of its parent in the level above (0 at the top)."""
    levels = [(list(tree.branches), [0] * len(tree.branches))]
    while levels[-1][0][0].subbranches:
        branches, parents = [], []
        for index, branch in enumerate(levels[-1][0]):
            branches += branch.subbranches
            parents += [index] * len(branch.subbranches)
        levels.append((branches, parents))
    return levels


def _layer_groupings(level: SplitLevel) -> dict[str, tuple[str | None, str]]:
    """Every split layer and norm of a level: name -> (input grouping or None for a norm, output grouping)."""
    return dict(level.layers) | {name: (None, grouping) for name, grouping in level.norms.items()}


def _widths(level: SplitLevel, bodies: list[nn.Module]) -> dict[str, list[int]]:
    """Each grouping's channel count in each branch of a level."""
    widths = {}
    for name, (in_name, out_name) in _layer_groupings(level).items():
        layers = [body.get_submodule(name) for body in bodies]
        if in_name is None:
            widths[out_name] = [layer.num_features for layer in layers]
        else:
            widths[out_name] = [layer.weight.shape[0] for layer in layers]
            widths[in_name] = [layer.weight.shape[1] for layer in layers]
    return widths


class GroupedLevel(nn.Module):
    """One level: gathers each branch's input channels into the packed layout, then runs the packed body.

    ``index`` (None where the layout is already right) picks each channel of the layout from the level above;
    ``padding`` (None where not needed) marks the padding channels to fill with zeros, those that found none of their
    own parent's zero channels at their position to pick.
    """

    def __init__(self, body: nn.Module, index: Tensor | None, padding: Tensor | None) -> None:
        super().__init__()
        self.body = body
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("padding", padding, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.index is not None:
            x = select_channels(x, self.index)
        if self.padding is not None:  # a fill, not a product: an inf or NaN of one branch stays in it, as in the tree
            x = x.masked_fill(self.padding.view(1, -1, *([1] * (x.dim() - 2))), 0)
        return self.body(x)


def _gather(branches: list[Branch], parents: list[int], widths: list[int], width: int,
            parent: tuple[list[int], int] | None) -> tuple[Tensor | None, Tensor | None]:
    """A level's input gather (``GroupedLevel``'s ``index`` and ``padding``). ``parent``: the level above's output
    widths per branch and padded width, None for the trunk's output (the level's groups then partition it)."""
    parent_sizes, parent_width = parent if parent is not None else ([sum(widths)], sum(widths))
    index = torch.arange(len(branches) * width)  # a padding channel picks its own position if that is a zero
    fill = torch.zeros(len(branches) * width, dtype=torch.bool)  # channel of its own parent, else it is filled
    for group, (branch, parent_group, size) in enumerate(zip(branches, parents, widths)):
        local = torch.arange(size) if branch.in_index is None else branch.in_index.cpu()
        index[group * width: group * width + size] = parent_group * parent_width + local
        parent_zeros = range(parent_group * parent_width + parent_sizes[parent_group],
                             (parent_group + 1) * parent_width)
        for position in range(group * width + size, (group + 1) * width):
            if position not in parent_zeros:
                index[position], fill[position] = 0, True
    identity = index.numel() == len(parent_sizes) * parent_width and torch.equal(index, torch.arange(index.numel()))
    return None if identity else index, fill if bool(fill.any()) else None


class GroupedTree(nn.Module):
    """A ``SplitTree`` run a level at a time, each level's branches packed into grouped layers (see the module doc)."""

    def __init__(self, tree: SplitTree, plan: SplitPlan) -> None:
        super().__init__()
        device = tree.class_index.device
        self.trunk = copy.deepcopy(tree.trunk)
        # a copy of the tree on the CPU, outside the module (its weights go stale): the shapes, indices and settings
        # that ``unpack`` fills with this one's weights
        object.__setattr__(self, "skeleton", copy.deepcopy(tree).cpu())
        self.layer_names = [list(_layer_groupings(level)) for level in plan.levels]
        levels, parent, branch_levels = [], None, tree_levels(tree)
        for level, (branches, parents) in zip(plan.levels, branch_levels):
            bodies = [branch.body for branch in branches]
            widths = _widths(level, bodies)
            width = {name: max(sizes) for name, sizes in widths.items()}
            index, padding = _gather(branches, parents, widths[IN], width[IN], parent)
            levels.append(GroupedLevel(self._packed_body(level, bodies, width),
                                       None if index is None else index.to(device),
                                       None if padding is None else padding.to(device)))
            parent = widths[OUT], width[OUT]
        self.levels = nn.ModuleList(levels)
        positions = torch.empty(len(tree.class_index), dtype=torch.long)
        for group, leaf in enumerate(branch_levels[-1][0]):
            positions[leaf.classes.cpu()] = group * parent[1] + torch.arange(len(leaf.classes))
        self.register_buffer("class_positions", positions.to(device), persistent=False)

    @staticmethod
    def _packed_body(level: SplitLevel, bodies: list[nn.Module], width: dict[str, int]) -> nn.Module:
        """The level's body with every split layer and norm replaced by its packed version, holding every branch's."""
        body = copy.deepcopy(bodies[0])
        for name, (in_name, out_name) in _layer_groupings(level).items():
            layers = [b.get_submodule(name) for b in bodies]
            packed = _packed_layer(layers[0], len(layers), None if in_name is None else width[in_name],
                                   width[out_name])
            with torch.no_grad():
                for group, layer in enumerate(layers):
                    for key, view in _block(packed, len(layers), group, layer).items():
                        view.copy_(getattr(layer, key))
            if not name:  # the level's module is this one layer, and has no others
                return packed
            owner, _, attribute = name.rpartition(".")
            setattr(body.get_submodule(owner), attribute, packed)
        return body

    def forward(self, x: Tensor) -> Tensor:
        x = self.trunk(x)
        for level in self.levels:
            x = level(x)
        return x.index_select(1, self.class_positions)

    def class_groups(self) -> list[list[int]]:
        """The classes of each leaf branch, in leaf order."""
        return self.skeleton.class_groups()

    def padding_share(self) -> float:
        """The share of the packed levels' weights that is padding (0 for equal groups)."""
        packed = sum(p.numel() for p in self.levels.parameters())
        return 1 - sum(p.numel() for p in self.skeleton.branches.parameters()) / packed

    @torch.no_grad()
    def unpack(self) -> SplitTree:
        """The tree with separate branches holding this one's current weights and buffers, on this one's device, in
        its floating-point type and training mode."""
        like = self.class_positions.device, next(self.parameters()).dtype
        tree = copy.deepcopy(self.skeleton).to(*like).train(self.training)
        tree.trunk.load_state_dict(self.trunk.state_dict())
        for grouped, names, (branches, _) in zip(self.levels, self.layer_names, tree_levels(tree)):
            for name in names:
                packed = grouped.body.get_submodule(name)
                for group, branch in enumerate(branches):
                    layer = branch.body.get_submodule(name)
                    for key, view in _block(packed, len(branches), group, layer).items():
                        getattr(layer, key).copy_(view)
        return tree


def separate_branches(net: nn.Module) -> nn.Module:
    """``net`` with a grouped tree unpacked into separate branches (a new module); any other network itself."""
    return net.unpack() if isinstance(net, GroupedTree) else net
