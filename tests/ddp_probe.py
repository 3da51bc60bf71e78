"""Test-only callbacks: what each DDP rank ends with (weights, tree spec) or evaluated, so tests can compare ranks;
a loss made NaN on one rank only."""

from pathlib import Path

import pytorch_lightning as pl
import torch


class SaveRankState(pl.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        torch.save({"state_dict": state, "tree_spec": pl_module.tree_spec.to_dict()},
                   self.out_dir / f"rank{trainer.global_rank}.pt")


class SaveSeenLabels(pl.Callback):
    """Each DDP rank saves the labels of the training and test samples it was given."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.seen: dict[str, list[int]] = {"train": [], "test": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen["train"].extend(batch[1].tolist())

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.seen["test"].extend(batch[1].tolist())

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.seen, self.out_dir / f"labels{trainer.global_rank}.pt")


class NanLossOnRank(pl.Callback):
    """Makes the loss of training batch ``batch`` (0-based) NaN on rank ``rank`` only."""

    def __init__(self, rank: int, batch: int) -> None:
        self.rank, self.batch = rank, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and batch_idx == self.batch and trainer.current_epoch == 0:
            batch[0].fill_(float("nan"))
