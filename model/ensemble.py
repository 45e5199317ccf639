"""Seed ensembles: runs of one model on the same data and split, differing only in their
training seed, answering as one model with the mean of their probabilities, so that one
exported file (and one forward pass per galaxy through all members) serves them.

The ensemble follows PreLogitsModel: its embeddings are the members' side by side and its
"logits" are the log of the mean probabilities, so softmax of them is that mean and the
export's temperature, OOD score and graph contract apply unchanged.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from galmorph.core.data.splits import Split, SplitError
from galmorph.model.checkpoint import CheckpointError, ModelSpec, load_model, load_spec
from galmorph.model.head import PreLogitsModel

# model.json fields every member must share: what the file's one input spec and class list say.
SHARED_FIELDS = ("name", "num_classes", "img_size", "class_names", "input_spec")
SPLIT_FILE = "split.json"
MAX_MEMBERS = 16


class MeanProbabilityHead(nn.Module):
    """The members' embeddings, side by side -> log of their mean softmax probabilities."""

    def __init__(self, classifiers: Sequence[nn.Module], widths: Sequence[int]) -> None:
        super().__init__()
        self.classifiers = nn.ModuleList(classifiers)
        self.widths = list(widths)

    def forward(self, pre_logits: torch.Tensor) -> torch.Tensor:
        chunks = pre_logits.split(self.widths, dim=-1)
        log_probabilities = torch.stack(
            [
                head(chunk).log_softmax(-1)
                for head, chunk in zip(self.classifiers, chunks, strict=True)
            ]
        )
        return torch.logsumexp(log_probabilities, dim=0) - math.log(len(self.widths))


class SeedEnsemble(nn.Module):
    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        heads = [_pre_logits_model(member).classifier for member in members]
        self.head = MeanProbabilityHead(heads, [_in_features(head) for head in heads])

    @property
    def classifier(self) -> nn.Module:
        return self.head

    def forward_pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([_pre_logits_model(m).forward_pre_logits(x) for m in self.members], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_pre_logits(x))


def load_ensemble(run_dirs: Sequence[str | os.PathLike[str]]) -> tuple[SeedEnsemble, ModelSpec]:
    """The runs as one SeedEnsemble (eval mode) and its spec (`ensemble_spec`)."""
    spec = ensemble_spec(run_dirs)
    return SeedEnsemble([load_model(run_dir)[0] for run_dir in run_dirs]).eval(), spec


def ensemble_spec(run_dirs: Sequence[str | os.PathLike[str]]) -> ModelSpec:
    """The spec of the runs as one ensemble, from their model.json and split.json alone (no
    weights are read): the first run's, with no metrics (a member's are not the ensemble's)
    and the member runs named in its training_data.

    CheckpointError unless every run shares model, classes and input, was trained on the same
    data (its fingerprint) and has the same split: a held-out row of one member must not be a
    training row of another, or the export's temperature would be fitted on seen images."""
    if not 2 <= len(run_dirs) <= MAX_MEMBERS:
        raise CheckpointError(f"an ensemble takes 2 to {MAX_MEMBERS} runs, got {len(run_dirs)}")
    paths = [Path(d) for d in run_dirs]
    specs = [load_spec(path) for path in paths]
    first_path, first = paths[0], specs[0]
    first_split = _split(first_path)
    for path, spec in zip(paths[1:], specs[1:], strict=True):
        differs = [f for f in SHARED_FIELDS if getattr(spec, f) != getattr(first, f)]
        if _data_digest(spec) != _data_digest(first):
            differs.append("training data")
        if not _same_split(_split(path), first_split):
            differs.append(SPLIT_FILE)
        if differs:
            raise CheckpointError(
                f"{path} differs from {first_path} in {', '.join(differs)}: an ensemble's runs "
                "share model, classes, input, training data and split (train them with "
                "different --seed values only)"
            )
    training_data = {**first.training_data, "ensemble_runs": [str(p) for p in paths]}
    return replace(first, metrics={}, training_data=training_data)


def _pre_logits_model(member: nn.Module) -> PreLogitsModel:
    return cast(PreLogitsModel, member)  # every registered model is one


def _in_features(head: nn.Module) -> int:
    width = getattr(head, "in_features", None)
    if not isinstance(width, int):
        raise TypeError(f"{type(head).__name__} is not a Linear classifier")
    return width


def _data_digest(spec: ModelSpec) -> object:
    return (spec.training_data.get("fingerprint") or {}).get("digest")


def _split(run_dir: Path) -> Split | None:
    path = run_dir / SPLIT_FILE
    if not path.is_file():
        return None
    try:
        return Split.load(path)
    except SplitError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def _same_split(a: Split | None, b: Split | None) -> bool:
    if a is None or b is None:
        return a is b
    return all(
        np.array_equal(np.sort(a.indices(part)), np.sort(b.indices(part)))
        for part in ("train", "val", "test")
    )
