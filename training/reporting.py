"""What a training run tells its user: the log, the progress bar, metrics.jsonl, TensorBoard,
curves.png and the run folder's split.json and config.json.

Nothing here changes the run's course: the trainer hands over numbers it has computed, and
only rank 0 writes (the cross-rank sums of step figures are collectives every rank joins).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from galmorph.core.data.galaxy10 import VOTES_KEY, Galaxy10File
from galmorph.core.data.splits import Split
from galmorph.core.files import atomic_write_text
from galmorph.training import distributed
from galmorph.training.config import ConfigError, TrainConfig, dump_config
from galmorph.training.evaluate import SPLIT_FILE_NAME
from galmorph.training.plots import training_curves

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class RunFacts:
    """What the start of a run logs, gathered by the trainer once everything is built."""

    file: Galaxy10File
    split: Split
    class_counts: np.ndarray
    train_images: int
    precision: str  # Precision.describe(training=True)
    img_size: int
    device: str
    peak_lr: float
    steps_per_epoch: int


class RunReport:
    """The run's log lines, metrics.jsonl, TensorBoard scalars and curves (rank 0 writes)."""

    def __init__(self, config: TrainConfig, ctx: distributed.DistContext, run_dir: Path) -> None:
        self.config = config
        self.ctx = ctx
        self.run_dir = run_dir
        self.tensorboard = _tensorboard(run_dir) if ctx.is_main and config.tensorboard else None

    def write_run_files(self, split: Split) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        split.save(self.run_dir / SPLIT_FILE_NAME)
        # stop_after_step belongs to one invocation: a resume reading config.json must not
        # inherit it.
        dump_config(replace(self.config, stop_after_step=None), self.run_dir / CONFIG_FILE)

    def start(self, facts: RunFacts) -> None:
        _log_split(self.config, facts)
        _log_targets(self.config, facts.file)
        config = self.config
        logger.info("precision: %s", facts.precision)
        if config.sam != "none":
            logger.info(
                "%s with rho %g: two forward/backward passes per step",
                config.sam.upper(),
                config.sam_rho,
            )
        logger.info(
            "%s at %d px on %s x %d process(es): global batch %d, peak lr %.3g, %d steps/epoch,"
            " %d epochs",
            config.model,
            facts.img_size,
            facts.device,
            self.ctx.world_size,
            config.global_batch_size(self.ctx.world_size),
            facts.peak_lr,
            facts.steps_per_epoch,
            config.epochs,
        )

    def step(
        self,
        *,
        step: int,
        epoch: float,
        loss: float,
        correct: float,
        lr: float,
        grad_norm: float | None,
    ) -> None:
        """One optimizer step's record: loss averaged and correct counts summed over ranks."""
        loss_sum, correct_sum = distributed.sum_across_ranks(self.ctx, [loss, correct])
        if not self.ctx.is_main:
            return
        images = self.config.global_batch_size(self.ctx.world_size)
        record = {
            "kind": "step",
            "epoch": epoch,
            "step": step,
            "loss": loss_sum / self.ctx.world_size,
            "acc": correct_sum / images,
            "lr": lr,
        }
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        self._append_metrics(record)
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("step/loss", record["loss"], step)
            self.tensorboard.add_scalar("step/lr", lr, step)

    def epoch(self, record: dict[str, Any]) -> None:
        """An epoch's record (with its validation figures): metrics.jsonl, log, TensorBoard."""
        self._append_metrics(record)
        logger.info(
            "epoch %d/%d: train loss %.4f, val top-1 %s%s, %.0f img/s",
            record["epoch"],
            self.config.epochs,
            record["train_loss"],
            f"{record['val_top1']:.4f}" if "val_top1" in record else "n/a",
            f", val vote-fraction error {record['val_vote_fraction_error']:.4f}"
            if "val_vote_fraction_error" in record
            else "",
            record["images_per_s"],
        )
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, float):
                    self.tensorboard.add_scalar(f"epoch/{key}", value, record["epoch"])

    def curves(self, history: list[dict[str, Any]]) -> None:
        training_curves(history, self.run_dir / "curves.png")

    def truncate_metrics(self, step: int) -> None:
        """Drop records a killed run logged after its last checkpoint: they will be redone."""
        path = self.run_dir / METRICS_FILE
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def epoch_bar(self, epoch: int, steps_per_epoch: int, first_step: int) -> EpochBar:
        return EpochBar(
            desc=f"epoch {epoch + 1}/{self.config.epochs}",
            total=steps_per_epoch,
            initial=first_step,
            global_batch=self.config.global_batch_size(self.ctx.world_size),
            show=self.ctx.is_main and self.config.progress,
        )

    def _append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


class EpochBar:
    """An epoch's progress bar, and its wall time and images/s for the epoch's record."""

    def __init__(
        self, *, desc: str, total: int, initial: int, global_batch: int, show: bool
    ) -> None:
        self.global_batch = global_batch
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit="step",
            disable=not show,
            dynamic_ncols=True,
        )
        self.started = time.perf_counter()
        self.steps = 0
        self.seconds: float | None = None  # the epoch's wall time, once closed

    def step(self, *, loss: float, acc: float, lr: float, remaining_steps: int) -> None:
        self.steps += 1
        rate = self.images_per_s()
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{loss:.4f}",
            acc=f"{acc:.3f}",
            img_s=f"{rate:.0f}",
            lr=f"{lr:.2e}",
            run_eta=_format_eta(remaining_steps * self.global_batch / rate),
        )

    def close(self) -> None:
        self.bar.close()
        self.seconds = time.perf_counter() - self.started

    def images_per_s(self) -> float:
        elapsed = time.perf_counter() - self.started if self.seconds is None else self.seconds
        return self.steps * self.global_batch / max(elapsed, 1e-9)


def _log_split(config: TrainConfig, facts: RunFacts) -> None:
    counts, split = facts.class_counts, facts.split
    present = counts[counts > 0]
    names = facts.file.class_names
    lines = [f"  {k:2d} {name:<28s} {counts[k]:7d}" for k, name in enumerate(names)]
    logger.info(
        "split of %s (fractions train/val/test %s): %d train, %d val, %d test%s",
        Path(config.data).name,
        "/".join(f"{f:g}" for f in split.fractions),
        split.train.size,
        split.val.size,
        split.test.size,
        " -- no validation (val fraction 0): evaluate on a separate file with "
        "`galmorph evaluate RUN --data TEST.h5`"
        if split.val.size == 0
        else "",
    )
    logger.info(
        "training split: %d images, class counts:\n%s\n  imbalance (largest/smallest): %.1f"
        " -- sampling=%s, loss_weighting=%s",
        facts.train_images,
        "\n".join(lines),
        present.max() / present.min(),
        config.sampling,
        config.loss_weighting,
    )
    empty = [name for k, name in enumerate(names) if counts[k] == 0]
    if empty:
        logger.warning("no training images of class(es) %s", ", ".join(empty))


def _log_targets(config: TrainConfig, file: Galaxy10File) -> None:
    votes = file.votes
    if config.targets == "votes" and votes is not None:  # build_data checked it is there
        logger.info(
            "targets=votes: Dirichlet-multinomial loss on the '%s' counts (median %g votes "
            "per galaxy); probabilities are expected vote fractions%s",
            VOTES_KEY,
            float(np.median(votes.sum(axis=1))),
            f"; mixup.label_smoothing {config.mixup.label_smoothing:g} does not apply to "
            "vote counts and is ignored"
            if config.mixup.label_smoothing > 0
            else "",
        )


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError(
            "config key 'tensorboard' needs the tensorboard package (pip install tensorboard)"
        ) from exc
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
