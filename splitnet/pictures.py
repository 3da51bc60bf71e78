"""Pictures of a split, drawn with PIL: the class tree, the soft assignments, and a block-diagonal weight matrix."""

from __future__ import annotations

import colorsys
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import Tensor

# anchors of a dark-to-bright colour map (black, purple, orange, light yellow)
_ANCHORS = torch.tensor([[0, 0, 4], [120, 28, 109], [237, 105, 37], [252, 255, 164]], dtype=torch.float32)


def colorize(values: Tensor, vmax: float | None = None) -> Image.Image:
    """A 2-d tensor scaled to [0, 1] by ``vmax`` (default: its maximum), as an RGB image."""
    top = values.max().clamp_min(1e-12) if vmax is None else vmax
    scaled = (values / top).clamp(0, 1) * (len(_ANCHORS) - 1)
    low = scaled.floor().long().clamp(max=len(_ANCHORS) - 2)
    frac = (scaled - low)[..., None]
    rgb = _ANCHORS[low] * (1 - frac) + _ANCHORS[low + 1] * frac
    return Image.fromarray(rgb.round().to(torch.uint8).numpy(), "RGB")


def _grouped_order(labels: list[int]) -> list[int]:
    return sorted(range(len(labels)), key=lambda i: (labels[i], i))


def assignment_heatmaps(probs: dict[str, Tensor], labels: dict[str, list[int]], path: Path, cell: int = 3) -> Path:
    """One band per grouping: rows are groups, columns channels (or classes) sorted by their hard group."""
    bands = []
    for key, q in probs.items():
        q = q.detach().float().cpu()[:, _grouped_order(labels[key])]
        band = colorize(q, vmax=1.0).resize((max(1, q.shape[1] * cell), q.shape[0] * 12), Image.NEAREST)
        bands.append((key, band))
    width = max(band.width for _, band in bands) + 110
    canvas = Image.new("RGB", (width, sum(band.height + 8 for _, band in bands) + 8), "white")
    draw, y = ImageDraw.Draw(canvas), 8
    for key, band in bands:
        draw.text((4, y), key, fill="black")
        canvas.paste(band, (106, y))
        y += band.height + 8
    canvas.save(path)
    return path


def block_matrix(energy: Tensor, row_labels: list[int], col_labels: list[int], path: Path, size: int = 512) -> Path:
    """A weight matrix (outputs x inputs) with rows and columns sorted by group: off-block energy shows as light."""
    energy = energy.detach().float().cpu()[_grouped_order(row_labels)][:, _grouped_order(col_labels)]
    image = colorize(energy.sqrt())
    scale = size / max(image.size)
    image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST).save(path)
    return path


def _palette(count: int) -> list[tuple[int, int, int]]:
    """``count`` distinguishable dark colours (hues around the circle, alternating in brightness)."""
    return [tuple(round(255 * c) for c in colorsys.hsv_to_rgb(i / count, 0.85, 0.55 if i % 2 else 0.8))
            for i in range(count)]


def class_tree(
    class_groups: list[list[int]], class_names: list[str], groups: list[int], level_names: list[str], path: Path,
    superclasses: tuple[list[int], list[str]] | None = None,
) -> Path:
    """Leaves as columns of class names, with the split levels above drawn as bars spanning their leaves.

    With ``superclasses`` (the superclass of each class, their names) the names are coloured and ordered by
    superclass, and a legend lists each superclass as whole (all its classes in one leaf) or split.
    """
    leaves = len(class_groups)
    column, line = 110, 11
    levels = [(name, g) for name, g in zip(level_names, groups) if g > 1] or [("dense", 1)]
    superclass_of, superclass_names = superclasses or ([0] * len(class_names), [])
    colours = _palette(len(superclass_names)) if superclass_names else [(0, 0, 0)]
    legend = line * (len(superclass_names) + 2) if superclass_names else 0
    tree_height = 16 * len(levels) + 20 + line * max(len(g) for g in class_groups)
    canvas = Image.new("RGB", (max(column * leaves + 10, 330), tree_height + legend), "white")
    draw = ImageDraw.Draw(canvas)
    for depth, (name, count) in enumerate(levels):
        span = leaves // count
        for node in range(count):
            x0, x1 = 5 + node * span * column, 5 + (node + 1) * span * column - 6
            draw.rectangle((x0, 4 + depth * 16, x1, 14 + depth * 16), outline="black", fill=(230, 230, 240))
            draw.text((x0 + 3, 4 + depth * 16), f"{name} {node}", fill="black")
    top = 16 * len(levels) + 12
    leaf_of = {}
    for leaf, classes in enumerate(class_groups):
        for row, index in enumerate(sorted(classes, key=lambda c: (superclass_of[c], c))):
            leaf_of.setdefault(superclass_of[index], set()).add(leaf)
            draw.text((8 + leaf * column, top + row * line), class_names[index][:17], fill=colours[superclass_of[index]])
    if superclass_names:
        whole = sum(len(leaf_of[s]) == 1 for s in range(len(superclass_names)))
        y = tree_height
        draw.text((8, y), f"superclasses: {whole} of {len(superclass_names)} whole in one leaf", fill="black")
        for sup, name in enumerate(superclass_names):
            where = f"leaf {next(iter(leaf_of[sup]))}" if len(leaf_of[sup]) == 1 else f"split over {len(leaf_of[sup])}"
            draw.text((8, y + (sup + 1) * line), f"{name[:30]}: {where}", fill=colours[sup])
    canvas.save(path)
    return path


def render_pictures(record: dict, out_dir: Path) -> list[Path]:
    """All pictures of one split record (see ``splitnet.report.split_record``) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [class_tree(record["class_groups"], record["class_names"], record["groups"], record["level_names"],
                        out_dir / "class_tree.png", record.get("superclasses"))]
    if record["probs"]:
        paths.append(assignment_heatmaps(record["probs"], record["labels"], out_dir / "assignments.png"))
    if record["layer"] is not None:
        layer = record["layer"]
        paths.append(block_matrix(layer["energy"], layer["row_labels"], layer["col_labels"], out_dir / "block_weights.png"))
    return paths
