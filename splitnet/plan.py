"""How a backbone declares where it can be split: the contract between models and the split machinery.

A splittable backbone runs its ``trunk`` modules and then each level's module, in order. A level lists
its convolutions / linear layers with the groupings of their input and output channels, and its norm
layers with the grouping of their channels. Grouping names are local to a level:

- ``"in"``: the channels entering the level (a free, learned grouping);
- ``"out"``: the channels leaving it, which is the next level's ``"in"`` merged to this level's group
  count, or, for the last level, the classes (a free grouping);
- any other name: a free grouping of inner channels (e.g. the middle channels of a residual block).

Grouping and surgery work from this description alone and never name a model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from splitnet.errors import ConfigError

IN, OUT = "in", "out"


class SplitConfigError(ConfigError):
    """A split configuration that cannot be built; the message names the bad value and the rule."""


@dataclass(frozen=True)
class SplitLevel:
    """One splittable level: a submodule of the backbone and the groupings of its layers' channels."""

    module: str
    layers: Mapping[str, tuple[str, str]]
    norms: Mapping[str, str] = field(default_factory=dict)

    @property
    def names(self) -> set[str]:
        """Every grouping name the level's layers use."""
        return {n for pair in self.layers.values() for n in pair} | set(self.norms.values())

    def grouping_key(self, name: str) -> str:
        """Global key of one of this level's groupings (used for parameters and in checkpoints)."""
        return f"{self.module}:{name}"

    def layer_path(self, name: str) -> str:
        """Path in the backbone of one of this level's layers; a level that is a single layer names it ``""``."""
        return ".".join(part for part in (self.module, name) if part)


@dataclass(frozen=True)
class SplitPlan:
    """The trunk module names (never split) and the splittable levels, bottom-up."""

    trunk: tuple[str, ...]
    levels: tuple[SplitLevel, ...]

    def source(self, level: int, name: str) -> tuple[int, str]:
        """The free grouping that defines grouping ``name`` of level ``level``: (its level, its key).

        A level's output is defined by the next level's input (merged); every other grouping is free.
        """
        if name == OUT and level + 1 < len(self.levels):
            upper = self.levels[level + 1]
            return level + 1, upper.grouping_key(IN)
        return level, self.levels[level].grouping_key(name)

    def grouping_dims(self, model: nn.Module) -> dict[str, int]:
        """Channel count of every free grouping, read off the layers' shapes; checks they agree."""
        dims: dict[str, int] = {}

        def record(level: int, name: str, size: int, layer: str) -> None:
            key = self.source(level, name)[1]
            if dims.setdefault(key, size) != size:
                raise SplitConfigError(
                    f"split plan: layer '{layer}' gives grouping '{key}' {size} channels, another layer {dims[key]}"
                )

        for index, level in enumerate(self.levels):
            body = model.get_submodule(level.module)
            for layer_name, (in_name, out_name) in level.layers.items():
                weight = body.get_submodule(layer_name).weight
                record(index, in_name, weight.shape[1], level.layer_path(layer_name))
                record(index, out_name, weight.shape[0], level.layer_path(layer_name))
            for norm_name, name in level.norms.items():
                record(index, name, body.get_submodule(norm_name).num_features, level.layer_path(norm_name))
        return dims

    def free_groupings(self, model: nn.Module, groups: tuple[int, ...]) -> dict[str, tuple[int, int]]:
        """Every learned grouping of the levels that are split: key -> (group count, channel count)."""
        dims = self.grouping_dims(model)
        free: dict[str, tuple[int, int]] = {}
        for index, level in enumerate(self.levels):
            if groups[index] == 1:
                continue
            for name in sorted(level.names):
                src_level, key = self.source(index, name)
                if src_level == index:
                    free[key] = (groups[index], dims[key])
        for key, (count, size) in free.items():
            if count > size:
                raise SplitConfigError(
                    f"split asks for {count} groups in grouping '{key}', which has only {size} channels"
                )
        return free


def parse_groups(text: str | int, plan: SplitPlan) -> tuple[int, ...]:
    """Parse a split string such as ``"2-4-8"`` (group counts bottom-up, one per level) and check the hierarchy.

    ``"none"`` means no split. A lower level's groups are unions of the upper level's groups, so counts
    may not decrease going up and each must divide the next.
    """
    names = ", ".join(level.module for level in plan.levels)
    form = "-".join(f"G{len(plan.levels) - i}" for i in range(len(plan.levels)))
    text = str(text).strip()
    if text == "none":
        return (1,) * len(plan.levels)
    if not re.fullmatch(r"\d+(-\d+)*", text):
        raise SplitConfigError(
            f"split.groups='{text}' is not a split string: expected {form}, positive group counts joined by '-', "
            f"one per split level ({names}), or 'none'"
        )
    groups = tuple(int(part) for part in text.split("-"))
    if len(groups) != len(plan.levels):
        raise SplitConfigError(
            f"split.groups='{text}' gives {len(groups)} group counts, but this backbone has {len(plan.levels)} "
            f"split levels ({names}): expected {form}"
        )
    if min(groups) < 1:
        raise SplitConfigError(f"split.groups='{text}': group counts must be at least 1")
    for lower, upper in zip(groups, groups[1:]):
        if lower > upper:
            raise SplitConfigError(
                f"split.groups='{text}': group counts may not decrease going up ({lower} > {upper}), because each "
                "lower-level group is a union of upper-level groups (G3 <= G2 <= G1)"
            )
        if upper % lower:
            raise SplitConfigError(
                f"split.groups='{text}': each level's group count must divide the next one's ({lower} does not "
                f"divide {upper}), because each lower-level group is a union of upper-level groups"
            )
    return groups
