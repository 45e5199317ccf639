"""The benchmark harness runs end to end (`benchmarks.run --quick`) and writes valid results.

No speed is asserted anywhere: figures depend on the machine and its load. What is checked is
that every benchmark of ours ran, produced well-formed JSON with consistent statistics, that
the contenders computed the same answers, and that the summary and plot were written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.common import Timing, time_interleaved
from benchmarks.report import raw_fractions

REPO_ROOT = Path(__file__).resolve().parents[2]
OURS = ("gemm", "models", "startup")


def test_interleaved_rounds_rotate_the_order_and_skip_warmup() -> None:
    calls: list[str] = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timings = time_interleaved(contenders, warmup=1, repeats=3)
    assert calls[:3] == ["a", "b", "c"]  # warm-up, in order
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(t.samples) == 3 and t.warmup == 1 for t in timings.values())


def test_timing_reports_median_range_and_rate() -> None:
    figures = Timing(samples=(0.4, 0.1, 0.2), warmup=2).to_dict(items_per_call=8)
    assert figures["median_ms"] == 200.0
    assert (figures["min_ms"], figures["max_ms"]) == (100.0, 400.0)
    assert figures["items_per_s"] == 40.0
    assert (figures["items_per_s_min"], figures["items_per_s_max"]) == (20.0, 80.0)


def test_time_interleaved_rejects_zero_repeats() -> None:
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved({"a": lambda: None}, warmup=0, repeats=0)


def test_raw_fractions_are_found_at_any_depth() -> None:
    document = {"a": [{"fraction_of_raw": 0.9, "images_per_second": 3}], "raw_fraction": 0.5}
    assert dict(raw_fractions(document)) == {"a[0].fraction_of_raw": 0.9, "raw_fraction": 0.5}


def _check_timing(figures: dict[str, Any]) -> None:
    assert figures["min_ms"] <= figures["median_ms"] <= figures["max_ms"]
    assert figures["min_ms"] > 0 and figures["repeats"] >= 2
    assert figures["items_per_s_min"] <= figures["items_per_s"] <= figures["items_per_s_max"]


@pytest.mark.slow
def test_quick_run_writes_results_summary_and_plot(tmp_path: Path) -> None:
    results = tmp_path / "results"
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "benchmarks.run", "--quick", "--threads", "1"]
    completed = subprocess.run(
        [*command, "--results-dir", str(results)],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    run = json.loads((results / "run.json").read_text())
    assert run["quick"] is True
    for name in OURS:
        assert run["benchmarks"][name]["status"] == "ok", run["benchmarks"][name]
    assert run["benchmarks"]["decode"]["status"].startswith(("not run", "missing"))

    gemm = json.loads((results / "gemm.json").read_text())
    assert gemm["limit_gflops"] > 0 and gemm["machine"]["cpu_model"]

    models = json.loads((results / "models.json").read_text())
    assert models["machine"]["versions"]["onnxruntime-gpu"]
    tiny = models["models"]["gm_astroformer_tiny"]
    assert tiny["flops_per_image"] > 0
    for case in tiny["batches"].values():
        for contender in ("onnxruntime", "torch_eager"):
            _check_timing(case["contenders"][contender])
        # Same weights, same inputs: the artifact reproduces PyTorch.
        assert case["max_abs_diff_vs_eager"]["onnxruntime"] < 1e-4
        assert case["limit_images_per_s"] > 0
    assert "Conv" in json.dumps(tiny["profiles"])
    int8 = models["int8"]
    for key in ("fp32_top1", "int8_top1", "prediction_agreement"):
        assert 0.0 <= int8["accuracy"][key] <= 1.0
    for case in int8["speed"].values():
        _check_timing(case["fp32"])
        _check_timing(case["int8"])
    assert int8["artifact_bytes"]["int8"] < int8["artifact_bytes"]["fp32"]
    cuda = models["cuda"]
    assert cuda.get("status", "").startswith("skipped") or "fp32" in json.dumps(cuda)

    startup = json.loads((results / "startup.json").read_text())
    figures = startup["models"]["gm_astroformer_tiny"]
    assert 0 < figures["ready_s"]["median"] < 120
    assert figures["rss_mib_after_warm_requests"]["median"] > 10

    summary = (results / "summary.md").read_text()
    assert "## Targets" in summary and "gm_astroformer_tiny @32" in summary
    assert (results / "throughput_vs_batch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
