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

This module builds a run (data, model, optimisation) and runs its loop; what the run reports
is training/reporting.py, what it saves and restores is training/checkpointing.py.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from galmorph.core import allocator
from galmorph.core.data.duplicates import duplicate_groups
from galmorph.core.data.galaxy10 import VOTES_KEY, Galaxy10Error, Galaxy10File
from galmorph.core.data.splits import Split, SplitError, make_split
from galmorph.core.inputspec import GALAXY10_IMAGE_SIZE, resolve_input_spec
from galmorph.model.checkpoint import ModelSpec
from galmorph.model.preprocess import ImagePreprocess
from galmorph.model.registry import model_entry
from galmorph.training import distributed
from galmorph.training.augment import (
    BatchAugmenter,
    resize_batch,
    to_float_nchw,
    to_uint8_nhwc,
)
from galmorph.training.checkpointing import Checkpointer, EpochTotals, Progress
from galmorph.training.config import SYNTHETIC_INIT, ConfigError, TrainConfig
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
from galmorph.training.optim import (
    CosineSchedule,
    ModelEma,
    adamw,
    fold_into_average,
    published_weights,
)
from galmorph.training.precision import Precision, resolve_precision
from galmorph.training.reporting import EpochBar, RunFacts, RunReport
from galmorph.training.sam import SharpnessAware, frozen_batchnorm_statistics
from galmorph.training.votes import dirichlet_multinomial_nll

logger = logging.getLogger(__name__)


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

    model: nn.Module  # the bare model: the optimizer, EMA, SWA and checkpoints use this one
    train_model: nn.Module  # what a training step calls: the model, DDP-wrapped and/or compiled
    ema: ModelEma | None
    swa: AveragedModel | None
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
        return published_weights(self.model, self.ema, self.swa)


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
            source = config.init_from
            if source == SYNTHETIC_INIT:
                source = _synthetic_start(config)
            initialise_from(model, source, model_name=spec.name, class_names=spec.class_names)
        frozen = freeze_stages(model, config.freeze_stages)
    except InitError as exc:
        raise ConfigError(str(exc)) from exc
    if config.sync_batchnorm and ctx.distributed:
        if not cuda:
            raise ConfigError("config key 'sync_batchnorm' needs CUDA (no CPU kernel)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(ctx.device)
    precision.prepare(model, training=True)
    # The averages copy the model before any wrapper, so they hold plain weights.
    ema = ModelEma(model, config.ema_decay) if config.ema else None
    swa = AveragedModel(model) if config.swa_epochs else None
    train_model: nn.Module = model
    if ctx.distributed:
        train_model = DistributedDataParallel(model, device_ids=[ctx.local_rank] if cuda else None)
    if config.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]
    return TrainModel(
        model=model,
        train_model=train_model,
        ema=ema,
        swa=swa,
        preprocess=ImagePreprocess.of(spec.input_spec).to(ctx.device),
        precision=precision,
        frozen=frozen,
    )


