"""Run summaries: parameter and FLOP counts, summary.json, and the table printed at the end of a run."""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from splitnet.grouped import GroupedTree
from splitnet.grouping import weight_energy
from splitnet.pictures import render_pictures
from splitnet.plan import SplitPlan
from splitnet.surgery import TreeSpec

SPLIT_RECORD = "split_record.pt"
# the keys a sweep table reads from each summary.json
SUMMARY_KEYS = ("split", "params", "dense_params", "flops", "dense_flops", "val_acc", "test_acc")
TRAIN_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "train.yaml"


class SummaryError(ValueError):
    """A summary.json that cannot be read: the message names the file and what is wrong."""


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, image_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass on one image (2 per multiply-add), counted by torch.utils.flop_counter."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    image = torch.zeros(1, *image_shape, device=param.device, dtype=param.dtype)
    with FlopCounterMode(display=False) as counter:
        model(image)
    model.train(was_training)
    return counter.get_total_flops()


def network_stats(model: nn.Module, image_shape: tuple[int, ...]) -> dict[str, Any]:
    """Name, parameter count and FLOPs per image of a network."""
    return {"name": getattr(model, "name", type(model).__name__), "params": count_params(model),
            "flops": count_flops(model, image_shape)}


def build_summary(
    module: nn.Module, datamodule: Any, results: dict[str, dict[str, float]], dense: dict[str, Any], epochs: int,
    config: dict[str, Any], speed: dict[str, Any],
) -> dict[str, Any]:
    """summary.json of a finished run: sizes and costs of the tree and the dense network, the groups, the
    accuracy after each phase, ``speed`` (fit time, inference img/s) and the resolved config."""
    spec, net = module.tree_spec, module.unpacked_net()
    class_groups = net.class_groups() if spec is not None else [list(range(datamodule.num_classes))]
    superclass_of = getattr(datamodule, "superclass_of", None)
    tree = network_stats(net, datamodule.image_shape)
    return {
        "backbone": dense["name"],
        "split": "-".join(map(str, module.groups)),
        "params": tree["params"],
        "flops": tree["flops"],
        "dense_params": dense["params"],
        "dense_flops": dense["flops"],
        "class_groups": class_groups,
        "class_names": datamodule.class_names,
        "image_shape": list(datamodule.image_shape),
        "group_sizes": spec.group_sizes() if spec is not None else {},
        "tree_spec": spec.to_dict() if spec is not None else None,
        # how the tree was finetuned: each level's branches packed into grouped layers, or one after another
        "tree_layout": None if spec is None else "grouped" if isinstance(module.net, GroupedTree) else "branches",
        "semantics": split_semantics(class_groups, superclass_of) if superclass_of else None,
        # a phase without a validation (or test) set, or with limit_*_batches=0, has no value
        "val_acc": {phase: r["val_acc"] for phase, r in results.items() if "val_acc" in r},
        "test_acc": {phase: r["test_acc"] for phase, r in results.items() if "test_acc" in r},
        "epochs": epochs,
        "skipped_images": getattr(datamodule, "skipped_images", 0),
        **speed,
        "config": config,
    }


def split_record(
    dense: nn.Module, plan: SplitPlan, spec: TreeSpec, probs: dict[str, Tensor], class_names: list[str],
    superclasses: tuple[list[int], list[str]] | None = None,
) -> dict[str, Any]:
    """What the pictures of a split need: soft and hard assignments, the class groups, the largest split
    layer's weight energy (outputs x inputs) with the groups of its rows and columns, and where the data has
    them, the known superclasses (``(superclass of each class, superclass names)``)."""
    dims = plan.grouping_dims(dense)
    layer, largest = None, 0
    for index, level in enumerate(plan.levels):
        if spec.groups[index] == 1:
            continue
        for name, (in_name, out_name) in level.layers.items():
            weight = dense.get_submodule(level.layer_path(name)).weight
            if weight.numel() > largest:
                largest = weight.numel()
                rows = spec.labels_at(plan, index, out_name, dims)
                cols = spec.labels_at(plan, index, in_name, dims)
                layer = {"name": level.layer_path(name), "energy": weight_energy(weight.detach()).cpu(),
                         "row_labels": rows.tolist(), "col_labels": cols.tolist()}
    last = len(plan.levels) - 1
    class_labels = spec.labels_at(plan, last, "out", dims)
    return {
        "groups": list(spec.groups),
        "level_names": [level.module for level in plan.levels],
        "labels": spec.labels,
        "probs": {key: q.detach().cpu() for key, q in probs.items()},
        "class_groups": [(class_labels == g).nonzero().flatten().tolist() for g in range(spec.groups[last])],
        "class_names": list(class_names),
        "superclasses": superclasses,
        "layer": layer,
    }


