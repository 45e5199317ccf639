"""`init_from: synthetic`: built once per key under a lock, reused, recorded, never half-cached."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from galmorph.training import synthetic_pretrain
from galmorph.training.config import ConfigError, TrainConfig
from galmorph.training.synthetic_pretrain import resolve_start
from galmorph.training.train import Trainer, train
from tests.support.training_helpers import (
    FOUR_CLASSES,
    TINY_RECIPE,
    child_env,
    four_class_file,
    galmorph_command,
    make_synthetic,
    run_galmorph,
    tiny_config,
    torchrun_train,
)

BUILDING = "building the synthetic starting point once"


@pytest.fixture(scope="module")
def mine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic_pretrain")
    return four_class_file(
        root / "mine.h5", make_synthetic(root / "g10.h5", n=40, seed=3), FOUR_CLASSES
    )


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(synthetic_pretrain.CACHE_ENV, str(folder))
    return folder


def entries(cache: Path) -> list[Path]:
    """Cache entries and temporary folders (the lock files are not entries)."""
    return sorted(p for p in cache.iterdir() if p.is_dir()) if cache.is_dir() else []


def train_cli(mine: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    result = run_galmorph(
        "train", "--data", mine, "--out", out, "--init-from", "synthetic", *TINY_RECIPE, *extra
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_cli_builds_once_then_reuses_and_records_the_start(
    mine: Path, cache: Path, tmp_path: Path
) -> None:
    first = train_cli(mine, tmp_path / "a")
    assert BUILDING in first.stderr
    [entry] = entries(cache)
    weights = entry / "model.safetensors"
    built_at = weights.stat().st_mtime_ns
    assert not (entry / "synthetic.h5").exists()  # the rendered images are not kept

    second = train_cli(mine, tmp_path / "b")
    assert BUILDING not in second.stderr
    assert f"reusing {entry}" in second.stderr
    assert weights.stat().st_mtime_ns == built_at
    assert entries(cache) == [entry]

    for run in ("a", "b"):
        config = json.loads((tmp_path / run / "config.json").read_text())
        recipe = json.loads((tmp_path / run / "model.json").read_text())["training_data"]["recipe"]
        for recorded in (config, recipe):
            assert recorded["init_from"] == "synthetic"
            start = recorded["synthetic_pretrain"]
            assert Path(start["folder"]) == entry
            assert start["key"] and start["key"] in entry.name
    # A run from the start trains the user's 4 classes (the 10-class head re-initialised).
    assert "classifier re-initialised" in first.stderr


def test_resume_reuses_the_recorded_start(mine: Path, cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    stopped = run_galmorph(
        "train", "--data", mine, "--out", out, "--init-from", "synthetic", *TINY_RECIPE,
        *("--set", "stop_after_step=1"),
    )  # fmt: skip
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    resumed = run_galmorph("train", "--data", mine, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert BUILDING not in resumed.stderr
    assert "synthetic starting point: reusing" in resumed.stderr


def test_two_concurrent_runs_build_it_once(mine: Path, cache: Path, tmp_path: Path) -> None:
    runs = [
        subprocess.Popen(
            galmorph_command(
                "train", "--data", mine, "--out", tmp_path / name, "--init-from", "synthetic",
                *TINY_RECIPE,
            ),
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]  # fmt: skip
    logs = []
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-3000:]
        logs.append(stderr)
    assert sum(BUILDING in log for log in logs) == 1, logs
    [entry] = entries(cache)
    for name in ("a", "b"):
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert Path(config["synthetic_pretrain"]["folder"]) == entry


def test_torchrun_ranks_build_once_and_share_the_folder(
    mine: Path, cache: Path, tmp_path: Path
) -> None:
    result = torchrun_train(mine, tmp_path / "run", synthetic_config(mine, tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count(BUILDING) == 1
    assert f"reusing {cache}" in result.stderr  # the other rank's (after waiting on the lock)
    [entry] = entries(cache)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert Path(config["synthetic_pretrain"]["folder"]) == entry


def synthetic_config(mine: Path, out: Path, **start: int) -> TrainConfig:
    config = tiny_config(mine, out, init_from="synthetic", epochs=1)
    return replace(
        config,
        synthetic_pretrain=replace(config.synthetic_pretrain, images=40, epochs=1, **start),
    )


def test_a_failed_build_leaves_no_entry_and_says_so(
    mine: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(self: Trainer, *, resume: bool) -> Path:
        raise RuntimeError("out of memory halfway")

    monkeypatch.setattr(Trainer, "run", crash)
    failed = r"building the synthetic starting point failed.*out of memory halfway.*nothing was"
    with pytest.raises(ConfigError, match=failed):
        resolve_start(synthetic_config(mine, tmp_path / "run"))
    assert entries(cache) == []  # neither the entry nor its temporary folder
    assert not (tmp_path / "run").exists()


def test_a_changed_setting_builds_a_new_entry(mine: Path, cache: Path, tmp_path: Path) -> None:
    train(resolve_start(synthetic_config(mine, tmp_path / "a")))
    [first] = entries(cache)
    resolve_start(synthetic_config(mine, tmp_path / "b", seed=8))
    assert len(entries(cache)) == 2
    # Where and how fast it runs is not part of the key: no third entry.
    again = replace(synthetic_config(mine, tmp_path / "c"), threads=2, log_every_steps=5)
    train(resolve_start(again))
    assert len(entries(cache)) == 2
    recorded = json.loads((tmp_path / "c" / "config.json").read_text())
    assert Path(recorded["synthetic_pretrain"]["folder"]) == first


def test_a_missing_data_file_stops_before_any_build(cache: Path, tmp_path: Path) -> None:
    result = run_galmorph(
        "train", "--data", tmp_path / "typo.h5", "--out", tmp_path / "run",
        "--init-from", "synthetic", *TINY_RECIPE,
    )  # fmt: skip
    assert result.returncode == 2
    assert "typo.h5" in result.stderr.splitlines()[-1]
    assert BUILDING not in result.stderr
    assert entries(cache) == []


def test_an_unresolved_synthetic_start_is_refused(mine: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no starting point was resolved"):
        train(synthetic_config(mine, tmp_path / "run"))


def test_settings_are_validated() -> None:
    config = TrainConfig.from_dict(
        {"data": "x.h5", "out": "run", "synthetic_pretrain": {"images": 5}}
    )
    with pytest.raises(ConfigError, match=r"synthetic_pretrain\.images"):
        config.validate()
