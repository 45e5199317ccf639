"""`galmorph train`: fit a registered model on a Galaxy10-layout file.

One process per device under torchrun, or a single process. Rank 0 logs, validates and
writes; every rank runs the same number of steps. Randomness is keyed, not streamed: each
micro-batch seeds its augmentation, mixup and dropout generators from (seed, step, shard),
and the data order comes from (seed, epoch). A checkpoint therefore needs no per-rank RNG
state to resume exactly, mid-epoch included, and a run with the same global batch follows the
same course on any number of processes (up to floating-point reduction order).

Run folder: model.safetensors + model.json (deployable weights, the EMA when enabled),
train_state.json + train_state-<step>.* (everything to resume), split.json, config.json,
metrics.jsonl (one JSON record per logged step and per epoch), curves.png.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from galmorph.core.data.duplicates import duplicate_groups
from galmorph.core.data.galaxy10 import VOTES_KEY, Galaxy10Error, Galaxy10File
from galmorph.core.data.splits import Split, SplitError, make_split
from galmorph.core.files import atomic_write_text
from galmorph.core.modelfile.contract import GALAXY10_IMAGE_SIZE
from galmorph.model.checkpoint import ModelSpec, save_model
from galmorph.model.preprocess import ImagePreprocess
from galmorph.model.registry import model_entry
from galmorph.training import distributed
from galmorph.training.augment import (
    BatchAugmenter,
    resize_batch,
    to_float_nchw,
    to_uint8_nhwc,
)
from galmorph.training.config import (
    ConfigError,
    TrainConfig,
    dump_config,
    flatten_keys,
    migrate_legacy_keys,
)
from galmorph.training.dataset import (
    Batch,
    Galaxy10Dataset,
    ShardedBatchSampler,
    balanced_class_weights,
    balanced_sample_weights,
    make_loader,
)
from galmorph.training.distill import DistillSettings, Teacher, distillation_loss
from galmorph.training.evaluate import SPLIT_FILE_NAME, TorchPredictor, predict_split
from galmorph.training.finetune import InitError, freeze_stages, initialise_from
from galmorph.training.metrics import classification_report, vote_fraction_error
from galmorph.training.mixup import Mixup, soft_target_cross_entropy
from galmorph.training.optim import CosineSchedule, ModelEma, adamw
from galmorph.training.plots import training_curves
from galmorph.training.precision import Precision, resolve_precision
from galmorph.training.sam import SharpnessAware, frozen_batchnorm_statistics
from galmorph.training.state import has_checkpoint, load_checkpoint, save_checkpoint
from galmorph.training.votes import dirichlet_multinomial_nll

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
STATE_FORMAT = 1
# Config keys that may change between a run and its resumption without changing its course.
RESUME_FREE_KEYS = frozenset(
    {"out", "data", "num_workers", "progress", "log_every_steps", "tensorboard", "threads"}
    | {"eval_batch_size", "stop_after_step", "checkpoint_every_steps", "device", "compile"}
)


class TrainingInterrupted(RuntimeError):
    """The run stopped early (SIGTERM/SIGINT or stop_after_step) after writing a checkpoint."""

    def __init__(self, run_dir: Path, step: int, reason: str) -> None:
        super().__init__(f"training stopped at step {step} ({reason}); resume with --resume")
        self.run_dir = run_dir
        self.step = step
        self.reason = reason


def train(config: TrainConfig, *, resume: bool = False) -> Path:
    """Train as `config` says; with `resume`, continue from the run folder's checkpoint."""
    config.validate()
    ctx = distributed.setup(config.device)
    try:
        return Trainer(config, ctx).run(resume=resume)
    finally:
        distributed.teardown()


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class EpochTotals:
    """Running sums over an epoch (this rank's share, or the global sum after a reduction)."""

    loss: float = 0.0
    correct: float = 0.0
    images: float = 0.0
    steps: float = 0.0

    def as_list(self) -> list[float]:
        return [self.loss, self.correct, self.images, self.steps]


@dataclass
class Progress:
    epoch: int = 0
    step: int = 0  # optimizer steps completed in the whole run
    history: list[dict[str, Any]] = field(default_factory=list)


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag checked after each optimizer step."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.reason = signal.Signals(signum).name
        # A second signal of the same kind gets the default behaviour (e.g. Ctrl-C twice).
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))