def split_semantics(class_groups: list[list[int]], superclass_of: list[int]) -> dict[str, float]:
    """How the leaf groups follow known superclasses: purity (share of superclasses whose classes all land in
    one leaf) and the normalised mutual information between leaf and superclass over the classes."""
    leaf_of = {c: leaf for leaf, classes in enumerate(class_groups) for c in classes}
    members: dict[int, set[int]] = {}
    for cls, sup in enumerate(superclass_of):
        members.setdefault(sup, set()).add(leaf_of[cls])
    purity = sum(len(leaves) == 1 for leaves in members.values()) / len(members)
    joint = torch.zeros(len(class_groups), max(superclass_of) + 1, dtype=torch.float64)
    for cls, sup in enumerate(superclass_of):
        joint[leaf_of[cls], sup] += 1
    joint /= joint.sum()
    p_leaf, p_sup = joint.sum(1), joint.sum(0)

    def entropy(p: Tensor) -> float:
        p = p[p > 0]
        return float(-(p * p.log()).sum())

    nonzero = joint > 0
    mutual = float((joint[nonzero] * (joint[nonzero] / (p_leaf[:, None] * p_sup[None, :])[nonzero]).log()).sum())
    denominator = entropy(p_leaf) + entropy(p_sup)
    return {"superclass_purity": purity, "nmi": 2 * mutual / denominator if denominator else 0.0}


def format_table(summary: dict[str, Any]) -> str:
    """A short text table of a run: size, cost and accuracy after each phase."""
    lines = [
        f"backbone {summary['backbone']}  split {summary['split']}",
        f"{'':10}{'params':>12}{'GFLOPs':>10}",
        f"{'dense':10}{summary['dense_params'] / 1e6:>11.3f}M{summary['dense_flops'] / 1e9:>10.3f}",
        f"{'split':10}{summary['params'] / 1e6:>11.3f}M{summary['flops'] / 1e9:>10.3f}",
        f"{'phase':10}{'val acc':>12}{'test acc':>10}",
    ]
    nan = float("nan")
    for phase in dict.fromkeys([*summary["val_acc"], *summary["test_acc"]]):
        val, test = summary["val_acc"].get(phase, nan), summary["test_acc"].get(phase, nan)
        lines.append(f"{phase:10}{val:>12.4f}{test:>10.4f}")
    return "\n".join(lines)


