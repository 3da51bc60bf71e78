"""Train SplitNet: group learning on the dense network, the split, finetuning of the tree, then the test set.

    python train.py                                  # WRN-16-8, CIFAR-100, split 2-2-2, the paper's schedule
    python train.py split=4-4-4 schedule=fast        # any config group / value can be overridden
    python train.py -m split=2-2-2,4-4-4 seed=0,1    # a Hydra sweep
"""

from __future__ import annotations

import logging
import pickle
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Timer
from pytorch_lightning.loggers import WandbLogger

from splitnet.bench import inference_speed
from splitnet.data import DataError
from splitnet.errors import ConfigError, is_whole_number
from splitnet.module import SplitNetModule
from splitnet.plan import SplitConfigError
from splitnet.report import build_summary, format_table, network_stats, summary_scalars, write_summary

log = logging.getLogger("splitnet")
OmegaConf.register_new_resolver("run_name", lambda overrides: overrides or "default", replace=True)
OmegaConf.register_new_resolver("on_gpu", lambda gpu, cpu: gpu if torch.cuda.is_available() else cpu, replace=True)


class RunDirError(RuntimeError):
    """The run directory already holds another run's checkpoints."""


def resolve_ckpt_path(ckpt_path: str | None, checkpoint_dir: str) -> str | None:
    """``last`` means this run directory's last checkpoint, ``auto`` that checkpoint if there is one (else a fresh
    start: for jobs that are requeued with the same command); anything else must be an existing file."""
    last = Path(checkpoint_dir) / "last.ckpt"
    if ckpt_path == "auto":
        return str(last) if last.is_file() else None
    if ckpt_path is None:
        if last.exists():
            raise RunDirError(
                f"{Path(checkpoint_dir).parent} already holds a run (checkpoints/last.ckpt): add ckpt_path=last to "
                "resume it, or set hydra.run.dir to a new folder; nothing was overwritten"
            )
        return None
    path = last if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no checkpoint at {path}")
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"ckpt_path={ckpt_path}: {path} is not a checkpoint (not a file written by torch.save)")
    return str(path)


def load_pretrained(net: torch.nn.Module, path: str) -> None:
    """Start from a torchvision state dict (ResNets, AlexNet)."""
    if not hasattr(net, "load_torchvision_state_dict"):
        raise SplitConfigError(f"pretrained={path}: backbone {type(net).__name__} takes no torchvision weights")
    if not Path(path).is_file():
        raise FileNotFoundError(f"pretrained={path}: no such file")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError) as error:
        raise ConfigError(f"pretrained={path}: not a state dict written by torch.save ({str(error).splitlines()[0]})"
                          ) from None
    if not isinstance(state_dict, Mapping):
        raise ConfigError(f"pretrained={path}: holds a {type(state_dict).__name__}, not a state dict")
    try:
        net.load_torchvision_state_dict(state_dict)
    except RuntimeError as error:  # load_state_dict's shape mismatches: another architecture's weights
        detail = "; ".join(line.strip() for line in str(error).splitlines()[1:3])
        raise ConfigError(f"pretrained={path}: not a torchvision {net.name} state dict: {detail}") from None


def resume_hint(cfg: DictConfig) -> str:
    """How to go on with a run that stopped: its command plus ``ckpt_path=auto`` (in a sweep, with the sweep's
    folder)."""
    last = Path(cfg.paths.checkpoint_dir) / "last.ckpt"
    if not last.exists():
        return "no checkpoint was written yet"
    in_sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    sweep = f" hydra.sweep.dir={HydraConfig.get().sweep.dir}" if in_sweep else ""
    return f"the same command plus ckpt_path=auto{sweep} goes on from {last}"


def check_run_config(cfg: DictConfig) -> None:
    """Fail before any work on top-level values that would only fail at the end of a run, or be silently ignored."""
    if not is_whole_number(cfg.seed) or not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed={cfg.seed!r}: must be a whole number from 0 to 2**32 - 1")
    batch = cfg.inference_batch
    if batch is not None and (not is_whole_number(batch) or batch < 1):
        raise ConfigError(f"inference_batch={batch!r}: must be a positive integer, or null to skip the timing")
    for key in ("max_epochs", "min_epochs"):
        if key in cfg.trainer:
            raise ConfigError(f"trainer.{key}={cfg.trainer[key]}: a run's epochs are schedule.group.epochs + "
                              "schedule.finetune.epochs; set those")