def _synthetic_start(config: TrainConfig) -> str:
    """The cached folder `galmorph train` resolved init_from: synthetic to (it builds it
    there, training/synthetic_pretrain.py, as building it here would import this module)."""
    if config.synthetic_pretrain.folder is None:
        raise ConfigError(
            "config key 'init_from' is 'synthetic' but no starting point was resolved: call "
            "galmorph.training.synthetic_pretrain.resolve_start(config) first (galmorph train does)"
        )
    return config.synthetic_pretrain.folder


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
            hold_epochs=config.swa_epochs,
            hold_lr=config.swa_learning_rate(ctx.world_size),
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
    """The training loop: build, (resume,) then epochs of optimizer steps, each epoch ending in
    validation, its record and a checkpoint. Reporting (training/reporting.py) and
    checkpointing (training/checkpointing.py) are delegated."""

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
        if self.device.type == "cpu":
            logger.info("CPU memory: %s", allocator.retain_freed_memory())
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
        self.checkpoints = Checkpointer(
            self.config,
            ctx,
            self.run_dir,
            model=self.net.model,
            ema=self.net.ema,
            swa=self.net.swa,
            optimizer=self.optim.optimizer,
            steps_per_epoch=self.data.sampler.steps_per_epoch,
        )
        self.report = RunReport(self.config, ctx, self.run_dir)

    # ----------------------------------------------------------------------------- run
    def run(self, *, resume: bool) -> Path:
        if resume:
            self._resume()
        if self.ctx.is_main:
            self.report.write_run_files(self.data.split)
            self.report.start(self._facts())
        distributed.barrier(self.ctx)
        with _StopSignal() as stop:
            while self.progress.epoch < self.config.epochs:
                timing = self._train_epoch(stop)
                self._end_epoch(timing)
        self.report.close()
        return self.run_dir

    def _resume(self) -> None:
        if not self.checkpoints.exists():
            logger.warning("--resume: no checkpoint in %s, starting from scratch", self.run_dir)
            return
        self.progress, self.totals = self.checkpoints.restore()
        if self.ctx.is_main:
            self.report.truncate_metrics(self.progress.step)

    def _train_epoch(self, stop: _StopSignal) -> EpochBar:
        """The epoch's remaining optimizer steps; returns its bar (the epoch's time and rate)."""
        steps_per_epoch = self.data.sampler.steps_per_epoch
        first_step = self.progress.step - self.progress.epoch * steps_per_epoch
        self.data.sampler.set_epoch(self.progress.epoch, start_step=first_step)
        self.net.train_mode()
        bar = self.report.epoch_bar(self.progress.epoch, steps_per_epoch, first_step)
        for batches in self._step_batches():
            lr = self._train_step(batches)
            bar.step(
                loss=self.totals.loss / self.totals.steps,
                acc=self.totals.correct / self.totals.images,
                lr=lr,
                remaining_steps=self._remaining_steps(),
            )
            self._maybe_stop(stop)
        bar.close()
        return bar

    def _step_batches(self) -> Iterator[list[Batch]]:
        """The loader's batches, grad_accum_steps micro-batches per optimizer step."""
        pending: list[Batch] = []
        for batch in self.data.loader:
            pending.append(batch)
            if len(pending) == self.config.grad_accum_steps:
                yield pending
                pending = []

    def _train_step(self, batches: list[Batch]) -> float:
        """One optimizer step: gradients, lr, update, EMA; counted and logged. Returns the lr."""
        config = self.config
        step_loss, step_correct = self._gradients(batches)
        lr = self.optim.schedule.apply(self.optim.optimizer, self.progress.step)
        grad_norm = self._optimizer_step()
        self.progress.step += 1
        self.totals.loss += step_loss / config.grad_accum_steps
        self.totals.correct += step_correct
        self.totals.images += config.batch_size * config.grad_accum_steps
        self.totals.steps += 1
        if self.progress.step % max(config.log_every_steps, 1) == 0:
            self.report.step(
                step=self.progress.step,
                epoch=self.progress.step / self.data.sampler.steps_per_epoch,
                loss=step_loss / config.grad_accum_steps,
                correct=step_correct,
                lr=lr,
                grad_norm=grad_norm,
            )
        return lr

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
    def _end_epoch(self, timing: EpochBar) -> None:
        """Sum the epoch over ranks, validate, record and report it, then checkpoint."""
        totals = self.totals.summed(self.ctx)
        record: dict[str, Any] = {
            "kind": "epoch",
            "epoch": self.progress.epoch + 1,
            "step": self.progress.step,
            "lr": self.optim.schedule.lr_at(self.progress.step),
            "train_loss": totals.loss / max(totals.steps, 1),
            "train_acc": totals.correct / max(totals.images, 1),
            "images_per_s": timing.images_per_s(),
            "epoch_seconds": timing.seconds,
        }
        if self.net.swa is not None and self._averages_epoch(self.progress.epoch):
            fold_into_average(self.net.swa, self.net.model, self._batchnorm_batches())
        self.progress.epoch += 1
        self.totals = EpochTotals()
        if self.ctx.is_main:
            record.update(self._validate())
            self.progress.history.append(record)
            self.report.epoch(record)
        self._save_checkpoint()
        if self.ctx.is_main:
            self.report.curves(self.progress.history)

    def _batchnorm_batches(self) -> Iterator[torch.Tensor]:
        """This epoch's training batches as a step sees them, augmented but not mixed (the
        inputs the SWA mean's BatchNorm statistics are for); this rank's shard under DDP."""
        self.data.sampler.set_epoch(self.progress.epoch)
        for index, (images, _, _) in enumerate(self.data.loader):
            key = [self.config.seed, self.progress.epoch, index, self.ctx.rank]
            (augment_seed,) = np.random.SeedSequence(key).generate_state(1)
            generator = torch.Generator().manual_seed(int(augment_seed))
            augmented = self.data.augmenter(images.to(self.device), generator)
            yield self.net.inputs(resize_batch(augmented, self.img_size))

    def _validate(self) -> dict[str, Any]:
        if self.data.split.val.size == 0:
            return {}
        spec = self._spec()
        predictor = TorchPredictor(
            self.net.deployable(),
            class_names=spec.class_names,
            input_spec=spec.input_spec,
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
        self.checkpoints.save(self._spec(), self.progress, self.totals)

    # ------------------------------------------------------------------ run facts
    def _spec(self) -> ModelSpec:
        config, split, file = self.config, self.data.split, self.data.file
        entry = model_entry(config.model)
        # The training images cover one field; at img_size the model sees it at this scale.
        imaging = file.imaging.resized(file.image_shape[0], self.img_size)
        fed = resolve_input_spec({"input_size": self.img_size}, variant_default=entry.input_spec)
        return ModelSpec.fed_as(
            fed.with_imaging(imaging),
            name=config.model,
            num_classes=self.data.num_classes,
            class_names=tuple(file.class_names),
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
                "weights": self._published_kind(),
                "precision": self.precision.describe(training=True),
                "recipe": {k: v for k, v in config.to_dict().items() if k not in ("data", "out")},
            },
        )

    def _averages_epoch(self, epoch: int) -> bool:
        """Whether SWA folds the weights at the end of `epoch` (0-based) into its mean."""
        return self.config.swa_epochs > 0 and epoch >= self.config.epochs - self.config.swa_epochs

    def _published_kind(self) -> str:
        if self.config.ema:
            return "ema"
        return "swa" if self._averages_epoch(self.progress.epoch - 1) else "final"

    def _facts(self) -> RunFacts:
        split = self.data.split
        return RunFacts(
            file=self.data.file,
            split=split,
            class_counts=self.data.class_counts,
            train_images=len(self.data.train_set),
            precision=self.precision.describe(training=True),
            img_size=self.img_size,
            device=str(self.device),
            peak_lr=self.optim.peak_lr,
            steps_per_epoch=self.data.sampler.steps_per_epoch,
        )
