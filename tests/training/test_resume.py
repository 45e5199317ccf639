"""Checkpoints: exact resume, SIGTERM writes a checkpoint, kill -9 never leaves a half file."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from galmorph.model import checkpoint as checkpoint_module
from galmorph.model.checkpoint import load_model
from galmorph.training.state import MANIFEST_NAME, load_checkpoint
from galmorph.training.train import TrainingInterrupted, train
from tests.support.training_helpers import (
    child_env,
    config_flags,
    galmorph_command,
    make_synthetic,
    run_galmorph,
    tiny_config,
)

torch.set_num_threads(1)

# Every source of randomness on: augmentation, mixup, dropout, stochastic depth, plus EMA and
# gradient clipping, so an inexact restore of any of them would change the losses.
RANDOM_EVERYTHING: dict[str, Any] = {
    "augment": {"policy": "paper", "randaugment_ops": 1},
    "mixup": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0},
    "drop_rate": 0.1,
    "drop_path_rate": 0.1,
    "ema": True,
    "ema_decay": 0.9,
    "clip_grad": 1.0,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("resume") / "synth.h5", n=200)


def _step_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "step"}


@pytest.mark.slow
def test_resume_mid_epoch_continues_exactly(data: Path, tmp_path: Path) -> None:
    # 160 training images / batch 16 = 10 steps per epoch; stop inside epoch 2.
    straight = train(tiny_config(data, tmp_path / "straight", **RANDOM_EVERYTHING))
    interrupted = tiny_config(data, tmp_path / "resumed", stop_after_step=13, **RANDOM_EVERYTHING)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(interrupted)
    assert stopped.value.step == 13
    assert load_checkpoint(tmp_path / "resumed")["step"] == 13
    # A CLI resume takes config.json as its base; the one-off stop must not be in it.
    saved = json.loads((tmp_path / "resumed" / "config.json").read_text())
    assert saved["stop_after_step"] is None
    assert saved["augment"]["randaugment_ops"] == 1 and saved["mixup"]["cutmix_alpha"] == 1.0
    resumed = train(tiny_config(data, tmp_path / "resumed", **RANDOM_EVERYTHING), resume=True)

    expected, actual = _step_losses(straight), _step_losses(resumed)
    assert sorted(actual) == sorted(expected) == list(range(1, 21))
    for step in range(14, 21):  # every step after the resume, the next one first
        assert actual[step] == expected[step], (step, actual[step], expected[step])
    # Bitwise-equal weights (the EMA, which is what model.safetensors holds with ema on).
    final_a = load_file(str(straight / "model.safetensors"))
    final_b = load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    epochs = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [1, 2]


def _wait_for(condition: Any, process: subprocess.Popen[bytes], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"training exited early with {process.returncode}"
        assert time.monotonic() < deadline, "training made no progress"
        time.sleep(0.2)


def _logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum('"kind": "step"' in line for line in path.read_text().splitlines())


def _start(data: Path, run_dir: Path, **overrides: Any) -> subprocess.Popen[bytes]:
    config = tiny_config(data, run_dir, epochs=50, **overrides)
    command = galmorph_command(
        "train", "--data", data, "--model", config.model, "--out", run_dir, *config_flags(config)
    )
    return subprocess.Popen(
        command, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_resume_continues(data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = _start(data, run_dir)
    _wait_for(lambda: _logged_steps(run_dir) >= 3, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr.decode()[-2000:]
    state = load_checkpoint(run_dir)
    # Nothing lost: the checkpoint is at the last step that was logged.
    assert state["step"] == _logged_steps(run_dir) >= 3

    # The resume reads the run's nested config.json; a dotted --set changes one section key.
    target = state["step"] + 2
    result = run_galmorph(
        "train", "--out", run_dir, "--resume", "--set", f"stop_after_step={target}",
        "--set", "augment.hflip=0.25",
    )  # fmt: skip
    assert result.returncode == 143, result.stderr[-2000:]
    assert load_checkpoint(run_dir)["step"] == target
    assert "resumed from step" in result.stderr
    assert "resuming with changed settings: augment.hflip" in result.stderr
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["augment"]["hflip"] == 0.25 and saved["augment"]["policy"] == "paper"


@pytest.mark.slow
def test_kill_9_never_leaves_a_partial_checkpoint(data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # A checkpoint every step, so the kill is likely to land during a write.
    process = _start(data, run_dir, checkpoint_every_steps=1)
    _wait_for(lambda: (run_dir / MANIFEST_NAME).is_file() and _logged_steps(run_dir) >= 4, process)
    time.sleep(0.37)
    process.kill()
    process.wait(timeout=30)

    state = load_checkpoint(run_dir)  # verifies sizes and SHA-256 against the manifest
    assert state["step"] >= 3
    load_model(run_dir)  # the deployable weights pass their own hash check
    # A kill between a pair's rename and the manifest's may leave a newer, complete pair
    # that nothing names yet; anything under a final name must still be whole.
    for path in run_dir.glob("train_state-*"):
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            load_file(str(path))
    result = run_galmorph(
        "train", "--out", run_dir, "--resume", "--set", f"stop_after_step={state['step'] + 1}"
    )
    assert result.returncode == 143, result.stderr[-2000:]
    assert load_checkpoint(run_dir)["step"] == state["step"] + 1


def test_a_run_killed_between_its_weights_and_their_spec_leaves_a_loadable_model(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # kill -9 can land after model.safetensors is renamed and before model.json names it; a
    # checkpoint's spec differs from the last one (steps completed, metrics), so the spec that
    # names both weights must be written for the same run's next checkpoint too.
    real_write_text = checkpoint_module.atomic_write_text
    final_specs = 0

    def killed_at_the_second_final_spec(path: Path, text: str) -> Path:
        nonlocal final_specs
        if Path(path).name == "model.json" and "previous_weights_sha256" not in text:
            final_specs += 1
            if final_specs == 2:
                raise KeyboardInterrupt
        return real_write_text(path, text)

    monkeypatch.setattr(checkpoint_module, "atomic_write_text", killed_at_the_second_final_spec)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, tmp_path / "run", checkpoint_every_steps=1))
    monkeypatch.undo()
    load_model(tmp_path / "run")  # the weights on disk pass the spec's hash check