@dataclass
class TrainData:
    """The data side of a run: the file, its split and the training batches."""

    file: Galaxy10File
    fingerprint: dict[str, Any]
    split: Split
    train_set: Galaxy10Dataset
    class_counts: np.ndarray
    sampler: ShardedBatchSampler
    loader: DataLoader[Any]
    augmenter: BatchAugmenter

    @property
    def num_classes(self) -> int:
        return self.file.num_classes


@dataclass
class TrainModel:
    """The model, its input step and its wrappers."""

    model: nn.Module  # the bare model: the optimizer, EMA and checkpoints use this one
    train_model: nn.Module  # what a training step calls: the model, DDP-wrapped and/or compiled
    ema: ModelEma | None
    preprocess: ImagePreprocess
    precision: Precision  # the input batch goes into the weights' memory format
    frozen: list[nn.Module] = field(default_factory=list)  # freeze_stages: kept in eval mode

    def train_mode(self) -> None:
        """Training mode, except frozen stages (their BatchNorm statistics stay as loaded)."""
        self.model.train()
        for module in self.frozen:
            module.eval()

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC (augmented) -> the normalised float batch the model takes."""
        return self.precision.to_memory_format(self.preprocess(images))

    def deployable(self) -> nn.Module:
        """The weights a run publishes: the EMA when enabled."""
        return self.ema.module if self.ema is not None else self.model


@dataclass
class Optimisation:
    """Optimizer, lr schedule, precision and the loss (with its mixup targets)."""

    peak_lr: float
    optimizer: torch.optim.Optimizer
    schedule: CosineSchedule
    mixup: Mixup
    class_weights: torch.Tensor | None
    precision: Precision  # bf16 autocast of the forward needs no gradient scaler
    sam: SharpnessAware | None
    distill: DistillSettings

    def autocast(self) -> AbstractContextManager[Any]:
        return self.precision.autocast()

    def loss(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        votes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The label loss, or with `votes` (targets=votes) their Dirichlet-multinomial NLL.

        Class weights weight a galaxy's vote term by its (mixed) label's weight, as they
        weight its cross-entropy. Distillation is refused with votes (TrainConfig.validate).
        The loss is computed in fp32 from fp32 logits, whatever precision the forward ran in.
        """
        logits = logits.float()
        if votes is not None:
            weights = None if self.class_weights is None else targets @ self.class_weights
            return dirichlet_multinomial_nll(logits, votes, weights)
        label_loss = soft_target_cross_entropy(logits, targets, self.class_weights)
        if teacher_logits is None:
            return label_loss
        return distillation_loss(logits, teacher_logits, label_loss, self.distill)


@dataclass
class MicroBatch:
    """One micro-batch ready for the model: inputs, targets, the teacher's logits, votes."""

    x: torch.Tensor
    targets: torch.Tensor  # soft label targets (N, K): the label loss and training accuracy
    teacher_logits: torch.Tensor | None
    dropout_seed: int
    votes: torch.Tensor | None = None  # vote counts (N, K), mixed as the targets: targets=votes


def _warn_of_assumed_pixel_scale(file: Galaxy10File) -> None:
    """A file that states no imaging facts is taken as Galaxy10 DECaLS's 0.262"/px: right for
    Galaxy10's 256 px images, a 4x error for a user's 64 px cutouts of the same field, which the
    card then carries into every FITS rendering and sky request."""
    side = file.image_shape[0]
    if file.imaging_source.startswith("Galaxy10 DECaLS defaults") and side != GALAXY10_IMAGE_SIZE:
        logger.warning(
            "%s states no pixel scale: its %d px images are taken to be at Galaxy10 DECaLS's "
            '%.3g"/px (a %.0f" field); if they are not, set the HDF5 attribute pixel_scale '
            "(arcsec/pixel), or FITS cutouts and sky requests will be rendered at this scale",
            file.path,
            side,
            file.imaging.pixel_scale,
            side * file.imaging.pixel_scale,
        )


