"""`init_from: synthetic`: a starting point trained on galmorph's own synthetic galaxies.

Weights cannot ship (no download host, too large for git), so the start is built on the user's
machine, once per key, and reused: SyntheticPretrain.images balanced galaxies rendered by
training/synth.py with its seed, trained SyntheticPretrain.epochs epochs with the small-data
recipe (configs/small_data.yaml: its optimiser, batch and augmentation; a third of the epochs
warm up, 1 of the measured 3). The run then starts from that folder through the ordinary
init_from path (training/finetune.py re-initialises the classifier for the user's classes).

Cache: $GALMORPH_PRETRAIN_CACHE, else galmorph's user cache folder (synthetic-pretrain). One
entry per key: a hash of everything that changes the weights (model, img_size, the
SyntheticPretrain settings, the pretraining config, LAYOUT). A builder holds an fcntl lock on
the key, trains in a hidden temporary folder and renames it into place, so concurrent runs
(torchrun ranks on one host included) build it once and a crash leaves no half entry.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from galmorph.core.files import atomic_write_text, user_cache_dir
from galmorph.training import distributed
from galmorph.training.config import SYNTHETIC_INIT, ConfigError, TrainConfig, load_config

logger = logging.getLogger(__name__)

CACHE_ENV = "GALMORPH_PRETRAIN_CACHE"
# Bump when the procedure changes in a way the key's values do not show.
LAYOUT = 1
RECIPE = Path(__file__).resolve().parents[1] / "configs" / "small_data.yaml"
KEY_FILE = "synthetic_pretrain.json"
# Settings of where and how fast a run goes, not of the weights it ends with.
_NOT_IN_KEY = (
    "data",
    "out",
    "device",
    "num_workers",
    "threads",
    "progress",
    "log_every_steps",
    "tensorboard",
    "eval_batch_size",
)


def cache_root() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    return Path(explicit).expanduser() if explicit else user_cache_dir("synthetic-pretrain")


def resolve_start(config: TrainConfig) -> TrainConfig:
    """`config` with synthetic_pretrain.folder/key set to the cached start (built if absent);
    any other init_from is returned unchanged. A config that already names a folder with this
    key (a resume's config.json) uses it without looking at the cache."""
    if config.init_from != SYNTHETIC_INIT:
        return config
    if not Path(config.data).is_file():
        return config  # the run stops on its data file with the usual message, nothing built
    recipe = pretrain_config(config, out=Path("."), data=Path("."))
    key = cache_key(config, recipe)
    settings = config.synthetic_pretrain
    if settings.key == key and settings.folder and (Path(settings.folder) / KEY_FILE).is_file():
        folder = Path(settings.folder)
        logger.info("synthetic starting point: reusing %s", folder)
    else:
        folder = ensure_built(config, key)
    return replace(config, synthetic_pretrain=replace(settings, folder=str(folder), key=key))


def pretrain_config(config: TrainConfig, *, out: Path, data: Path) -> TrainConfig:
    """The small-data recipe at this run's model and size, for SyntheticPretrain.epochs."""
    if not RECIPE.is_file():
        raise ConfigError(
            f"config key 'init_from' is 'synthetic', which trains with the small-data recipe "
            f"{RECIPE}: not found (it ships in the galmorph repository's configs/)"
        )
    epochs = config.synthetic_pretrain.epochs
    recipe = load_config(
        RECIPE,
        data=str(data),
        out=str(out),
        model=config.model,
        img_size=config.model_img_size(),
        epochs=epochs,
        warmup_epochs=epochs / 3,
        device=config.device,
        threads=config.threads,
        progress=config.progress,
    )
    # The recipe may itself start from the synthetic point: its own start is from scratch.
    return replace(recipe, init_from=None, split_fractions=(1.0, 0.0, 0.0), class_names=None)


def cache_key(config: TrainConfig, recipe: TrainConfig) -> str:
    """Hex digest of everything that changes the start's weights."""
    settings = config.synthetic_pretrain
    trained = {k: v for k, v in recipe.to_dict().items() if k not in _NOT_IN_KEY}
    described = {
        "layout": LAYOUT,
        "images": settings.images,
        "epochs": settings.epochs,
        "seed": settings.seed,
        "recipe": trained,
    }
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def entry_name(config: TrainConfig, key: str) -> str:
    return f"{config.model}-{config.model_img_size()}px-{key}"


def ensure_built(config: TrainConfig, key: str) -> Path:
    """The cached folder for `key`, built under the key's lock when absent."""
    root = cache_root()
    folder = root / entry_name(config, key)
    if (folder / KEY_FILE).is_file():
        logger.info("synthetic starting point: reusing %s", folder)
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{folder.name}.lock"):
        if (folder / KEY_FILE).is_file():  # another process built it while we waited
            logger.info("synthetic starting point: reusing %s (built by another run)", folder)
            return folder
        # Under the lock, any temporary folder of this entry is a killed builder's.
        for stale in root.glob(f".{folder.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        _build(config, key, folder)
    return folder


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _build(config: TrainConfig, key: str, folder: Path) -> None:
    """Render, train and rename into `folder`; on any failure nothing is left behind."""
    settings = config.synthetic_pretrain
    temp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    recipe = pretrain_config(config, out=temp, data=temp / "synthetic.h5")
    logger.info(
        "building the synthetic starting point once: %d galaxies at %d px, %d epoch(s) of %s "
        "(the bars below show the time left; later runs reuse it) into %s",
        settings.images,
        recipe.model_img_size(),
        settings.epochs,
        recipe.model,
        folder,
    )
    try:
        temp.mkdir(parents=True)
        _train(recipe, settings.seed, settings.images)
        (temp / "synthetic.h5").unlink()  # the images are rendered again from the seed if needed
        atomic_write_text(temp / KEY_FILE, json.dumps(_record(config, recipe, key), indent=2))
        os.rename(temp, folder)
    except BaseException as exc:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(exc, Exception):
            raise ConfigError(
                f"building the synthetic starting point failed ({type(exc).__name__}: {exc}); "
                f"nothing was cached under {folder.parent}"
            ) from exc
        raise
    logger.info("synthetic starting point built: %s", folder)


def _train(recipe: TrainConfig, seed: int, images: int) -> None:
    from galmorph.training.synth import MIN_SIZE, synthesize
    from galmorph.training.train import Trainer

    synthesize(
        Path(recipe.data),
        n=images,
        # Below the renderer's smallest size the trainer resizes the batches down.
        size=max(recipe.model_img_size(), MIN_SIZE),
        seed=seed,
        num_workers=max(1, min(8, len(os.sched_getaffinity(0)))),
        progress=recipe.progress,
    )
    recipe.validate()
    # One process builds, even under torchrun (before its process group exists): the other
    # ranks wait on the lock.
    device = distributed.resolve_device(recipe.device, int(os.environ.get("LOCAL_RANK", "0")))
    alone = distributed.DistContext(rank=0, local_rank=0, world_size=1, device=device)
    Trainer(recipe, alone).run(resume=False)


def _record(config: TrainConfig, recipe: TrainConfig, key: str) -> dict[str, Any]:
    settings = config.synthetic_pretrain
    return {
        "key": key,
        "layout": LAYOUT,
        "model": recipe.model,
        "img_size": recipe.model_img_size(),
        "images": settings.images,
        "epochs": settings.epochs,
        "seed": settings.seed,
        "recipe": str(RECIPE),
    }
