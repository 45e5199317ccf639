"""`make gpu-check` (benchmarks/gpu_check.py) on a host without a GPU: every part is skipped with
its reason and the exit status is 0; a part that fails is recorded and makes it 1. The
arithmetic and the parsing the GPU parts rely on are checked here too, and a CPU rehearsal
(`--cpu-rehearsal`, slow) runs the parts' own code end to end on the CPU provider."""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import gpu_check
from benchmarks.gpu_check import (
    PART_NAMES,
    PARTS,
    Check,
    Part,
    best_of_sweep,
    condition_problem,
    gpu_memory_used_mib,
    gpus_for_catalog,
    judge,
    nvidia_smi,
    run_parts,
    selected_parts,
)
from galmorph.core.modelfile.engine import nvidia_driver_present

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS = REPO_ROOT / "benchmarks" / "results"


def run_check(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def results_files() -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in RESULTS.glob("gpu*")}


@pytest.mark.skipif(nvidia_driver_present(), reason="GPU host: the parts run for real here")
def test_without_a_gpu_every_part_is_skipped_with_its_reason(tmp_path: Path) -> None:
    before = results_files()
    out = tmp_path / "gpu.json"
    done = run_check("--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    document = json.loads(out.read_text())
    assert list(document["parts"]) == list(PART_NAMES)
    for name, record in document["parts"].items():
        assert record["status"] == "skipped", (name, record)
        assert "no NVIDIA driver" in record["reason"], (name, record)
    assert document["failed"] == [] and document["rehearsal"] is False
    assert document["environment"]["nvidia_driver"] is False
    # Each part's budget is printed before it starts, so a GPU session can plan around it.
    for part in PARTS:
        assert f"{part.name}: budget {part.budget_s} s" in done.stdout
    summary = (tmp_path / "gpu_summary.md").read_text()
    assert summary.count("| skipped |") == len(PARTS)
    assert results_files() == before, "the test wrote into benchmarks/results"


def test_plan_prints_the_budgets_and_runs_nothing(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    done = run_check("--plan", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    for part in PARTS:
        assert f"{part.name:<22} {part.budget_s:>5} s" in done.stdout
    assert "budget of the parts that can run here" in done.stdout
    assert not out.exists()


@pytest.mark.parametrize("form", ["file", "module"])
def test_runs_as_a_file_and_as_a_module_from_anywhere(form: str, tmp_path: Path) -> None:
    # Neither form may lean on the caller's PYTHONPATH or working folder; the module form
    # needs the checkout on the path, which is what `-m` from the checkout gives.
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = REPO_ROOT / "benchmarks" / "gpu_check.py"
    command = [str(script)] if form == "file" else ["-m", "benchmarks.gpu_check"]
    done = subprocess.run(
        [sys.executable, *command, "--plan", "--out", str(tmp_path / "gpu.json")],
        cwd=tmp_path if form == "file" else REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "budget of the parts that can run here" in done.stdout


def test_a_failing_part_is_recorded_its_dependents_skipped_and_the_exit_status_is_1(
    tmp_path: Path,
) -> None:
    out = tmp_path / "gpu.json"
    done = run_check(
        *("--cpu-rehearsal", "--only", "cuda_provider", "--out", str(out)),
        *("--serve-model", "no_such_model", "--models", "no_such_model"),
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    parts = json.loads(out.read_text())["parts"]
    assert parts["export"]["status"] == "failed"
    assert "unknown model 'no_such_model'" in parts["export"]["error"]
    assert parts["cuda_provider"]["status"] == "skipped"
    assert parts["cuda_provider"]["reason"].startswith("needs part export, which failed")
    assert parts["batch_sweep"] == {
        "status": "skipped",
        "reason": "not selected (--only)",
        "budget_s": 130,
    }


def fake_check(**settings: Any) -> Check:
    args = argparse.Namespace(cpu_rehearsal=True, serve_model="m", models=["m"], **settings)
    return Check(args, Path("."), env={})


def test_run_parts_records_a_failure_and_goes_on() -> None:
    def boom(check: Check) -> dict[str, Any]:
        raise RuntimeError("boom")

    def fine(check: Check) -> dict[str, Any]:
        return {"summary": "fine"}

    parts = [
        Part("export", 5, "fails", boom, ()),
        Part("cuda_provider", 5, "needs export", fine, ("export",)),
        Part("training", 5, "independent", fine, ()),
    ]
    results = run_parts(fake_check(), parts)
    assert results["export"]["status"] == "failed"
    assert results["export"]["error"] == "RuntimeError: boom"
    assert "boom" in results["export"]["traceback"]
    assert results["cuda_provider"]["status"] == "skipped"
    assert results["cuda_provider"]["reason"] == (
        "needs part export, which failed: RuntimeError: boom"
    )
    assert results["training"]["status"] == "ok" and results["training"]["summary"] == "fine"
    assert results["training"]["budget_s"] == 5 and results["training"]["over_budget"] is False


def test_only_adds_the_parts_a_part_needs_in_order() -> None:
    names = [part.name for part in selected_parts(["service"])]
    assert names == ["export", "cuda_provider", "cuda_without_torch", "batch_sweep", "service"]
    assert [part.name for part in selected_parts(None)] == list(PART_NAMES)


def gpu_env(**torch: Any) -> dict[str, Any]:
    return {
        "nvidia_driver": True,
        "onnxruntime": {
            "package": "onnxruntime-gpu",
            "version": "1.31.1",
            "available_providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        },
        "torch": {"version": "2.13.0", "cuda_build": "13.0", "cuda_available": True, **torch},
    }


def test_conditions_name_what_is_missing() -> None:
    no_driver = {**gpu_env(device_count=1), "nvidia_driver": False}
    assert "no NVIDIA driver" in (condition_problem("ort_cuda", no_driver, False) or "")
    cpu_ort = gpu_env(device_count=1)
    cpu_ort["onnxruntime"] = {
        **cpu_ort["onnxruntime"],
        "available_providers": ["CPUExecutionProvider"],
    }
    assert "has no CUDAExecutionProvider" in (condition_problem("ort_cuda", cpu_ort, False) or "")
    cpu_torch = gpu_env(device_count=0, cuda_build=None, cuda_available=False, version="2.13.0+cpu")
    assert condition_problem("ort_cuda", cpu_torch, False) is None
    assert "CPU-only build" in (condition_problem("torch_cuda", cpu_torch, False) or "")
    one_gpu = gpu_env(device_count=1)
    assert condition_problem("torch_cuda", one_gpu, False) is None
    assert condition_problem("two_gpus", one_gpu, False) == "1 GPU visible: DDP needs at least 2"
    assert condition_problem("two_gpus", gpu_env(device_count=2), False) is None
    assert "CPU rehearsal" in (condition_problem("gpu_only", one_gpu, True) or "")


def test_judge_passes_within_tolerance_and_reports_near_ties() -> None:
    reference = np.array([[0.5, 0.3, 0.2], [0.334, 0.333, 0.333]], np.float32)
    swapped = np.array([[0.5, 0.3, 0.2], [0.3334, 0.3336, 0.333]], np.float32)
    verdict = judge(reference, swapped, tolerance=5e-3)
    assert verdict["passed"] and verdict["argmax_agreement"] == 0.5
    assert verdict["near_ties"] == 1
    assert not judge(reference, reference + 1e-3, tolerance=1e-4)["passed"]
    with pytest.raises(gpu_check.CheckFailed, match="shape"):
        judge(reference, reference[:1], tolerance=1e-4)


def test_best_batch_is_the_smallest_within_the_knee() -> None:
    def point(rate: float) -> dict[str, Any]:
        return {"host_arrays": {"items_per_s": rate}}

    points = {"1": point(100), "8": point(910), "64": point(1000), "256": point(990)}
    points["512"] = {"status": "out of GPU memory"}
    assert best_of_sweep(points) == (8, 910.0)
    assert best_of_sweep({"1": {"status": "not run"}}) == (None, None)


def test_gpus_for_ten_million_galaxies_in_a_night() -> None:
    # 10 M in 8 h is 347.2 images/s.
    assert gpus_for_catalog(347.3) == 1
    assert gpus_for_catalog(347.0) == 2
    assert gpus_for_catalog(100.0) == 4


@pytest.fixture
def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An `nvidia-smi` on PATH that answers like the real one and logs its arguments."""
    log = tmp_path / "calls.log"
    script = tmp_path / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        'case "$*" in\n'
        '  *memory.used*) echo "2048" ;;\n'
        '  *) for i in 0 1; do echo "$i, NVIDIA H200, 143771, 580.65.06"; done ;;\n'
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return log


def test_nvidia_smi_rows_and_memory_of_the_first_visible_gpu(
    fake_nvidia_smi: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = nvidia_smi("index,name,memory.total,driver_version")
    assert rows == [[str(i), "NVIDIA H200", "143771", "580.65.06"] for i in (0, 1)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert gpu_memory_used_mib() == 2048.0
    assert "-i 1" in fake_nvidia_smi.read_text().splitlines()[-1]


@pytest.mark.slow
def test_cpu_rehearsal_runs_the_parts_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "rehearsal.json"
    done = run_check(
        *("--cpu-rehearsal", "--out", str(out), "--img-size", "64"),
        *("--models", "gm_astroformer_tiny", "--serve-model", "gm_astroformer_tiny"),
        *("--batch-sizes", "1", "2", "--seconds-per-point", "0.1"),
        *("--service-requests", "16", "--score-rows", "16"),
        *("--train-steps", "2", "--train-batch-size", "8"),
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    document = json.loads(out.read_text())
    parts = document["parts"]
    assert document["rehearsal"] is True
    assert "CPU rehearsal" in (tmp_path / "rehearsal_summary.md").read_text()
    skipped = {"io_binding_cuda_graph", "ddp"}
    for name in set(PART_NAMES) - skipped:
        assert parts[name]["status"] == "ok", (name, parts[name])
    for name in skipped:
        assert parts[name]["status"] == "skipped" and "CPU rehearsal" in parts[name]["reason"]
    cases = parts["parity"]["cases"]
    assert set(cases) == {"gm_astroformer_tiny/fp32", "gm_astroformer_tiny/fp16"}
    assert all(case["passed"] and case["images"] == 20 for case in cases.values())
    series = parts["batch_sweep"]["series"]["gm_astroformer_tiny/fp32"]
    assert series["best_batch"] in (1, 2) and series["providers"] == ["CPUExecutionProvider"]
    assert parts["service"]["service"]["requests"] >= 16
    assert parts["service"]["fraction_of_raw"] > 0
    assert parts["scorer"]["scorer"]["rows_scored"] == 16
    assert parts["training"]["steps"] == 2
    assert parts["cuda_without_torch"]["providers"] == ["CPUExecutionProvider"]
