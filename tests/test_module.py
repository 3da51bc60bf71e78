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
from tests.conftest import TINY_BACKBONE, TINY_SPLIT, DispatchedOperations


def fit(module: SplitNetModule, batches: int, log_every: int, callbacks: list[pl.Callback], root: Path,
        **options) -> pl.Trainer:
    """One epoch of ``batches`` batches of 16 synthetic images; ``options``: more or other Trainer arguments."""
    data = SyntheticDataModule(seed=0, batch_size=16, train_size=16 * (batches + 1), val_size=16, num_workers=0)
    arguments = {"limit_val_batches": 0, "enable_checkpointing": False} | options
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, log_every_n_steps=log_every, logger=CSVLogger(root),
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **arguments)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
        trainer.fit(module, datamodule=data)
    return trainer


class StepRecorder(pl.Callback):
    """Each batch's loss, and per batch (then at the epoch's end) how often ``self.log`` was called."""

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


def recorded_fit(monkeypatch: pytest.MonkeyPatch, root: Path, batches: int, log_every: int,
                 accumulate: int = 1) -> StepRecorder:
    recorder = StepRecorder()
    log = pl.LightningModule.log

    def counted_log(self, name, *args, **kwargs):
        recorder.calls[-1]["log"] += 1
        return log(self, name, *args, **kwargs)

    monkeypatch.setattr(pl.LightningModule, "log", counted_log)
    torch.manual_seed(0)
    fit(SplitNetModule(TINY_BACKBONE, 10, TINY_SPLIT, SCHEDULE), batches, log_every, [recorder], root,
        accumulate_grad_batches=accumulate)
    assert len(recorder.calls) == batches + 1 and recorder.calls[-1] is recorder.epoch_end_calls
    assert recorder.epoch_end_calls["log"] == 1  # the epoch's training accuracy
    return recorder


def logged_batches(recorder: StepRecorder) -> list[int]:
    return [batch for batch, calls in enumerate(recorder.calls[:-1]) if calls["log"]]


def test_steps_log_their_scalars_only_on_logging_steps_and_the_epochs_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Lightning reads every progress-bar value on the host after each batch (on a GPU, a wait for the device): so only
    the steps the loggers write, and the epoch's last (checked before validation and the checkpoint), log anything,
    and the loggers receive that step's loss and regularisers."""
    recorder = recorded_fit(monkeypatch, tmp_path, batches=8, log_every=3)
    logging_steps = [2, 5]  # Lightning writes when (step + 1) % log_every_n_steps == 0
    assert logged_batches(recorder) == [*logging_steps, 7]
    rows = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header, logged = rows[0].split(","), [dict(zip(rows[0].split(","), row.split(","))) for row in rows[1:]]
    for name in ("group/train_loss", "group/train_ce", "group/disjoint", "group/group_weight", "group/balance"):
        assert name in header, name
    losses = {int(row["step"]): float(row["group/train_loss"]) for row in logged if row["group/train_loss"]}
    assert losses == pytest.approx({step: recorder.losses[step] for step in logging_steps})


def test_under_gradient_accumulation_only_the_batch_that_ends_a_step_logs(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch):
    recorder = recorded_fit(monkeypatch, tmp_path, batches=8, log_every=2, accumulate=2)
    assert logged_batches(recorder) == [3, 7]  # optimiser steps 1 and 3; batch 7 also ends the epoch


@pytest.mark.parametrize("log_every, step", [(2, 1), (50, 3)], ids=["logging step", "epoch's last batch"])
def test_a_diverged_loss_stops_the_run_with_its_step(tmp_path: Path, log_every: int, step: int):
    module = SplitNetModule(TINY_BACKBONE, 10, TINY_SPLIT, SCHEDULE)
    module.net.head.register_forward_hook(lambda layer, inputs, output: output * float("nan"))
    with pytest.raises(FloatingPointError,
                       match=rf"the group loss was not finite on a batch of epoch 0, steps 0-{step} \(at step {step}: "
                             r"nan\): lower the learning"):
        fit(module, batches=4, log_every=log_every, callbacks=[], root=tmp_path)



def nan_on_batch(module: SplitNetModule, batch: int) -> list[None]:
    """Make the loss of the ``batch``-th training batch (0-based) NaN; returns the list of training forward calls."""
    calls: list[None] = []

    def hook(layer, inputs, output):
        if not layer.training:  # a validation batch
            return output
        calls.append(None)
        return output * float("nan") if len(calls) == batch + 1 else output

    module.net.head.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("log_every, steps", [(50, "steps 0-1"), (1, "step 1")], ids=["unchecked since 0", "since 1"])
def test_a_loss_diverged_between_checks_stops_the_run_before_the_epoch_ends(tmp_path: Path, log_every: int, steps: str):
    """Under gradient accumulation the first micro-batch of the epoch's last step is not checked itself; the device-side
    flag carries its non-finite loss to the check, before the optimiser step writes NaN weights into the checkpoint."""
    module = SplitNetModule(TINY_BACKBONE, 10, TINY_SPLIT, SCHEDULE)
    calls = nan_on_batch(module, 2)
    with pytest.raises(FloatingPointError, match=rf"the group loss was not finite on a batch of epoch 0, {steps}: "):
        fit(module, batches=4, log_every=log_every, callbacks=[], root=tmp_path, accumulate_grad_batches=2)
    assert len(calls) == 4  # stopped at the step's last micro-batch, before its optimiser step


