"""The GPU policy: where an NVIDIA driver is present, `galmorph serve` and `galmorph score`
refuse to run on the CPU unless allowed, with one line naming the cause and the flag.

Driver presence is simulated two ways: in-process by replacing `nvidia_driver_present`, and
for the real commands by a stand-in `libcuda.so.1` on LD_LIBRARY_PATH, which the engine's
driver check loads and onnxruntime's CUDA provider then fails on (as it does on a host whose
CUDA libraries are missing or broken; here onnxruntime-gpu finds no CUDA 13 libraries at all).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime
import pytest
from pydantic import ValidationError

from galmorph.core.modelfile import engine
from galmorph.core.modelfile.engine import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    PROBE_MODEL,
    CpuFallbackError,
    GpuPolicy,
    OnnxModel,
    Placement,
    probe_placement,
)
from galmorph.service.settings import Settings
from tests.support.cutout_factory import make_png
from tests.support.onnx_factory import write_model
from tests.support.server_process import free_port, serve

SERVE_HINT = "--allow-cpu-fallback or GALMORPH_ALLOW_CPU_FALLBACK=1"
CUDA_THEN_CPU = (CUDA_PROVIDER, CPU_PROVIDER)
CPU_ONLY = (CPU_PROVIDER,)


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """An NVIDIA driver is 'present' in this process."""
    monkeypatch.setattr(engine, "nvidia_driver_present", lambda: True)


@pytest.fixture
def no_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "nvidia_driver_present", lambda: False)


# --- the policy, in-process ---------------------------------------------------------------


def test_probe_model_is_the_one_node_graph_it_claims() -> None:
    model = onnx.load_from_string(PROBE_MODEL)
    onnx.checker.check_model(model, full_check=True)
    assert [node.op_type for node in model.graph.node] == ["Relu"]
    session = onnxruntime.InferenceSession(PROBE_MODEL, providers=[CPU_PROVIDER])
    (out,) = session.run(None, {"x": np.array([-2.0], np.float32)})
    assert out.tolist() == [0.0]


def test_without_a_driver_the_cpu_is_normal(no_driver: None) -> None:
    placement = probe_placement()
    assert placement.active == CPU_ONLY and not placement.chosen
    assert GpuPolicy().refusal(placement) is None
    assert "no NVIDIA driver" in placement.cpu_reason()
    # require_gpu refuses the CPU on any host, and says why CUDA is missing.
    refusal = GpuPolicy(require_gpu=True).refusal(placement)
    assert refusal is not None and refusal.startswith("require_gpu is set")
    assert "no NVIDIA driver" in refusal


@pytest.mark.parametrize(
    ("requested", "chosen", "require_gpu", "allow", "refused"),
    [
        (CUDA_THEN_CPU, False, False, False, True),  # default providers, CUDA failed
        (CUDA_THEN_CPU, True, False, False, True),  # CUDA named by the caller, failed
        (CPU_ONLY, False, False, False, True),  # onnxruntime build without CUDA
        (CUDA_THEN_CPU, False, False, True, False),  # fallback allowed
        (CPU_ONLY, True, False, False, False),  # the caller chose the CPU: no fallback
        (CPU_ONLY, True, True, False, True),  # ... but require_gpu refuses it
    ],
)
def test_policy_on_a_driver_host(
    driver: None,
    requested: tuple[str, ...],
    chosen: bool,
    require_gpu: bool,
    allow: bool,
    refused: bool,
) -> None:
    placement = Placement(requested, CPU_ONLY, chosen)
    policy = GpuPolicy(require_gpu=require_gpu, allow_cpu_fallback=allow, allow_hint="--flag")
    refusal = policy.refusal(placement)
    assert (refusal is not None) == refused, refusal
    if refused:
        with pytest.raises(CpuFallbackError, match="the CPU"):
            policy.check(placement)
        assert "\n" not in refusal
        if not require_gpu:
            assert refusal.startswith("an NVIDIA driver is present")
            assert refusal.endswith("allow the CPU with --flag")
    # CUDA active is never refused.
    assert policy.refusal(Placement(requested, CUDA_THEN_CPU, chosen)) is None


def test_require_gpu_and_allow_cpu_fallback_contradict() -> None:
    with pytest.raises(ValueError, match="contradict"):
        GpuPolicy(require_gpu=True, allow_cpu_fallback=True)
    with pytest.raises(ValidationError, match="contradict"):
        Settings(_env_file=None, require_gpu=True, allow_cpu_fallback=True)  # type: ignore[call-arg]
    assert Settings(_env_file=None).gpu_policy == GpuPolicy(  # type: ignore[call-arg]
        allow_hint=SERVE_HINT
    )


def test_cpu_reason_names_what_went_wrong(driver: None, monkeypatch: pytest.MonkeyPatch) -> None:
    failed = Placement(CUDA_THEN_CPU, CPU_ONLY, chosen=False)
    monkeypatch.setattr(engine, "cuda_library_error", lambda: "libcudnn.so.9: cannot open")
    assert failed.cpu_reason() == "CUDAExecutionProvider failed to load: libcudnn.so.9: cannot open"
    raised = Placement(CUDA_THEN_CPU, CPU_ONLY, False, "CUDA failure 35: driver too old")
    assert (
        raised.cpu_reason()
        == "CUDAExecutionProvider failed to start: CUDA failure 35: driver too old"
    )
    monkeypatch.setattr(engine, "cuda_library_error", lambda: None)
    assert "onnxruntime's log above says why" in failed.cpu_reason()
    assert "was not asked for" in Placement(CPU_ONLY, CPU_ONLY, chosen=True).cpu_reason()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CPU_PROVIDER])
    assert "install onnxruntime-gpu" in Placement(CPU_ONLY, CPU_ONLY, False).cpu_reason()


def test_cuda_error_at_session_start_is_kept(
    driver: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """onnxruntime's wrapper would print this error and retry on the CPU; the engine retries
    itself and keeps the error as the reason."""
    real_session = onnxruntime.InferenceSession

    def session(source: object, **kwargs: object) -> object:
        providers = kwargs["providers"]
        assert isinstance(providers, list)
        if CUDA_PROVIDER in providers:
            assert kwargs.get("enable_fallback") == 0, "onnxruntime would swallow the error"
            raise RuntimeError("CUDA failure 35: CUDA driver version is insufficient\nat line 7")
        return real_session(source, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    model = OnnxModel(write_model(tmp_path / "model.onnx"), intra_op_threads=1)
    assert model.providers == [CPU_PROVIDER] and not model.cuda_active
    assert model.placement.cuda_error == (
        "CUDA failure 35: CUDA driver version is insufficient at line 7"
    )
    with pytest.raises(CpuFallbackError) as refused:
        GpuPolicy().check(model.placement)
    assert "CUDA driver version is insufficient" in str(refused.value)
    # A broken file is still the file's error, not a CUDA one.
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(engine.ModelLoadError, match="cannot load"):
        OnnxModel(tmp_path / "junk.onnx")


# --- the real commands with a stand-in driver ---------------------------------------------


@pytest.fixture(scope="module")
def fake_driver(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment under which libcuda.so.1 loads but is no driver: CUDA cannot start."""
    folder = tmp_path_factory.mktemp("fake_driver")
    stand_in = Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_shared.so"
    shutil.copy(stand_in, folder / "libcuda.so.1")
    search_path = [str(folder), os.environ.get("LD_LIBRARY_PATH", "")]
    return {"LD_LIBRARY_PATH": os.pathsep.join(filter(None, search_path))}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("model") / "model.onnx")