def summary_scalars(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary's numbers (and group sizes), flat, for a dashboard's run summary."""
    scalars = {key: summary[key] for key in ("params", "flops", "dense_params", "dense_flops")}
    scalars |= {f"group_sizes/{key}": sizes for key, sizes in summary["group_sizes"].items()}
    for metric in ("val_acc", "test_acc"):
        scalars |= {f"{phase}/{metric}": value for phase, value in summary[metric].items()}
    return scalars


def write_summary(summary: dict[str, Any], run_dir: str | Path) -> Path:
    path = Path(run_dir) / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    return path


def read_summary(path: Path, keys: tuple[str, ...] = SUMMARY_KEYS) -> dict[str, Any]:
    """The summary.json at ``path``; a SummaryError naming the file if it is no JSON object holding ``keys``."""
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SummaryError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(summary, dict):
        raise SummaryError(f"{path}: not a JSON object, so not a summary.json written by train.py")
    if missing := [key for key in keys if key not in summary]:
        raise SummaryError(f"{path}: has no {', '.join(missing)}, so it is not a summary.json written by train.py")
    return summary


def unrecorded_keys() -> tuple[str, ...]:
    """The config keys that do not tell runs apart (data paths, devices, the logger, resuming): those
    conf/train.yaml leaves out of a run directory's name (``hydra.job.config.override_dirname.exclude_keys``)."""
    keys = OmegaConf.select(OmegaConf.load(TRAIN_CONFIG), "hydra.job.config.override_dirname.exclude_keys")
    return tuple(keys or ())


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def sweep_rows(root: Path) -> list[dict[str, Any]]:
    """One row per run under ``root``: the config values that differ between runs, then size and cost (and their
    cut against the dense network), accuracy, superclass purity, inference speed and fit time."""
    paths = sorted(root.rglob("summary.json"))
    summaries = [read_summary(p) for p in paths]
    configs = [_flatten(s.get("config", {})) for s in summaries]
    keys = sorted({k for c in configs for k in c})

    def own_path(key: str) -> bool:  # a value naming each run's own directory (a logger's save_dir, ...)
        return all(isinstance(c.get(key), str) and p.parent.name in c[key] for p, c in zip(paths, configs))

    unrecorded = unrecorded_keys()
    varying = [
        k for k in keys
        if not k.startswith(("paths.", "callbacks.", *(f"{key}." for key in unrecorded))) and k not in unrecorded
        and len({json.dumps(c.get(k)) for c in configs}) > 1 and not own_path(k)
    ]
    rows = []
    for path, summary, config in zip(paths, summaries, configs):
        row: dict[str, Any] = {"run": str(path.parent.relative_to(root)) or "."}
        row |= {k: config.get(k) for k in varying}
        test_acc = summary["test_acc"].get("finetune")
        semantics = summary.get("semantics") or {}
        row |= {
            "split": summary["split"],
            "params_M": round(summary["params"] / 1e6, 4),
            "params_cut_%": round(100 * (1 - summary["params"] / summary["dense_params"]), 1),
            "GFLOPs": round(summary["flops"] / 1e9, 4),
            "flops_cut_%": round(100 * (1 - summary["flops"] / summary["dense_flops"]), 1),
            "val_acc": summary["val_acc"].get("finetune"),
            "test_acc": test_acc,
            "test_err_%": None if test_acc is None else round(100 * (1 - test_acc), 2),
            "purity": semantics.get("superclass_purity"),
            "nmi": semantics.get("nmi"),
            "img_per_s": (summary.get("inference") or {}).get("img_per_s"),
            "fit_min": None if summary.get("fit_time_s") is None else round(summary["fit_time_s"] / 60, 1),
        }
        rows.append(row)
    return rows


MEASURED = ("run", "val_acc", "test_acc", "test_err_%", "purity", "nmi", "img_per_s", "fit_min")


def mean_over(rows: list[dict[str, Any]], key: str = "seed") -> list[dict[str, Any]]:
    """Rows that differ only in ``key`` merged into one: the mean of each measured value and, for the test error,
    its spread (half the range) and the number of runs."""
    def kept(column: str) -> bool:  # not the key, nor values that follow it (data.seed: ${seed}), nor measured
        return column != key and not column.endswith(f".{key}") and column not in MEASURED

    merged: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        label = json.dumps({k: v for k, v in row.items() if kept(k)}, sort_keys=True)
        merged.setdefault(label, []).append(row)
    out = []
    for group in merged.values():
        row = {k: v for k, v in group[0].items() if kept(k)}
        row["runs"] = len(group)
        for column in MEASURED[1:]:
            values = [r[column] for r in group if r.get(column) is not None]
            row[column] = round(statistics.fmean(values), 4) if values else None
        errors = [r["test_err_%"] for r in group if r.get("test_err_%") is not None]
        row["test_err_spread"] = round((max(errors) - min(errors)) / 2, 2) if errors else None
        out.append(row)
    return out


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4g}"
    return str(value)


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Rows as an aligned text table."""
    columns = list(rows[0])
    cells = [[_cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m splitnet.report DIR``: a run directory gets its pictures redrawn; any directory holding runs
    (a sweep) gets one table of them, printed and written to DIR/report.csv."""
    parser = argparse.ArgumentParser(prog="python -m splitnet.report", description=main.__doc__)
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    root: Path = args.directory
    if not root.is_dir():
        parser.error(f"{root} is not a directory")
    record_path = root / SPLIT_RECORD
    if record_path.exists():
        for path in render_pictures(torch.load(record_path, weights_only=False), root / "pictures"):
            print(f"wrote {path}")
    elif (root / "summary.json").is_file():  # a run directory
        print(f"no pictures redrawn: {root} has no {SPLIT_RECORD} (what they are drawn from, written by a run at the "
              "split)")
    try:
        rows = sweep_rows(root)
    except SummaryError as error:
        sys.exit(f"error: {error}")
    if not rows:
        parser.error(f"no summary.json under {root}: is it a run or sweep directory of train.py?")
    print(format_rows(rows))
    print(f"wrote {write_csv(rows, root / 'report.csv')}")
    if "seed" in rows[0]:
        means = mean_over(rows)
        print("\nmean over seeds (test_err_spread: half the range)\n" + format_rows(means))
        print(f"wrote {write_csv(means, root / 'report_mean.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