def build_data(
    config: TrainConfig,
    ctx: distributed.DistContext,
    img_size: int,
    run_dir: Path,
    *,
    augment_size: int | None = None,
) -> TrainData:
    """Open the file, make or reload the split, and set up sharded, augmented batches.

    `augment_size`: the size augmented batches come out at (a larger teacher's), when it
    differs from img_size.
    """
    try:
        file = Galaxy10File(config.data, class_names=config.class_names)
        file.check_class_names()
    except Galaxy10Error as exc:
        raise ConfigError(str(exc)) from exc
    if ctx.is_main:
        logger.info("classes (%s): %s", file.class_names_source, ", ".join(file.class_names))
        _warn_of_assumed_pixel_scale(file)
    if config.num_classes is not None and config.num_classes != file.num_classes:
        raise ConfigError(
            f"config key 'num_classes' is {config.num_classes} but {config.data} has "
            f"{file.num_classes} classes"
        )
    votes = config.targets == "votes"
    if votes and file.votes is None:
        raise ConfigError(
            f"config key 'targets' is 'votes' but {config.data} has no '{VOTES_KEY}' dataset "
            f"(vote counts, shape (N, {file.num_classes}): one column per class)"
        )
    fingerprint = file.fingerprint()
    split = _load_or_make_split(config, file, fingerprint, run_dir, progress=ctx.is_main)
    train_set = Galaxy10Dataset(file, split.train, votes=votes)
    sampler = ShardedBatchSampler(
        len(train_set),
        config.batch_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        accum_steps=config.grad_accum_steps,
        seed=config.seed,
        weights=(
            balanced_sample_weights(train_set.labels, file.num_classes)
            if config.sampling == "balanced"
            else None
        ),
    )
    loader = make_loader(
        train_set,
        sampler,
        num_workers=config.num_workers,
        seed=config.seed,
        pin_memory=ctx.device.type == "cuda",
    )
    return TrainData(
        file=file,
        fingerprint=fingerprint,
        split=split,
        train_set=train_set,
        class_counts=train_set.class_counts(),
        sampler=sampler,
        loader=loader,
        augmenter=BatchAugmenter(config.augment, augment_size or img_size),
    )


def build_model(
    config: TrainConfig, ctx: distributed.DistContext, spec: ModelSpec, precision: Precision
) -> TrainModel:
    """The model as `spec` describes it, on the device, with EMA and DDP/compile wrappers."""
    cuda = ctx.device.type == "cuda"
    seed_everything(config.seed)  # identical initial weights on every rank
    model = spec.build()
    frozen: list[nn.Module] = []
    try:
        if config.init_from is not None:
            initialise_from(
                model, config.init_from, model_name=spec.name, class_names=spec.class_names
            )
        frozen = freeze_stages(model, config.freeze_stages)
    except InitError as exc:
        raise ConfigError(str(exc)) from exc
    if config.sync_batchnorm and ctx.distributed:
        if not cuda:
            raise ConfigError("config key 'sync_batchnorm' needs CUDA (no CPU kernel)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(ctx.device)
    precision.prepare(model, training=True)
    # The EMA copies the model before any wrapper, so it holds plain weights.
    ema = ModelEma(model, config.ema_decay) if config.ema else None
    train_model: nn.Module = model
    if ctx.distributed:
        train_model = DistributedDataParallel(model, device_ids=[ctx.local_rank] if cuda else None)
    if config.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]
    return TrainModel(
        model=model,
        train_model=train_model,
        ema=ema,
        preprocess=ImagePreprocess(spec.mean, spec.std).to(ctx.device),
        precision=precision,
        frozen=frozen,
    )


