"""The split network: a shared trunk feeding a tree of branches, each owning its own channels and classes."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn


def select_channels(x: Tensor, index: Tensor) -> Tensor:
    """``x[:, index]``, keeping a channels-last tensor channels-last (the gather then runs along memory)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return x.permute(0, 2, 3, 1).index_select(3, index).permute(0, 3, 1, 2)
    return x.index_select(1, index)


class Branch(nn.Module):
    """One node of the tree: picks its input channels from its parent's output, runs its body, feeds its sub-branches.

    A leaf's body ends in the classifier for its ``classes``.
    """

    def __init__(
        self,
        body: nn.Module,
        in_index: Tensor | None,
        subbranches: list[Branch] | None = None,
        classes: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.body = body
        self.subbranches = nn.ModuleList(subbranches or [])
        self.register_buffer("in_index", in_index, persistent=False)
        self.register_buffer("classes", classes, persistent=False)

    def forward(self, x: Tensor) -> list[Tensor]:
        if self.in_index is not None:
            x = select_channels(x, self.in_index)
        return self.from_selected(x)

    def from_selected(self, x: Tensor) -> list[Tensor]:
        """The leaves' outputs for this branch's input channels, already selected from its parent's output."""
        x = self.body(x)
        if not self.subbranches:
            return [x]
        return [out for branch in self.subbranches for out in branch(x)]

    def leaves(self) -> Iterator[Branch]:
        if not self.subbranches:
            yield self
        for branch in self.subbranches:
            yield from branch.leaves()


class SplitTree(nn.Module):
    """Trunk, then the branches; the leaves' logits are put back in class order."""

    def __init__(self, trunk: nn.Module, branches: list[Branch]) -> None:
        super().__init__()
        self.trunk = trunk
        self.branches = nn.ModuleList(branches)
        order = torch.cat([leaf.classes for leaf in self.leaves()])
        self.register_buffer("class_index", torch.argsort(order), persistent=False)

    def leaves(self) -> Iterator[Branch]:
        for branch in self.branches:
            yield from branch.leaves()

    def class_groups(self) -> list[list[int]]:
        """The classes of each leaf branch, in leaf order."""
        return [leaf.classes.tolist() for leaf in self.leaves()]

    def forward(self, x: Tensor) -> Tensor:
        features = self.trunk(x)
        outs = [out for branch in self.branches for out in branch(features)]
        return torch.cat(outs, 1).index_select(1, self.class_index)
