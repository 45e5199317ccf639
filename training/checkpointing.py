"""A run's checkpoints: what the trainer saves (the deployable weights and everything to resume)
and how a resume restores it, refusing a changed global batch.

training/state.py writes and verifies the files; this module decides what goes in them. A
checkpoint needs no RNG state: the trainer seeds every micro-batch from (seed, step, shard).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.swa_utils import AveragedModel

from galmorph.model.checkpoint import ModelSpec, save_model
from galmorph.training import distributed
from galmorph.training.config import ConfigError, TrainConfig, flatten_keys, migrate_legacy_keys
from galmorph.training.evaluate import SPLIT_FILE_NAME
from galmorph.training.optim import ModelEma, published_weights
from galmorph.training.state import has_checkpoint, load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

STATE_FORMAT = 1
# Config keys that may change between a run and its resumption without changing its course.
RESUME_FREE_KEYS = frozenset(
    {"out", "data", "num_workers", "progress", "log_every_steps", "tensorboard", "threads"}
    | {"eval_batch_size", "stop_after_step", "checkpoint_every_steps", "device", "compile"}
)


@dataclass
class EpochTotals:
    """Running sums over an epoch (this rank's share, or the global sum after a reduction)."""

    loss: float = 0.0
    correct: float = 0.0
    images: float = 0.0
    steps: float = 0.0

    def as_list(self) -> list[float]:
        return [self.loss, self.correct, self.images, self.steps]

    def summed(self, ctx: distributed.DistContext) -> EpochTotals:
        """The global sums (a collective: every rank calls it)."""
        return EpochTotals(*distributed.sum_across_ranks(ctx, self.as_list()))


@dataclass
class Progress:
    epoch: int = 0
    step: int = 0  # optimizer steps completed in the whole run
    history: list[dict[str, Any]] = field(default_factory=list)


class Checkpointer:
    """Saves and restores one run's weights, optimizer, weight average and position."""

    def __init__(
        self,
        config: TrainConfig,
        ctx: distributed.DistContext,
        run_dir: Path,
        *,
        model: nn.Module,
        ema: ModelEma | None,
        swa: AveragedModel | None,
        optimizer: Optimizer,
        steps_per_epoch: int,
    ) -> None:
        self.config = config
        self.ctx = ctx
        self.run_dir = run_dir
        self.model = model  # the bare model, not its DDP or compiled wrapper
        self.ema = ema
        self.swa = swa
        self.optimizer = optimizer
        self.steps_per_epoch = steps_per_epoch

    def exists(self) -> bool:
        return has_checkpoint(self.run_dir)

    def save(self, spec: ModelSpec, progress: Progress, totals: EpochTotals) -> None:
        """Model for deployment plus the full training state; rank 0 writes, all wait."""
        summed = totals.summed(self.ctx)
        if self.ctx.is_main:
            if progress.history:
                last = progress.history[-1]
                spec.metrics = {k: v for k, v in last.items() if k.startswith("val_")}
            save_model(self.run_dir, published_weights(self.model, self.ema, self.swa), spec)
            state = {
                "format": STATE_FORMAT,
                "epoch": progress.epoch,
                "step": progress.step,
                "steps_per_epoch": self.steps_per_epoch,
                "global_batch": self.config.global_batch_size(self.ctx.world_size),
                "world_size": self.ctx.world_size,
                "epoch_totals": summed.as_list(),
                "history": progress.history,
                "config": self.config.to_dict(),
                "split_file": SPLIT_FILE_NAME,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "swa": self.swa.state_dict() if self.swa is not None else None,
            }
            save_checkpoint(self.run_dir, state, progress.step)
        distributed.barrier(self.ctx)

    def restore(self) -> tuple[Progress, EpochTotals]:
        """Load the run folder's checkpoint into the model, optimizer and EMA; returns where
        the run was and this rank's share of the epoch's running sums."""
        state = load_checkpoint(self.run_dir)
        global_batch = self.config.global_batch_size(self.ctx.world_size)
        if state["global_batch"] != global_batch:
            raise ConfigError(
                f"checkpoint was written with a global batch of {state['global_batch']}, this "
                f"run has {global_batch}: resume with the same batch_size x accumulation x "
                "processes (the process count may change)"
            )
        self._warn_of_changed_settings(state["config"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            if state["ema"] is None:
                raise ConfigError("config enables 'ema' but the checkpoint has no EMA weights")
            self.ema.load_state_dict(state["ema"])
        if self.swa is not None:
            if state.get("swa") is None:
                raise ConfigError("config sets 'swa_epochs' but the checkpoint has no SWA weights")
            self.swa.load_state_dict(state["swa"])
        progress = Progress(
            epoch=int(state["epoch"]), step=int(state["step"]), history=list(state["history"])
        )
        # The reduced totals live on rank 0 only, so the next reduction counts them once.
        totals = EpochTotals(*state["epoch_totals"]) if self.ctx.is_main else EpochTotals()
        logger.info("resumed from step %d (epoch %d)", progress.step, progress.epoch)
        return progress, totals

    def _warn_of_changed_settings(self, saved_config: dict[str, Any]) -> None:
        # Both as JSON has them: the checkpoint restores tuples (betas, split_fractions, ...)
        # that would otherwise differ from the same values as lists.
        saved = _jsonable(migrate_legacy_keys(flatten_keys(saved_config), warn=False))
        current = _jsonable(self.config.to_flat_dict())
        changed = sorted(
            key
            for key in saved.keys() | current.keys()
            if key not in RESUME_FREE_KEYS and saved.get(key) != current.get(key)
        )
        if changed:
            logger.warning("resuming with changed settings: %s", ", ".join(changed))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))