def build_optimisation(
    config: TrainConfig,
    ctx: distributed.DistContext,
    model: nn.Module,
    data: TrainData,
    precision: Precision,
) -> Optimisation:
    """AdamW at timm's scaled lr (SAM/ASAM around it), the cosine schedule, precision, loss."""
    peak_lr = config.learning_rate(ctx.world_size)
    class_weights = None
    if config.loss_weighting == "balanced":
        weights = balanced_class_weights(data.class_counts)
        class_weights = torch.tensor(weights, dtype=torch.float32).to(ctx.device)
    return Optimisation(
        peak_lr=peak_lr,
        optimizer=adamw(
            model, peak_lr, config.weight_decay, config.betas, layer_decay=config.layer_decay
        ),
        schedule=CosineSchedule(
            peak_lr=peak_lr,
            warmup_lr=config.warmup_lr,
            min_lr=config.min_lr,
            warmup_epochs=config.warmup_epochs,
            epochs=config.epochs,
            steps_per_epoch=data.sampler.steps_per_epoch,
        ),
        mixup=Mixup(config.mixup, data.num_classes),
        class_weights=class_weights,
        precision=precision,
        sam=(
            SharpnessAware(
                model.named_parameters(),
                rho=config.sam_rho,
                adaptive=config.sam == "asam",
                eta=config.sam_eta,
            )
            if config.sam != "none"
            else None
        ),
        distill=config.distill,
    )


def _load_or_make_split(
    config: TrainConfig,
    file: Galaxy10File,
    fingerprint: dict[str, Any],
    run_dir: Path,
    *,
    progress: bool,
) -> Split:
    """config.split_file, else the run folder's split.json (a resume), else a new split."""
    existing = run_dir / SPLIT_FILE_NAME
    source = Path(config.split_file) if config.split_file else existing
    if source.is_file():
        try:
            split = Split.load(source)
            split.check_data(file.num_images, fingerprint)
        except SplitError as exc:
            raise ConfigError(f"split file {source}: {exc}") from exc
        return split
    groups = duplicate_groups(file, progress=progress)
    if groups:
        logger.info(
            "%d groups of duplicate images (%d rows) kept on one side of the split",
            len(groups),
            sum(map(len, groups)),
        )
    return make_split(
        file.labels,
        seed=config.split_seed,
        fractions=config.split_fractions,
        fingerprint=fingerprint,
        duplicate_groups=groups,
    )


