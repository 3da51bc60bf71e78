"""The LightningModule: one network (dense, then the split tree), its soft assignments, loss, metrics and optimiser."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from splitnet.errors import ConfigError, is_number
from splitnet.grouped import MAX_PADDING_SHARE, GroupedTree, separate_branches
from splitnet.grouping import GroupAssignments, RegulariserTerms
from splitnet.plan import SplitConfigError, parse_groups
from splitnet.schedule import build_optimizer, check_schedule
from splitnet.surgery import ASSIGN_METHODS, TreeSpec, block_masks, build_tree, hard_assign

GROUP, FINETUNE = "group", "finetune"
log = logging.getLogger(__name__)


def set_dropout(parts: Iterable[nn.Module], p: float) -> None:
    """Set the probability of every dropout layer in ``parts``: a phase's dropout goes to the split levels, the dense
    network's or the tree's branches (method.md: in the split blocks and before the classifier), never to the trunk."""
    for part in parts:
        for module in part.modules():
            if isinstance(module, nn.Dropout):
                module.p = p


def compiled(model: nn.Module, mode: bool | str) -> nn.Module | None:
    """``model`` through ``torch.compile``: ``mode`` true for its default mode or a mode's name; None if ``mode`` is
    false. An unknown mode is a ConfigError naming ``model.compile``."""
    if not mode:
        return None
    try:
        return torch.compile(model, mode=None if mode is True else mode)
    except RuntimeError as error:  # an unknown mode
        raise ConfigError(f"model.compile={mode!r}: {error}") from None


class SplitNetModule(pl.LightningModule):
    """Trains a backbone through SplitNet's phases; which phase it is in follows from its own state.

    Before the split (``tree_spec is None``) it is in group learning: cross-entropy plus the three
    regularisers on the soft assignments. ``split()`` cuts the network into the tree and the module
    is then in finetuning: cross-entropy only. The phase callbacks in ``splitnet.phases`` decide when.

    Args:
        backbone: Hydra config of the dense backbone (``_target_`` and arguments); ``num_classes`` is added.
        num_classes: number of classes of the data.
        split: ``groups`` (e.g. ``"2-2-2"``), ``assign`` (argmax / balanced / random), ``gamma1..3``, ``seed``.
        schedule: per-phase optimiser settings, ``group`` and ``finetune`` (see ``conf/schedule``).
        channels_last: keep the network and its inputs in channels-last memory format.
        compile: run the network through ``torch.compile`` (compiled again after the split): true, or one of its
            modes, e.g. ``reduce-overhead`` (CUDA graphs). The regularisers are compiled with it.
        compile_regularisers: compile only the regularisers (default mode), the network staying eager.
        grouped_branches: finetune the tree with each level's branches packed into grouped layers
            (``splitnet.grouped``): one kernel launch per layer for all of them instead of one per branch (on in
            train.py's config; see ``apply_split`` for uneven groups).
    """

    def __init__(
        self, backbone: dict, num_classes: int, split: dict, schedule: dict, channels_last: bool = False,
        compile: bool | str = False, compile_regularisers: bool = False, grouped_branches: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("channels_last", channels_last), ("compile_regularisers", compile_regularisers),
                            ("grouped_branches", grouped_branches)):
            if not isinstance(value, bool):
                raise ConfigError(f"model.{name}={value!r}: must be true or false")
        self.save_hyperparameters()
        check_schedule(schedule, (GROUP, FINETUNE))
        if schedule[FINETUNE]["epochs"] < 1:
            raise ConfigError(f"schedule.finetune.epochs={schedule[FINETUNE]['epochs']}: the split comes at the start "
                              "of the first finetune epoch, so there must be at least one")
        self.net: nn.Module = instantiate(backbone, num_classes=num_classes)
        self.plan = self.net.split_plan
        self.groups = parse_groups(split["groups"], self.plan)
        if split.get("assign", "argmax") not in ASSIGN_METHODS:
            raise SplitConfigError(f"split.assign='{split['assign']}' is not one of {', '.join(ASSIGN_METHODS)}")
        for key in ("gamma1", "gamma2", "gamma3"):
            if key in split and not (is_number(split[key]) and split[key] >= 0):
                raise ConfigError(f"split.{key}={split[key]!r}: must be a number, 0 or more")
        self.grouping: GroupAssignments | None = (
            GroupAssignments(self.plan, self.groups, self.net) if max(self.groups) > 1 else None
        )
        self.tree_spec: TreeSpec | None = None
        # after the commit with ``off_block_fade``: each split layer's off-block mask for the groups the split will cut
        self._off_block_masks: dict[str, Tensor] | None = None
        self.phase_results: dict[str, dict[str, float]] = {}
        # whether every batch's loss since the last check was finite (on the device, read when checked), the steps of
        # the first and the last such batch, and once a check has failed its message (no checkpoint is written after)
        self._finite_since_check: Tensor | None = None
        self._unchecked_steps = (0, 0)
        self._divergence: str | None = None
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        set_dropout([self.net.get_submodule(level.module) for level in self.plan.levels],
                    schedule[GROUP].get("dropout", 0.0))
        self._prepare_net()

    def _prepare_net(self) -> None:
        """Apply the memory format and compilation settings to the current network and to the regularisers (compiled,
        their many small operations fuse into a few kernels)."""
        if self.hparams.channels_last:
            self.net.to(memory_format=torch.channels_last)
        mode = self.hparams.compile
        regularisers = self.grouping.regularisers if self.grouping is not None else None
        # both kept outside the module tree so that checkpoints hold the plain network's keys
        object.__setattr__(self, "_compiled_net", compiled(self.net, mode))
        compile_regularisers = regularisers is not None and (bool(mode) or self.hparams.compile_regularisers)
        object.__setattr__(self, "_regularisers", torch.compile(regularisers) if compile_regularisers else regularisers)

    def _run(self, images: Tensor) -> Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return (self.net if self._compiled_net is None else self._compiled_net)(images)

    def unpacked_net(self) -> nn.Module:
        """The dense network, or the tree with its branches as separate modules: what parameter and FLOP counts, export
        and branch-parallel inference take. A grouped tree is unpacked into a new module; any other is ``self.net``."""
        return separate_branches(self.net)

    @property
    def phase(self) -> str:
        return GROUP if self.tree_spec is None else FINETUNE

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x)

    # --- the split ---------------------------------------------------------------------------------------
    def split_spec(self) -> TreeSpec:
        """The hard groups the split would cut now: the assignments hardened by ``split.assign``."""
        probs = self.grouping.probabilities() if self.grouping is not None else {}
        split = self.hparams.split
        return hard_assign(self.groups, probs, split.get("assign", "argmax"), split.get("seed", 0))

    def split(self) -> TreeSpec:
        """Harden the assignments into a tree spec and replace the dense network by the tree."""
        spec = self.split_spec()
        self.apply_split(spec)
        return spec

    def apply_split(self, spec: TreeSpec, grouped: bool | None = None) -> None:
        """Rebuild the network as the tree of ``spec`` (weights from the current network's diagonal blocks), its
        branches packed into grouped layers if ``grouped``; by default if ``grouped_branches`` and the groups are even
        enough (padding at most ``MAX_PADDING_SHARE`` of the packed weights). ``grouped_branches`` then says which."""
        with torch.no_grad():
            tree = build_tree(self.net, self.plan, spec)
            set_dropout([tree.branches], self.hparams.schedule[FINETUNE].get("dropout", 0.0))
            net = tree
            if (self.hparams.grouped_branches if grouped is None else grouped) and max(self.groups) > 1:
                net = GroupedTree(tree, self.plan)
                padding = net.padding_share()
                if grouped is None and padding > MAX_PADDING_SHARE:
                    log.warning("the groups are so uneven that packing the branches would pad %.0f%% of their weights "
                                "with zeros: finetuning them one after another instead", 100 * padding)
                    net = tree
        self.hparams.grouped_branches = isinstance(net, GroupedTree)
        self.net = net.train(self.net.training)
        self.grouping = None
        self._off_block_masks = None
        self.tree_spec = spec
        self._prepare_net()

    # --- steps -------------------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self._run(images)
        loss = F.cross_entropy(logits, labels)
        scalars = {"train_ce": loss}
        if self.phase == GROUP and self.grouping is not None:
            terms = self._regularisers(self.net)
            loss = loss + self.regularisation(terms)
            scalars |= {"disjoint": terms.disjoint, "group_weight": terms.group_weight, "balance": terms.balance}
        scalars["train_loss"] = loss
        self.train_acc.update(logits, labels)
        finite = torch.isfinite(loss.detach())
        if self._finite_since_check is None:
            self._finite_since_check, self._unchecked_steps = finite, (self.global_step, self.global_step)
        else:
            self._finite_since_check &= finite
            self._unchecked_steps = (self._unchecked_steps[0], self.global_step)
        if self._checked_step():
            self._log_step_scalars(scalars)
        return loss

    def _checked_step(self) -> bool:
        """Whether this batch's values are read: on the steps the loggers write (every ``trainer.log_every_n_steps``,
        every step under ``fast_dev_run``) and on the epoch's (or the run's) last batch, before validation and the
        checkpoint; under gradient accumulation on the batch that ends the step only. (Lightning 2.6's own callbacks
        read the same private properties.)"""
        fit_loop = self.trainer.fit_loop
        if fit_loop._should_accumulate():
            return False
        last = fit_loop.epoch_loop._num_ready_batches_reached() or 0 <= self.trainer.max_steps <= self.global_step + 1
        return last or bool(self.trainer.fast_dev_run) or self.trainer._logger_connector.should_update_logs

    def _log_step_scalars(self, scalars: dict[str, Tensor]) -> None:
        """Log the step's scalars, read to the host in one transfer with the finite flag, and stop a diverged run.

        Called on checked steps only: Lightning reads every progress-bar value on the host after every batch, which on
        a GPU would make each step wait for the device. Host tensors cost nothing to read, so the progress bar shows
        these values as of the last checked step.
        """
        values = torch.stack([value.detach().float() for value in (*scalars.values(), self._finite_since_check)]).cpu()
        named = dict(zip(scalars, values[:-1]))
        self._stop_if_diverged(bool(values[-1]), named["train_loss"].item())
        for name, value in named.items():
            self.log(f"{self.phase}/{name}", value, prog_bar=name != "train_ce")

    def _stop_if_diverged(self, finite_since_check: bool, loss: float | None = None) -> None:
        """Raise if any batch's loss since the last check was not finite, on this process or another (every process
        checks at the same step, so all stop together); ``loss``: the last batch's, if known. Starts the next span."""
        self._finite_since_check = None
        if self.trainer.strategy.reduce_boolean_decision(finite_since_check, all=True):
            return
        first, last = self._unchecked_steps
        steps = f"step {last}" if first == last else f"steps {first}-{last}"
        if finite_since_check:
            what = f"another process's {self.phase} loss is not finite (epoch {self.current_epoch}, {steps})"
        else:
            what = f"the {self.phase} loss was not finite on a batch of epoch {self.current_epoch}, {steps}"
            if loss is not None and not math.isfinite(loss):
                what += f" (at step {last}: {loss})"
        self._diverged(what)

    def _diverged(self, what: str) -> None:
        """Stop the run, and remember why: no checkpoint is written after it (``on_save_checkpoint``)."""
        self._divergence = f"{what}: lower the learning rate or the gammas and resume from the last checkpoint"
        raise FloatingPointError(self._divergence)

    def on_train_start(self) -> None:
        self._finite_since_check, self._divergence = None, None  # nothing carried over from an earlier fit

    def on_train_epoch_end(self) -> None:
        self.log(f"{self.phase}/train_acc", self.train_acc)

    def regularisation(self, terms: RegulariserTerms) -> Tensor:
        """gamma1 T + gamma2 S + gamma3 U; with ``assignment_commit`` the disjoint term is left out, since the commit
        hardens the assignments in its place (before it, the term would harden them before they orient)."""
        split = self.hparams.split
        gamma1 = 0.0 if self._commit_epoch() is not None else split["gamma1"]
        return gamma1 * terms.disjoint + split["gamma2"] * terms.group_weight + split["gamma3"] * terms.balance

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.val_acc.update(self._run(images), labels)

    def on_validation_epoch_end(self) -> None:
        self.log(f"{self.phase}/val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.test_acc.update(self._run(images), labels)

    def on_test_epoch_end(self) -> None:
        self.log(f"{self.phase}/test_acc", self.test_acc)

    def _commit_epoch(self) -> int | None:
        """The group epoch at which the assignments are hardened (``schedule.group.assignment_commit``), or None."""
        settings = self.hparams.schedule[GROUP]
        commit = settings.get("assignment_commit")
        return None if commit is None else round(commit * settings["epochs"])

    def _assignments_held(self) -> bool:
        settings = self.hparams.schedule[GROUP]
        commit = self._commit_epoch()
        return self.current_epoch < settings.get("assignment_delay", 0) * settings["epochs"] or (
            commit is not None and self.current_epoch >= commit
        )

    def on_train_epoch_start(self) -> None:
        """Seed the epoch's random draws (dropout) from the run's seed, the epoch and the process: the same in a resumed
        run as in an uninterrupted one, different on every DDP process. From the commit epoch on, keep the assignments
        hardened to balanced groups (idempotent, so resumes agree), and with ``off_block_fade`` take the off-block
        masks of the groups the split will cut."""
        seed = self.hparams.split.get("seed", 0)  # the run's seed (split.seed: ${seed})
        torch.manual_seed(((seed * 1_000_003 + self.current_epoch) * 65_537 + self.global_rank) % 2**63)
        commit = self._commit_epoch()
        if self.grouping is not None and commit is not None and self.current_epoch >= commit:
            self.grouping.commit()
            if self.hparams.schedule[GROUP].get("off_block_fade", False):
                masks = block_masks(self.net, self.plan, self.split_spec())
                self._off_block_masks = {name: 1 - mask for name, mask in masks.items()}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """With ``off_block_fade``, after every step from the commit on, scale the split layers' off-block weights by
        r / (r + 1), r the steps left in the group phase: without other updates they fade linearly, and the last step
        sets them to zero, so that the split removes only zeros."""
        if self._off_block_masks is None:
            return
        epochs_left = self.hparams.schedule[GROUP]["epochs"] - self.current_epoch
        left = max(0, epochs_left * self.trainer.num_training_batches - batch_idx - 1)
        with torch.no_grad():
            for name, off_block in self._off_block_masks.items():
                weight = self.net.get_submodule(name).weight
                weight.addcmul_(weight, off_block, value=-1 / (left + 1))  # off-block w * r / (r + 1), 0 when r = 0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Hold the assignments still before ``assignment_delay`` and after ``assignment_commit`` (shares of the
        group phase's epochs; SGD skips a parameter without a gradient); in between, with ``assignment_update:
        unit_rms``, rescale each grouping's gradient to unit RMS."""
        if self.grouping is None:
            return
        if self._assignments_held():
            for alpha in self.grouping.parameters():
                alpha.grad = None
        elif self.hparams.schedule[GROUP].get("assignment_update") == "unit_rms":
            self.grouping.normalise_gradients()

    def configure_optimizers(self) -> dict[str, Any]:
        settings = self.hparams.schedule[self.phase]
        steps_per_epoch = self._steps_per_epoch()
        extra = list(self.grouping.parameters()) if self.grouping is not None else []
        optimizer, scheduler = build_optimizer(self.net.parameters(), extra, settings, steps_per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _steps_per_epoch(self) -> int:
        """Optimiser steps per epoch, for the LR schedules: from the epoch's batches (``trainer.max_steps`` may end
        the run early, but does not squeeze the schedule); for data without a length, ``max_steps`` over the epochs."""
        trainer = self.trainer
        estimate = trainer.estimated_stepping_batches  # sets the training data up, and with it num_training_batches
        if math.isinf(trainer.num_training_batches):  # a stream without a length (the bench's): max_steps shared out
            return max(1, int(estimate) // max(1, trainer.max_epochs))
        return max(1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches))

    # --- checkpoints -------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # never a checkpoint after a batch whose loss was not finite: not between checked steps, nor on the way out
        # of a failed check (Lightning's save_on_exception)
        if self._divergence is not None:
            raise FloatingPointError(self._divergence)
        if self._finite_since_check is not None:
            self._stop_if_diverged(bool(self._finite_since_check))
        # nor one of weights that an update turned non-finite while its loss was finite (one read per checkpoint)
        finite_weights = bool(torch.stack(torch._foreach_norm(list(self.parameters()))).isfinite().all())
        if not self.trainer.strategy.reduce_boolean_decision(finite_weights, all=True):
            self._diverged(f"the {self.phase} weights are not finite after step {self.global_step - 1} "
                           f"(epoch {self.current_epoch})")
        checkpoint["splitnet"] = {
            "groups": list(self.groups),
            "tree_spec": None if self.tree_spec is None else self.tree_spec.to_dict(),
            "grouped_branches": isinstance(self.net, GroupedTree),
            "phase_results": self.phase_results,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "splitnet" not in checkpoint:
            raise SplitConfigError("this checkpoint was not written by splitnet (it has no 'splitnet' entry)")
        state = checkpoint["splitnet"]
        saved = checkpoint["hyper_parameters"]["backbone"]
        if saved != self.hparams.backbone:
            raise SplitConfigError(f"the checkpoint's backbone {dict(saved)} differs from this run's {dict(self.hparams.backbone)}")
        classes = checkpoint["hyper_parameters"]["num_classes"]
        if classes != self.hparams.num_classes:
            raise SplitConfigError(f"the checkpoint was trained on {classes} classes, this run's data has "
                                   f"{self.hparams.num_classes}")
        if tuple(state["groups"]) != self.groups:
            raise SplitConfigError(
                f"the checkpoint was trained for split {'-'.join(map(str, state['groups']))}, "
                f"but this run's split.groups is '{self.hparams.split['groups']}'"
            )
        self.phase_results = state["phase_results"]
        if state["tree_spec"] is not None and self.tree_spec is None:
            # the layout the weights (and the optimiser's state) were saved in, whatever this run's setting
            grouped = state.get("grouped_branches", False)
            if grouped and not self.hparams.grouped_branches:
                log.warning("the checkpoint's tree was finetuned grouped: it goes on grouped, whatever "
                            "model.grouped_branches=false")
            elif not grouped and self.hparams.grouped_branches and max(self.groups) > 1:
                log.warning("the checkpoint's tree was finetuned branch after branch (so configured, or its groups too "
                            "uneven to pack): it goes on that way")
            self.apply_split(TreeSpec.from_dict(state["tree_spec"]), grouped)
