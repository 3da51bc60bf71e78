"""A test-only callback: each DDP rank saves its final weights and tree spec, so the test can compare ranks."""

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
