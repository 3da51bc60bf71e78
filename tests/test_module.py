"""The LightningModule's training steps: what they log, when, and how a diverged run stops."""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from splitnet.bench import SCHEDULE
from splitnet.data import SyntheticDataModule
from splitnet.module import SplitNetModule

BACKBONE = {"_target_": "splitnet.backbones.wide_resnet", "depth": 10, "width": 1}
SPLIT = {"groups": "2-2-2", "gamma1": 1.0, "gamma2": 1.0, "gamma3": 10.0}


def fit(module: SplitNetModule, steps: int, log_every: int, callbacks: list[pl.Callback], root: Path) -> pl.Trainer:
    data = SyntheticDataModule(seed=0, batch_size=16, train_size=16 * (steps + 1), val_size=16, num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=0, log_every_n_steps=log_every,
                         logger=CSVLogger(root), enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
        trainer.fit(module, datamodule=data)
    return trainer


class StepRecorder(pl.Callback):
    """Each step's loss, and per step (then at the epoch's end) how often ``self.log`` and ``torch.unique`` (a host
    read on a GPU) were called."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.calls: list[Counter] = []
        self.epoch_end_calls = Counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.calls.append(Counter())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.calls.append(self.epoch_end_calls)  # the module's own epoch-end hook runs after the callbacks'

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


def test_steps_log_their_scalars_only_on_logging_steps_and_read_nothing_on_the_host_in_between(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Lightning reads every logged device tensor on the host after each batch (on a GPU, a wait for the device), and
    torchmetrics' argument checks read the labels (torch.unique): so only the steps the loggers write log anything,
    and what they log is that step's loss and regularisers."""
    recorder = StepRecorder()
    log, unique = pl.LightningModule.log, torch.unique

    def counted_log(self, name, *args, **kwargs):
        recorder.calls[-1]["log"] += 1
        return log(self, name, *args, **kwargs)

    def counted_unique(*args, **kwargs):
        recorder.calls[-1]["unique"] += 1
        return unique(*args, **kwargs)

    monkeypatch.setattr(pl.LightningModule, "log", counted_log)
    monkeypatch.setattr(torch, "unique", counted_unique)
    torch.manual_seed(0)
    fit(SplitNetModule(BACKBONE, 10, SPLIT, SCHEDULE), steps=7, log_every=3, callbacks=[recorder], root=tmp_path)

    logging_steps = [2, 5]  # Lightning writes when (step + 1) % log_every_n_steps == 0
    step_calls = recorder.calls[:-1]
    assert len(step_calls) == 7 and recorder.calls[-1] is recorder.epoch_end_calls
    assert [step for step, calls in enumerate(step_calls) if calls["log"]] == logging_steps
    assert recorder.epoch_end_calls["log"] == 1  # the epoch's training accuracy
    assert all(calls["unique"] == 0 for calls in recorder.calls)
    rows = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header, logged = rows[0].split(","), [dict(zip(rows[0].split(","), row.split(","))) for row in rows[1:]]
    for name in ("group/train_loss", "group/train_ce", "group/disjoint", "group/group_weight", "group/balance"):
        assert name in header, name
    losses = {int(row["step"]): float(row["group/train_loss"]) for row in logged if row["group/train_loss"]}
    assert losses == pytest.approx({step: recorder.losses[step] for step in logging_steps})


def test_a_diverged_loss_stops_the_run_with_its_step(tmp_path: Path):
    module = SplitNetModule(BACKBONE, 10, SPLIT, SCHEDULE)
    module.net.head.register_forward_hook(lambda layer, inputs, output: output * float("nan"))
    with pytest.raises(FloatingPointError, match=r"the group loss is nan at epoch 0, step 1: lower the learning rate"):
        fit(module, steps=4, log_every=2, callbacks=[], root=tmp_path)
