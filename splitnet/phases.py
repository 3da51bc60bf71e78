"""The phase callback: moves the module from group learning to the split tree and finetuning, inside one fit."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from splitnet.module import GROUP, SplitNetModule
from splitnet.pictures import render_pictures
from splitnet.report import SPLIT_RECORD, count_params, split_record

log = logging.getLogger(__name__)


def _limit(loader: DataLoader, limit: int | float) -> int | float:
    """The batches of ``loader`` that a Lightning ``limit_*_batches`` value lets through (a stream without a length:
    all, or ``limit`` if it is a count)."""
    try:
        size = len(loader)
    except TypeError:
        size = math.inf
    if isinstance(limit, int):
        return min(size, limit)
    return size if math.isinf(size) else int(size * limit)


@torch.no_grad()
def evaluate(module: SplitNetModule, loader: DataLoader, datamodule, max_batches: int | float) -> float:
    """Top-1 accuracy of the module's network on ``loader`` (at most ``max_batches`` batches), in eval mode."""
    was_training = module.net.training
    module.net.eval()
    accuracy = MulticlassAccuracy(module.hparams.num_classes, average="micro").to(module.device)
    for index, batch in enumerate(loader):
        if index >= max_batches:
            break
        images, labels = datamodule.fetch(batch, module.device, train=False)
        accuracy.update(module(images), labels)
    module.net.train(was_training)
    return accuracy.compute().item()


class SplitPhase(pl.Callback):
    """At the start of epoch ``at_epoch``: evaluate the dense network, split it, evaluate the tree, rebuild the optimiser.

    Whether to split is read from the module's own state (still dense and the epoch reached), so a run
    resumed from any checkpoint neither skips nor repeats the split. Under DDP the new parameters are
    re-wrapped; the optimiser and LR schedule are rebuilt for the tree with the finetune settings.
    """

    def __init__(self, at_epoch: int, evaluate_phases: bool = True) -> None:
        self.at_epoch = at_epoch
        self.evaluate_phases = evaluate_phases

    def _record(self, trainer: pl.Trainer, module: SplitNetModule, phase: str) -> None:
        if not self.evaluate_phases:
            return
        datamodule = trainer.datamodule
        results = {}
        for split, limit in (("val", trainer.limit_val_batches), ("test", trainer.limit_test_batches)):
            loader = getattr(datamodule, f"{split}_dataloader")()
            if batches := _limit(loader, limit):  # none: no validation set (data.val_size=0) or limited to none
                results[f"{split}_acc"] = evaluate(module, loader, datamodule, batches)
        module.phase_results[phase] = results
        for logger in trainer.loggers:
            logger.log_metrics({f"{phase}/{k}": v for k, v in results.items()}, step=trainer.global_step)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: SplitNetModule) -> None:
        if pl_module.phase != GROUP or trainer.current_epoch < self.at_epoch:
            return
        self._record(trainer, pl_module, "group")
        dense = pl_module.net
        probs = pl_module.grouping.probabilities() if pl_module.grouping is not None else {}
        spec = pl_module.split()
        if isinstance(trainer.strategy, DDPStrategy):
            if trainer.strategy._layer_sync is not None:
                pl_module.net = trainer.strategy._layer_sync.apply(pl_module.net)
            trainer.strategy.model = pl_module
            trainer.strategy.configure_ddp()
        trainer.strategy.setup_optimizers(trainer)
        log.info(
            "split %s at epoch %d: params %.3fM -> %.3fM; class groups %s; channel groups %s",
            "-".join(map(str, spec.groups)), trainer.current_epoch, count_params(dense) / 1e6,
            count_params(pl_module.unpacked_net()) / 1e6, [len(g) for g in pl_module.net.class_groups()],
            spec.group_sizes(),
        )
        self._record(trainer, pl_module, "split")
        if trainer.is_global_zero:
            data = trainer.datamodule
            known = getattr(data, "superclass_of", None)
            superclasses = (known, data.superclass_names) if known else None
            self._save_pictures(trainer, split_record(dense, pl_module.plan, spec, probs, data.class_names, superclasses))

    @staticmethod
    def _save_pictures(trainer: pl.Trainer, record: dict) -> None:
        """Keep the split record in the run directory, draw its pictures, and send them to wandb if it logs."""
        run_dir = Path(trainer.default_root_dir)
        torch.save(record, run_dir / SPLIT_RECORD)
        paths = render_pictures(record, run_dir / "pictures")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("split/pictures", [str(p) for p in paths], step=trainer.global_step,
                                 caption=[p.stem for p in paths])