def test_a_run_ended_by_max_steps_checks_its_last_step(tmp_path: Path):
    module = SplitNetModule(TINY_BACKBONE, 10, TINY_SPLIT, SCHEDULE)
    calls = nan_on_batch(module, 1)
    with pytest.raises(FloatingPointError, match=r"not finite on a batch of epoch 0, steps 0-1 \(at step 1: nan\)"):
        fit(module, batches=6, log_every=50, callbacks=[], root=tmp_path, max_steps=2)
    assert len(calls) == 2


def test_a_checkpoint_between_checked_steps_is_refused_after_a_diverged_batch(tmp_path: Path):
    """A checkpoint written between checked steps (here after every step) reads the flag first: none holds the
    weights that a non-finite loss has reached."""
    module = SplitNetModule(TINY_BACKBONE, 10, TINY_SPLIT, SCHEDULE)
    nan_on_batch(module, 1)
    every_step = pl.callbacks.ModelCheckpoint(tmp_path / "checkpoints", every_n_train_steps=1, save_top_k=-1)
    with pytest.raises(FloatingPointError, match=r"not finite on a batch of epoch 0, step 1: lower"):
        fit(module, batches=6, log_every=50, callbacks=[every_step], root=tmp_path, enable_checkpointing=True)
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["epoch=0-step=1.ckpt"]


def test_the_span_of_a_check_before_a_checkpoint_in_the_middle_of_an_accumulated_step(tmp_path: Path):
    """Validation every 3 batches, accumulating over 2, checkpoints in the middle of step 1: the span ends at the step
    of the last batch run (1), not at the last step completed (0)."""
    module = SplitNetModule(TINY_BACKBONE, 10, TINY_SPLIT, SCHEDULE)
    nan_on_batch(module, 2)  # the first micro-batch of step 1
    with pytest.raises(FloatingPointError, match=r"not finite on a batch of epoch 0, steps 0-1: lower"):
        fit(module, batches=8, log_every=50, callbacks=[], root=tmp_path, accumulate_grad_batches=2,
            val_check_interval=3, limit_val_batches=1, num_sanity_val_steps=0, enable_checkpointing=True)


def test_no_checkpoint_is_written_on_the_way_out_of_a_failed_check(tmp_path: Path):
    """Lightning's save_on_exception writes a checkpoint when the check raises: it is refused too, so last.ckpt stays
    the last one written before the loss stopped being finite."""
    module = SplitNetModule(TINY_BACKBONE, 10, TINY_SPLIT, SCHEDULE)
    nan_on_batch(module, 1)
    on_exception = pl.callbacks.ModelCheckpoint(tmp_path / "checkpoints", save_last=True, save_on_exception=True)
    with pytest.raises(FloatingPointError, match=r"not finite on a batch of epoch 0, steps 0-3 \(at step 3: nan\)"):
        fit(module, batches=4, log_every=50, callbacks=[on_exception], root=tmp_path, enable_checkpointing=True)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_no_checkpoint_holds_weights_an_update_made_non_finite(tmp_path: Path):
    """An update can make weights non-finite while its own loss was finite: the checkpoint after it is refused."""

    class BadUpdate(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == 1:
                with torch.no_grad():
                    pl_module.net.head.fc.weight[0, 0] = float("inf")

    every_step = pl.callbacks.ModelCheckpoint(tmp_path / "checkpoints", every_n_train_steps=1, save_top_k=-1)
    module = SplitNetModule(TINY_BACKBONE, 10, TINY_SPLIT, SCHEDULE)
    with pytest.raises(FloatingPointError, match=r"the group weights are not finite after step 1 \(epoch 0\): lower"):
        fit(module, batches=4, log_every=50, callbacks=[BadUpdate(), every_step], root=tmp_path,
            enable_checkpointing=True)
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["epoch=0-step=1.ckpt"]


# operations that read a tensor's values on the host
HOST_READS = ("_local_scalar_dense", "nonzero", "unique", "masked_select", "is_nonzero", "equal")


def test_unchecked_steps_read_nothing_on_the_host(tmp_path: Path):
    """Between checked steps the step runs ahead of the device: no ``.item()``, no data-dependent shape (torchmetrics'
    argument checks would call ``torch.unique`` on integer predictions, not on the logits the module passes)."""
    module = SplitNetModule(TINY_BACKBONE, 10, TINY_SPLIT, SCHEDULE)
    step = module.training_step
    reads: list[list[str]] = []

    def recorded_step(batch, batch_idx):
        with DispatchedOperations() as operations:
            loss = step(batch, batch_idx)
        reads.append([name for name in operations.names if any(read in name for read in HOST_READS)])
        return loss

    module.training_step = recorded_step
    fit(module, batches=4, log_every=50, callbacks=[], root=tmp_path)
    assert reads[:3] == [[], [], []]
    assert reads[3]  # the epoch's last batch is checked: the mode does see host reads