def galmorph(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GALMORPH_")}
    return subprocess.run(
        [sys.executable, "-m", "galmorph.cli", *args],
        capture_output=True,
        text=True,
        env=environment | env,
        cwd=cwd,
        timeout=timeout,
    )


def assert_one_line_refusal(result: subprocess.CompletedProcess[str], command: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(f"galmorph {command}: an NVIDIA driver is present but the session ")
    assert "CUDAExecutionProvider failed to" in line
    # onnxruntime's own reason: here, the CUDA library its provider could not load.
    if (library_error := engine.cuda_library_error()) is not None:
        assert library_error in line
    return line


def test_serve_refuses_to_start_on_the_cpu(
    fake_driver: dict[str, str], model_path: Path, tmp_path: Path
) -> None:
    port = free_port()
    result = galmorph(
        *("serve", "--model", str(model_path), "--port", str(port)), env=fake_driver, cwd=tmp_path
    )
    line = assert_one_line_refusal(result, "serve")
    assert line.endswith(f"allow the CPU with {SERVE_HINT}")
    # Also without a model yet (compose on a fresh host): the GPU is checked first.
    waiting = galmorph(
        *("serve", "--model", str(tmp_path / "none.onnx"), "--wait-for-model"),
        env=fake_driver,
        cwd=tmp_path,
    )
    assert_one_line_refusal(waiting, "serve")


def test_serve_runs_on_the_cpu_when_allowed(
    fake_driver: dict[str, str], model_path: Path, tmp_path: Path
) -> None:
    allowed = fake_driver | {"GALMORPH_ALLOW_CPU_FALLBACK": "1"}
    with serve(model_path, tmp_path, env=allowed, providers=None) as server:
        assert httpx.get(f"{server.url}/readyz").json()["providers"] == [CPU_PROVIDER]
        assert httpx.post(f"{server.url}/classify", content=make_png()).status_code == 200
        model = httpx.get(f"{server.url}/model").json()
        assert model["requested_providers"] == list(CUDA_THEN_CPU)
        # The log says why CUDA is not used.
        assert "CUDAExecutionProvider was requested but the session runs on" in server.log()


def test_serve_with_cpu_providers_chosen_is_no_fallback(
    fake_driver: dict[str, str], model_path: Path, tmp_path: Path
) -> None:
    with serve(model_path, tmp_path, env=fake_driver) as server:
        assert httpx.get(f"{server.url}/readyz").json()["providers"] == [CPU_PROVIDER]


def test_serve_require_gpu_refuses_without_a_driver(model_path: Path, tmp_path: Path) -> None:
    both = galmorph(
        *("serve", "--model", str(model_path), "--require-gpu", "--allow-cpu-fallback"),
        env={},
        cwd=tmp_path,
    )
    assert both.returncode == 2 and "contradict each other" in both.stderr
    if engine.nvidia_driver_present():
        pytest.skip("this host has an NVIDIA driver")
    result = galmorph("serve", "--model", str(model_path), "--require-gpu", env={}, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "galmorph serve: require_gpu is set but the session runs on the CPU: no NVIDIA driver "
        "(libcuda.so.1 does not load: no GPU, or none passed to this container)"
    )


def test_score_refuses_then_runs_when_allowed(
    fake_driver: dict[str, str], model_path: Path, tmp_path: Path
) -> None:
    cutouts = tmp_path / "cutouts"
    cutouts.mkdir()
    for seed in range(3):
        (cutouts / f"galaxy{seed}.png").write_bytes(make_png(seed=seed))
    out = tmp_path / "scores"
    args = ("score", str(cutouts), "--model", str(model_path), "--out", str(out))
    args += ("--workers", "0", "--ort-threads", "1", "--quiet")
    refused = galmorph(*args, env=fake_driver, cwd=tmp_path)
    line = assert_one_line_refusal(refused, "score")
    assert line.endswith("allow the CPU with --allow-cpu-fallback")
    assert not out.exists(), "refused before anything was read or written"

    allowed = galmorph(*args, "--allow-cpu-fallback", env=fake_driver, cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    assert (out / "scores.parquet").is_file()
    assert "CUDAExecutionProvider was requested but the session runs on" in allowed.stderr