def train(cfg: DictConfig) -> dict | None:
    """Run all phases as configured; returns the summary (also written to <output_dir>/summary.json), or None if the
    run stopped before its last epoch."""
    check_run_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.checkpoint_dir)
    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    model = SplitNetModule(
        backbone=OmegaConf.to_container(cfg.backbone, resolve=True),
        num_classes=datamodule.num_classes,
        split=OmegaConf.to_container(cfg.split, resolve=True),
        schedule=OmegaConf.to_container(cfg.schedule, resolve=True),
        **cfg.model,
    )
    if cfg.pretrained and ckpt_path is None:
        load_pretrained(model.net, cfg.pretrained)
    dense = network_stats(model.net, datamodule.image_shape)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    loggers = [instantiate(c) for c in cfg.logger.values()] if cfg.get("logger") else False
    epochs = cfg.schedule.group.epochs + cfg.schedule.finetune.epochs
    trainer: pl.Trainer = instantiate(cfg.trainer, max_epochs=epochs, callbacks=callbacks, logger=loggers)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)  # callbacks.timer, unless removed
    # stopped early (trainer.max_time, trainer.max_steps, ...): Lightning counts an epoch cut short as done, and a
    # resumed run goes on with the next one
    if trainer.current_epoch < epochs or trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step:
        spent = timer is not None and timer.time_remaining() is not None and timer.time_remaining() <= 0
        log.warning("the run stopped with %d of %d epochs begun (step %d): no test and no summary; %s%s",
                    trainer.current_epoch, epochs, trainer.global_step, resume_hint(cfg),
                    " (trainer.max_time counts the whole fit, resumed parts included: raise it or leave it out)"
                    if spent else "")
        return None
    finetune = {}
    for split, evaluate in (("val", trainer.validate), ("test", trainer.test)):
        results = evaluate(model, datamodule=datamodule, verbose=False)  # [] without batches (data.val_size=0)
        if results and f"{model.phase}/{split}_acc" in results[0]:
            finetune[f"{split}_acc"] = results[0][f"{model.phase}/{split}_acc"]
    speed = {"fit_time_s": round(timer.time_elapsed("train"), 1)} if timer else {}
    if cfg.inference_batch and trainer.is_global_zero:  # on the training device (Lightning moved the model off it)
        try:
            speed["inference"] = inference_speed(model.unpacked_net(), datamodule.image_shape, cfg.inference_batch,
                                                 trainer.strategy.root_device, bf16="bf16" in str(trainer.precision))
        except torch.OutOfMemoryError as error:  # the summary matters more than the timing
            log.warning("inference_batch=%d did not fit in memory, no timing in the summary: %s", cfg.inference_batch,
                        str(error).splitlines()[0])
    summary = build_summary(
        model, datamodule, {**model.phase_results, model.phase: finetune}, dense, trainer.current_epoch,
        OmegaConf.to_container(cfg, resolve=True), speed,
    )
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(summary_scalars(summary))
    if trainer.is_global_zero:
        path = write_summary(summary, cfg.paths.output_dir)
        log.info("summary written to %s\n%s", path, format_table(summary))
    return summary


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except SystemExit:  # Lightning's own exit after Ctrl-C
        log.error("stopped; %s", resume_hint(cfg))
        raise
    except FloatingPointError as error:
        last = Path(cfg.paths.checkpoint_dir) / "last.ckpt"
        where = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written before it"
        log.error("%s; %s", error, where)
        sys.exit(f"error: {error}; {where}")
    except (ConfigError, DataError, RunDirError, FileNotFoundError, InstantiationException) as error:
        if isinstance(error, InstantiationException):  # a bad value met in a config object's constructor
            if not isinstance(error.__cause__, (ConfigError, DataError, FileNotFoundError)):
                raise
            error = error.__cause__
        log.error("%s", error)
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
