"""Batches of uint8 images from a Galaxy10 file: dataset, sharded sampler, loader.

The dataset hands out whole batches (`__getitems__`), so each batch is one sorted HDF5 read
rather than one read per image; images stay uint8 NHWC until the augmenter on the training
device. The sampler is the only source of data order: it draws the epoch's order from
(seed, epoch) alone, identically on every rank, and deals each rank its share. Given the same
global batch, the order of examples and how they are split into per-process micro-batches are
the same whatever the number of processes, which is what makes runs comparable across
world sizes and resumable mid-epoch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from galmorph.core.data.galaxy10 import Galaxy10File

# uint8 images [N, H, W, 3], int64 labels [N], and float32 vote counts [N, K] when asked for.
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class Galaxy10Dataset(Dataset[tuple[torch.Tensor, int]]):
    """The images of `file` at `indices` (positions 0..len-1 map to file rows `indices`).

    With `votes`, batches also carry the rows' vote counts (the file must have them).
    """

    def __init__(self, file: Galaxy10File, indices: np.ndarray, *, votes: bool = False) -> None:
        self.file = file
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = file.labels[self.indices]
        if votes and file.votes is None:
            raise ValueError(f"{file.path} has no 'votes' dataset")
        self.votes = (
            file.votes[self.indices].astype(np.float32)
            if votes and file.votes is not None
            else None
        )

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        """One uint8 (H, W, 3) image and its label."""
        row = int(self.indices[position])
        return torch.from_numpy(self.file.image(row)), int(self.labels[position])

    def __getitems__(self, positions: Sequence[int]) -> Batch:
        chosen = np.asarray(positions, dtype=np.int64)
        images = torch.from_numpy(self.file.images(self.indices[chosen]))
        votes = None if self.votes is None else torch.from_numpy(self.votes[chosen])
        return images, torch.from_numpy(self.labels[chosen]), votes

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.file.num_classes)


def keep_batch(batch: Any) -> Batch:
    """The dataset's __getitems__ already returns a collated batch."""
    images, labels, votes = batch
    return images, labels, votes


class ShardedBatchSampler(Sampler[list[int]]):
    """Micro-batches of dataset positions for one rank of a (possibly distributed) run.

    Each optimizer step consumes a global batch of micro_batch x world_size x accum_steps
    examples; micro-batch j of rank r takes every S-th example (S = world_size x accum_steps)
    starting at j x world_size + r. So two processes with one micro-batch each see the same
    examples, grouped the same way, as one process accumulating two micro-batches.
    Incomplete global batches are dropped, so every rank runs the same number of steps.
    With `weights`, the epoch's examples are drawn with replacement in proportion to them
    (class-balanced sampling) instead of being a permutation.
    """

    def __init__(
        self,
        num_examples: int,
        micro_batch: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        accum_steps: int = 1,
        seed: int = 0,
        weights: np.ndarray | None = None,
    ) -> None:
        self.num_examples = num_examples
        self.micro_batch = micro_batch
        self.rank = rank
        self.world_size = world_size
        self.accum_steps = accum_steps
        self.seed = seed
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.epoch = 0
        self.start_step = 0
        self.global_batch = micro_batch * world_size * accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{num_examples} training examples cannot fill one global batch of "
                f"{self.global_batch} (batch_size x grad_accum_steps x processes)"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's order; skip the first `start_step` optimizer steps (resume)."""
        self.epoch = epoch
        self.start_step = start_step

    def epoch_order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is None:
            return torch.randperm(self.num_examples, generator=generator)
        return torch.multinomial(self.weights, self.num_examples, True, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order()
        shards = self.world_size * self.accum_steps
        for step in range(self.start_step, self.steps_per_epoch):
            chunk = order[step * self.global_batch : (step + 1) * self.global_batch]
            for micro in range(self.accum_steps):
                yield chunk[micro * self.world_size + self.rank :: shards].tolist()

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum_steps


class SequentialBatchSampler(Sampler[list[int]]):
    """Every example once, in order (evaluation)."""

    def __init__(self, num_examples: int, batch_size: int) -> None:
        self.num_examples = num_examples
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, self.num_examples, self.batch_size):
            yield list(range(start, min(start + self.batch_size, self.num_examples)))

    def __len__(self) -> int:
        return -(-self.num_examples // self.batch_size)


def balanced_sample_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-example weights that make every present class equally likely to be drawn."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return 1.0 / counts[labels]


def balanced_class_weights(counts: np.ndarray) -> np.ndarray:
    """Inverse-frequency loss weights, scaled so the average example keeps weight 1."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def seed_worker(worker_id: int) -> None:
    """Derive numpy/python seeds in a DataLoader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Galaxy10Dataset,
    batch_sampler: Sampler[list[int]],
    *,
    num_workers: int,
    seed: int,
    pin_memory: bool = False,
) -> DataLoader[Any]:
    """Batches of (uint8 images, labels, votes or None), built by the dataset, not collated."""
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=keep_batch,
        num_workers=num_workers,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