class Trainer:
    def __init__(self, config: TrainConfig, ctx: distributed.DistContext) -> None:
        self.img_size = config.model_img_size()
        self.precision = resolve_precision(config.precision, ctx.device)
        # The run records the size and precision it used, so a resume does not depend on the
        # registry or on the machine it resumes on.
        self.config = replace(config, img_size=self.img_size, precision=self.precision.name)
        self.ctx = ctx
        self.progress = Progress()
        self.totals = EpochTotals()
        self.run_dir = Path(config.out)
        self.device = ctx.device
        if config.threads:
            torch.set_num_threads(config.threads)
        self.teacher = self._teacher()
        teacher_size = self.teacher.input_size if self.teacher is not None else 0
        self.data = build_data(
            self.config,
            ctx,
            self.img_size,
            self.run_dir,
            augment_size=max(self.img_size, teacher_size),
        )
        if self.teacher is not None and self.teacher.class_names != self.data.file.class_names:
            raise ConfigError(
                f"teacher {self.teacher.source} predicts {list(self.teacher.class_names)}, "
                f"the data has {list(self.data.file.class_names)}"
            )
        self.net = build_model(self.config, ctx, self._spec(), self.precision)
        self.optim = build_optimisation(self.config, ctx, self.net.model, self.data, self.precision)
        self.tensorboard = self._tensorboard() if ctx.is_main and config.tensorboard else None

    # ----------------------------------------------------------------------------- run
    def run(self, *, resume: bool) -> Path:
        config = self.config
        if resume and has_checkpoint(self.run_dir):
            self._restore()
        elif resume:
            logger.warning("--resume: no checkpoint in %s, starting from scratch", self.run_dir)
        if self.ctx.is_main:
            self._write_run_files()
            self._report_start()
        distributed.barrier(self.ctx)
        with _StopSignal() as stop:
            while self.progress.epoch < config.epochs:
                self._train_epoch(stop)
                self._end_epoch()
        if self.tensorboard is not None:
            self.tensorboard.close()
        return self.run_dir

    def _train_epoch(self, stop: _StopSignal) -> None:
        config, ctx = self.config, self.ctx
        steps_per_epoch = self.data.sampler.steps_per_epoch
        first_step = self.progress.step - self.progress.epoch * steps_per_epoch
        self.data.sampler.set_epoch(self.progress.epoch, start_step=first_step)
        self.net.train_mode()
        global_batch = config.global_batch_size(ctx.world_size)
        bar = tqdm(
            total=steps_per_epoch,
            initial=first_step,
            desc=f"epoch {self.progress.epoch + 1}/{config.epochs}",
            unit="step",
            disable=not (ctx.is_main and config.progress),
            dynamic_ncols=True,
        )
        started = time.perf_counter()
        steps_done = 0
        pending: list[Batch] = []
        for batch in self.data.loader:
            pending.append(batch)
            if len(pending) < config.grad_accum_steps:
                continue
            step_loss, step_correct = self._gradients(pending)
            pending = []
            lr = self.optim.schedule.apply(self.optim.optimizer, self.progress.step)
            grad_norm = self._optimizer_step()
            self.progress.step += 1
            steps_done += 1
            local_images = config.batch_size * config.grad_accum_steps
            self.totals.loss += step_loss / config.grad_accum_steps
            self.totals.correct += step_correct
            self.totals.images += local_images
            self.totals.steps += 1
            if self.progress.step % max(config.log_every_steps, 1) == 0:
                self._log_step(step_loss / config.grad_accum_steps, step_correct, lr, grad_norm)
            elapsed = time.perf_counter() - started
            rate = steps_done * global_batch / elapsed
            bar.update(1)
            bar.set_postfix(
                loss=f"{self.totals.loss / self.totals.steps:.4f}",
                acc=f"{self.totals.correct / self.totals.images:.3f}",
                img_s=f"{rate:.0f}",
                lr=f"{lr:.2e}",
                run_eta=_format_eta(self._remaining_steps() * global_batch / rate),
            )
            self._maybe_stop(stop)
        bar.close()
        self._epoch_seconds = time.perf_counter() - started
        self._epoch_rate = steps_done * global_batch / max(self._epoch_seconds, 1e-9)

    def _gradients(self, batches: list[Batch]) -> tuple[float, float]:
        """Accumulate one optimizer step's gradients; returns its summed loss and correct count.

        With SAM, the first pass's gradient (of the whole global batch: every micro-batch,
        averaged over ranks by DDP) sets the perturbation, and a second pass over the same
        micro-batches at the perturbed weights gives the gradient the optimizer uses.
        """
        prepared = (self._prepare(batch, micro) for micro, batch in enumerate(batches))
        sam = self.optim.sam
        if sam is None:
            return self._accumulate(prepared)
        kept = list(prepared)
        loss, correct = self._accumulate(kept)
        sam.perturb()
        self.optim.optimizer.zero_grad(set_to_none=True)
        with frozen_batchnorm_statistics(self.net.model):
            self._accumulate(kept)
        sam.restore()
        return loss, correct

    def _prepare(self, batch: Batch, micro: int) -> MicroBatch:
        """Augment, mix and (when distilling) ask the teacher, seeded by (seed, step, shard)."""
        images, labels, votes = batch
        augment_gen, mixup_rng, dropout_seed = self._seed_micro_batch(micro)
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        augmented = self.data.augmenter(images, augment_gen)
        x = self.net.inputs(resize_batch(augmented, self.img_size))
        if votes is not None:
            # One-hot labels and counts side by side, so mixup blends both by one lambda.
            k = self.data.num_classes
            one_hot = nn.functional.one_hot(labels, k).float()
            both = torch.cat([one_hot, votes.to(self.device, non_blocking=True)], dim=1)
            x, mixed = self.optim.mixup(x, both, mixup_rng)
            return MicroBatch(x, mixed[:, :k], None, dropout_seed, votes=mixed[:, k:])
        if self.teacher is None:
            x, targets = self.optim.mixup(x, labels, mixup_rng)
            return MicroBatch(x, targets, None, dropout_seed)
        # The teacher sees the same images, mixed the same way, at its own input size.
        seen = resize_batch(augmented, self.teacher.input_size)
        x, seen_mixed, targets = self.optim.mixup.mix_pair(
            x, to_float_nchw(seen), labels, mixup_rng
        )
        assert seen_mixed is not None
        teacher_logits = self.teacher.logits(to_uint8_nhwc(seen_mixed))
        return MicroBatch(x, targets, teacher_logits, dropout_seed)

    def _accumulate(self, batches: Iterable[MicroBatch]) -> tuple[float, float]:
        """Forward and backward over the micro-batches; DDP all-reduces on the last one."""
        config = self.config
        total_loss = total_correct = 0.0
        for micro, batch in enumerate(batches):
            last_micro = micro == config.grad_accum_steps - 1
            sync: AbstractContextManager[Any] = nullcontext()
            if isinstance(self.net.train_model, DistributedDataParallel) and not last_micro:
                sync = self.net.train_model.no_sync()
            torch.manual_seed(batch.dropout_seed)  # dropout and stochastic depth
            with sync:
                with self.optim.autocast():
                    logits = self.net.train_model(batch.x)
                loss = self.optim.loss(logits, batch.targets, batch.teacher_logits, batch.votes)
                (loss / config.grad_accum_steps).backward()
            total_loss += float(loss.detach())
            total_correct += float((logits.argmax(1) == batch.targets.argmax(1)).sum())
        return total_loss, total_correct

    def _optimizer_step(self) -> float | None:
        grad_norm = None
        if self.config.clip_grad is not None:
            norm = nn.utils.clip_grad_norm_(self.net.model.parameters(), self.config.clip_grad)
            grad_norm = float(norm)
        self.optim.optimizer.step()
        self.optim.optimizer.zero_grad(set_to_none=True)
        if self.net.ema is not None:
            self.net.ema.update(self.net.model, self.progress.step)
        return grad_norm

    def _seed_micro_batch(self, micro: int) -> tuple[torch.Generator, np.random.Generator, int]:
        """Generators for this micro-batch, keyed by (seed, step, shard).

        The shard index is the one the sampler uses (micro x world_size + rank), so a shard
        gets the same augmentation, mixup and dropout draws whether it is a rank's batch or
        one of several accumulated micro-batches of a single process.
        """
        shard = micro * self.ctx.world_size + self.ctx.rank
        key = [self.config.seed, self.progress.step, shard]
        augment_seed, mixup_seed, dropout_seed = np.random.SeedSequence(key).generate_state(3)
        augment_gen = torch.Generator().manual_seed(int(augment_seed))
        return augment_gen, np.random.default_rng(int(mixup_seed)), int(dropout_seed)

    def _maybe_stop(self, stop: _StopSignal) -> None:
        config = self.config
        reason = stop.reason
        if reason is None and config.stop_after_step is not None:
            reason = "stop_after_step" if self.progress.step >= config.stop_after_step else None
        every = config.checkpoint_every_steps
        periodic = every > 0 and self.progress.step % every == 0
        # All ranks must agree to stop at the same step, or collectives would hang.
        stopping = distributed.any_rank(self.ctx, reason is not None)
        if stopping or periodic:
            self._save_checkpoint()
        if stopping:
            logger.info("stopping at step %d (%s); checkpoint written", self.progress.step, reason)
            raise TrainingInterrupted(self.run_dir, self.progress.step, reason or "another rank")

    def _remaining_steps(self) -> int:
        return self.config.epochs * self.data.sampler.steps_per_epoch - self.progress.step

    def _teacher(self) -> Teacher | None:
        settings = self.config.distill
        if settings.teacher is None:
            return None
        try:
            teacher = Teacher(
                settings.teacher,
                self.device,
                amp=self.precision.bf16,
                threads=self.config.threads,
            )
        except (ValueError, OSError) as exc:  # CheckpointError and engine errors included
            raise ConfigError(f"config key 'distill.teacher': {exc}") from exc
        if self.ctx.is_main:
            logger.info(
                "distilling from %s (%s, %d px): %s, alpha %.2f%s",
                teacher.source,
                teacher.kind,
                teacher.input_size,
                settings.kind,
                settings.alpha,
                f", tau {settings.tau:g}" if settings.kind == "soft" else "",
            )
        return teacher

    # ------------------------------------------------------------------------- epoch end
    def _end_epoch(self) -> None:
        totals = EpochTotals(*distributed.sum_across_ranks(self.ctx, self.totals.as_list()))
        epoch = self.progress.epoch + 1
        record: dict[str, Any] = {
            "kind": "epoch",
            "epoch": epoch,
            "step": self.progress.step,
            "lr": self.optim.schedule.lr_at(self.progress.step),
            "train_loss": totals.loss / max(totals.steps, 1),
            "train_acc": totals.correct / max(totals.images, 1),
            "images_per_s": getattr(self, "_epoch_rate", 0.0),
            "epoch_seconds": getattr(self, "_epoch_seconds", 0.0),
        }
        self.progress.epoch += 1
        self.totals = EpochTotals()
        if self.ctx.is_main:
            record.update(self._validate())
            self.progress.history.append(record)
            self._append_metrics(record)
            logger.info(
                "epoch %d/%d: train loss %.4f, val top-1 %s%s, %.0f img/s",
                epoch,
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
                        self.tensorboard.add_scalar(f"epoch/{key}", value, epoch)
        self._save_checkpoint()
        if self.ctx.is_main:
            training_curves(self.progress.history, self.run_dir / "curves.png")

    def _validate(self) -> dict[str, Any]:
        if self.data.split.val.size == 0:
            return {}
        spec = self._spec()
        predictor = TorchPredictor(
            self.net.deployable(),
            class_names=spec.class_names,
            input_size=spec.img_size,
            interpolation=spec.interpolation,
            mean=spec.mean,
            std=spec.std,
            device=self.device,
            precision=self.precision,
        )
        probabilities = predict_split(
            predictor,
            self.data.file,
            self.data.split.val,
            batch_size=self.config.eval_batch_size or self.config.batch_size,
            progress=False,
        )
        file, rows = self.data.file, self.data.split.val
        report = classification_report(probabilities, file.labels[rows], file.class_names)
        if file.votes is not None:
            report["vote_fraction_error"] = vote_fraction_error(probabilities, file.votes[rows])
        keys = ("top1", "macro_f1", "nll", "ece", "vote_fraction_error")
        record = {f"val_{key}": report[key] for key in keys if key in report}
        # With vote targets the label NLL is not the training loss: not plotted beside it.
        return record | ({"val_loss": report["nll"]} if self.config.targets == "labels" else {})

    # ------------------------------------------------------------------- checkpointing
    def _save_checkpoint(self) -> None:
        """Model for deployment plus the full training state; rank 0 writes, all wait."""
        totals = EpochTotals(*distributed.sum_across_ranks(self.ctx, self.totals.as_list()))
        if self.ctx.is_main:
            spec = self._spec()
            if self.progress.history:
                last = self.progress.history[-1]
                spec.metrics = {k: v for k, v in last.items() if k.startswith("val_")}
            save_model(self.run_dir, self.net.deployable(), spec)
            state = {
                "format": STATE_FORMAT,
                "epoch": self.progress.epoch,
                "step": self.progress.step,
                "steps_per_epoch": self.data.sampler.steps_per_epoch,
                "global_batch": self.config.global_batch_size(self.ctx.world_size),
                "world_size": self.ctx.world_size,
                "epoch_totals": totals.as_list(),
                "history": self.progress.history,
                "config": self.config.to_dict(),
                "split_file": SPLIT_FILE_NAME,
                "model": self.net.model.state_dict(),
                "optimizer": self.optim.optimizer.state_dict(),
                "ema": self.net.ema.state_dict() if self.net.ema is not None else None,
            }
            save_checkpoint(self.run_dir, state, self.progress.step)
        distributed.barrier(self.ctx)

    def _restore(self) -> None:
        state = load_checkpoint(self.run_dir)
        global_batch = self.config.global_batch_size(self.ctx.world_size)
        if state["global_batch"] != global_batch:
            raise ConfigError(
                f"checkpoint was written with a global batch of {state['global_batch']}, this "
                f"run has {global_batch}: resume with the same batch_size x accumulation x "
                "processes (the process count may change)"
            )
        saved = migrate_legacy_keys(flatten_keys(state["config"]), warn=False)
        current = _jsonable(self.config.to_flat_dict())
        changed = sorted(
            key
            for key in saved.keys() | current.keys()
            if key not in RESUME_FREE_KEYS and saved.get(key) != current.get(key)
        )
        if changed:
            logger.warning("resuming with changed settings: %s", ", ".join(changed))
        self.net.model.load_state_dict(state["model"])
        self.optim.optimizer.load_state_dict(state["optimizer"])
        if self.net.ema is not None:
            if state["ema"] is None:
                raise ConfigError("config enables 'ema' but the checkpoint has no EMA weights")
            self.net.ema.load_state_dict(state["ema"])
        self.progress = Progress(
            epoch=int(state["epoch"]), step=int(state["step"]), history=list(state["history"])
        )
        # The reduced totals live on rank 0 only, so the next reduction counts them once.
        self.totals = EpochTotals(*state["epoch_totals"]) if self.ctx.is_main else EpochTotals()
        if self.ctx.is_main:
            self._truncate_metrics(self.progress.step)
        logger.info("resumed from step %d (epoch %d)", self.progress.step, self.progress.epoch)

    # ------------------------------------------------------------------ run files/logs
    def _spec(self) -> ModelSpec:
        config, split, file = self.config, self.data.split, self.data.file
        entry = model_entry(config.model)
        # The training images cover one field; at img_size the model sees it at this scale.
        imaging = file.imaging.resized(file.image_shape[0], self.img_size)
        return ModelSpec(
            name=config.model,
            num_classes=self.data.num_classes,
            img_size=self.img_size,
            class_names=tuple(file.class_names),
            mean=entry.mean,
            std=entry.std,
            interpolation=entry.interpolation,
            stretch=imaging.stretch,
            bands=dict(imaging.bands),
            pixel_scale=imaging.pixel_scale,
            drop_rate=config.drop_rate,
            drop_path_rate=config.drop_path_rate,
            training_data={
                "fingerprint": self.data.fingerprint,
                "imaging": {"source": file.imaging_source, "image_size": file.image_shape[0]},
                "split": {
                    "seed": split.seed,
                    "fractions": list(split.fractions),
                    "duplicate_groups": len(split.duplicate_groups),
                },
                "train_class_counts": self.data.class_counts.tolist(),
                "epochs_completed": self.progress.epoch,
                "steps_completed": self.progress.step,
                "weights": "ema" if config.ema else "final",
                "precision": self.precision.describe(),
                "recipe": {k: v for k, v in config.to_dict().items() if k not in ("data", "out")},
            },
        )

    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data.split.save(self.run_dir / SPLIT_FILE_NAME)
        # stop_after_step belongs to one invocation: a resume reading config.json must not
        # inherit it.
        dump_config(replace(self.config, stop_after_step=None), self.run_dir / CONFIG_FILE)

    def _report_start(self) -> None:
        config, ctx = self.config, self.ctx
        counts = self.data.class_counts
        present = counts[counts > 0]
        lines = [
            f"  {k:2d} {name:<28s} {counts[k]:7d}"
            for k, name in enumerate(self.data.file.class_names)
        ]
        split = self.data.split
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
            len(self.data.train_set),
            "\n".join(lines),
            present.max() / present.min(),
            config.sampling,
            config.loss_weighting,
        )
        empty = [name for k, name in enumerate(self.data.file.class_names) if counts[k] == 0]
        if empty:
            logger.warning("no training images of class(es) %s", ", ".join(empty))
        votes = self.data.file.votes
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
        logger.info("precision: %s", self.precision.describe())
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
            self.img_size,
            self.device,
            ctx.world_size,
            config.global_batch_size(ctx.world_size),
            self.optim.peak_lr,
            self.data.sampler.steps_per_epoch,
            config.epochs,
        )

    def _log_step(self, loss: float, correct: float, lr: float, grad_norm: float | None) -> None:
        loss_sum, correct_sum = distributed.sum_across_ranks(self.ctx, [loss, correct])
        if not self.ctx.is_main:
            return
        images = self.config.global_batch_size(self.ctx.world_size)
        record = {
            "kind": "step",
            "epoch": self.progress.step / self.data.sampler.steps_per_epoch,
            "step": self.progress.step,
            "loss": loss_sum / self.ctx.world_size,
            "acc": correct_sum / images,
            "lr": lr,
        }
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        self._append_metrics(record)
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("step/loss", record["loss"], self.progress.step)
            self.tensorboard.add_scalar("step/lr", lr, self.progress.step)

    def _append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def _truncate_metrics(self, step: int) -> None:
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

    def _tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(
                "config key 'tensorboard' needs the tensorboard package (pip install tensorboard)"
            ) from exc
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
