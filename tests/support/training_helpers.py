"""Shared settings for the training tests: a tiny model on a small synthetic Galaxy10 file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from galmorph.training.config import TrainConfig
from galmorph.training.synth import synthesize

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_synthetic(path: Path, n: int, seed: int = 0) -> Path:
    """A balanced 64 px synthetic Galaxy10 file (the smallest size the generator makes)."""
    return synthesize(path, n=n, size=64, seed=seed, progress=False)


FOUR_CLASSES = ("elliptical", "spiral", "edge-on", "merger")
# `init_from: synthetic` shrunk to seconds, for tests that run the small-data recipe.
TINY_SYNTHETIC_START = (
    *("--set", "synthetic_pretrain.images=40", "--set", "synthetic_pretrain.epochs=1"),
)
# The README's small-data recipe (`--config configs/small_data.yaml`) with only the sizes made
# small: the tiny model at 32 px for one epoch, one thread, the synthetic start shrunk.
TINY_RECIPE = (
    *("--config", str(REPO_ROOT / "configs/small_data.yaml"), "--model", "gm_astroformer_tiny"),
    *("--set", "img_size=32", "--set", "epochs=1", "--set", "warmup_epochs=0"),
    *("--set", "batch_size=16", "--set", "threads=1", "--set", "progress=false"),
    *TINY_SYNTHETIC_START,
)


def four_class_file(path: Path, source: Path, names: tuple[str, ...] | None) -> Path:
    """Rows of a synthetic Galaxy10 file as a user's own 4-class file: a galaxy of Galaxy10
    label k is FOUR_CLASSES[k % 4]. `names`, the classes the file states, lists FOUR_CLASSES in
    any order (the labels are rewritten so every galaxy keeps its class); None: a file naming
    none. The synthetic `pxscale` column comes along, so the file states its pixel scale."""
    with h5py.File(source, "r") as src, h5py.File(path, "w") as out:
        labels = src["ans"][()] % 4
        if names is not None:
            labels = np.asarray([names.index(FOUR_CLASSES[k]) for k in labels], labels.dtype)
            out.attrs["class_names"] = list(names)
        out.create_dataset("images", data=src["images"][()])
        out.create_dataset("ans", data=labels)
        out.create_dataset("pxscale", data=src["pxscale"][()])
    return path


def tiny_config(data: Path, out: Path, **overrides: Any) -> TrainConfig:
    """gm_astroformer_tiny at 32 px, one thread, no workers: seconds per epoch on a CPU.

    Section keys go in as mappings: `tiny_config(..., mixup={"mixup_alpha": 0.0})`.
    """
    values: dict[str, Any] = {
        "data": str(data),
        "out": str(out),
        "model": "gm_astroformer_tiny",
        "img_size": 32,
        "batch_size": 16,
        "epochs": 2,
        "lr": 2e-3,
        "warmup_epochs": 0.5,
        "num_workers": 0,
        "threads": 1,
        "progress": False,
        "log_every_steps": 1,
        # precision=auto would train in bf16 on CPUs with bf16 units and fp32 elsewhere: the
        # tests' models, and the thresholds measured on them, must not depend on the CPU.
        "precision": "fp32",
    }
    values.update(overrides)
    return TrainConfig.from_dict(values)


def galmorph_command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "galmorph", *map(str, args)]


def child_env() -> dict[str, str]:
    """One thread per child process: the machine's two cores are shared."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO_ROOT),
    }


def run_galmorph(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        galmorph_command(*args),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def config_flags(config: TrainConfig, *skip: str) -> list[str]:
    """`--set key=value` flags reproducing a config on the command line (dotted section keys)."""
    import json

    flags: list[str] = []
    for key, value in config.to_flat_dict().items():
        if key in skip or key in ("data", "out", "model"):
            continue
        flags += ["--set", f"{key}={json.dumps(value)}"]
    return flags


def torchrun_train(data: Path, out: Path, config: TrainConfig) -> subprocess.CompletedProcess[str]:
    """`galmorph train` as two gloo ranks on loopback (torchrun), with `config` as --set flags."""
    from tests.support.server_process import free_port

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "galmorph",
        "train",
        "--data",
        str(data),
        "--model",
        config.model,
        "--out",
        str(out),
        *config_flags(config),
    ]
    return subprocess.run(
        command, env=child_env(), capture_output=True, text=True, timeout=300, check=False
    )
