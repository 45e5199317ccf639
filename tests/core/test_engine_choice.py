"""The engine choice (galmorph.core.modelfile.engine_choice) and the openvino bf16 engine.

`auto` is decided from mocked CPU flags, package presence and NVIDIA driver; the openvino engine
itself runs where the package is installed and the CPU has bf16 units (skipped otherwise, with the
reason), including its parity refusal on a model whose answers bf16 cannot keep, the card's sample
images it checks parity on (synthetic ones where the file has none or bad ones) and the cache of
its parity result.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from galmorph.cli import build_parser
from galmorph.cli import main as galmorph_main
from galmorph.core.modelfile import engine_choice, openvino_engine
from galmorph.core.modelfile.contract import (
    MAX_SAMPLE_IMAGES,
    SAMPLE_IMAGES_KEY,
    encode_sample_images,
)
from galmorph.core.modelfile.engine import CPU_PROVIDER, CUDA_PROVIDER, ModelLoadError, OnnxModel
from galmorph.core.modelfile.engine_choice import ENGINES, open_model
from galmorph.core.modelfile.openvino_engine import (
    PARITY_CACHE_ENV,
    PARITY_TOLERANCE,
    EngineUnavailable,
    OpenVinoModel,
    openvino_refusal,
    parity_images,
)
from tests.support.onnx_factory import FactoryModel, build_model, write_model

OPENVINO_RUNS = pytest.mark.skipif(
    not openvino_engine.openvino_installed() or not openvino_engine.cpu_bf16_flags(),
    reason="needs the openvino package (pip install 'galmorph[cpu]') and a CPU with "
    "avx512_bf16 or amx_bf16",
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(
        tmp_path_factory.mktemp("engine") / "model.onnx", FactoryModel(ood_threshold=0.5)
    )


@pytest.fixture(scope="module")
def fragile_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model bf16 cannot run: every class's head weights are 1000 plus a difference under
    bf16's step there (4), so bf16 logits tie where fp32 ones are ~1 apart."""
    model = build_model(FactoryModel())
    for tensor in model.graph.initializer:
        if tensor.name == "head_w":
            weights = numpy_helper.to_array(tensor)
            spread = np.random.default_rng(0).uniform(-1.5, 1.5, weights.shape)
            tensor.CopyFrom(numpy_helper.from_array((1000 + spread).astype(np.float32), "head_w"))
    path = tmp_path_factory.mktemp("fragile") / "fragile.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture
def bf16_host(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A CPU-only host with bf16 units and the package, as far as the choice can tell."""
    monkeypatch.setattr(openvino_engine, "nvidia_driver_present", lambda: False)
    monkeypatch.setattr(openvino_engine, "openvino_installed", lambda: True)
    monkeypatch.setattr(openvino_engine, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    return monkeypatch


# --- the choice -------------------------------------------------------------------------------


def test_openvino_may_run_on_a_cpu_only_bf16_host_with_the_package(bf16_host: object) -> None:
    assert openvino_refusal(None) is None
    assert openvino_refusal([CPU_PROVIDER]) is None


@pytest.mark.parametrize(
    ("change", "providers", "reason"),
    [
        ("cpu_bf16_flags", None, "none of avx512_bf16, amx_bf16"),
        ("openvino_installed", None, "pip install 'galmorph[cpu]'"),
        ("nvidia_driver_present", None, "an NVIDIA driver is present"),
        (None, [CUDA_PROVIDER, CPU_PROVIDER], "providers name CUDAExecutionProvider"),
    ],
)
def test_auto_keeps_onnxruntime_without_bf16_units_package_or_on_a_gpu_path(
    bf16_host: pytest.MonkeyPatch,
    model_path: Path,
    change: str | None,
    providers: list[str] | None,
    reason: str,
) -> None:
    if change == "nvidia_driver_present":
        bf16_host.setattr(openvino_engine, change, lambda: True)
    elif change is not None:
        bf16_host.setattr(openvino_engine, change, lambda: ())
    assert reason in (openvino_refusal(providers) or "")
    if providers is None:  # a CUDA session is not started here
        model = open_model(model_path, engine="auto", intra_op_threads=1)
        assert type(model) is OnnxModel
        assert model.engine == "onnxruntime"
        assert reason in model.engine_report()["chosen"]


def test_the_environment_sets_the_default_and_a_misspelt_engine_is_refused(
    model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(engine_choice.ENGINE_ENV, "onnxruntime")
    assert open_model(model_path, intra_op_threads=1).engine == "onnxruntime"
    monkeypatch.setenv(engine_choice.ENGINE_ENV, "tensorrt")
    with pytest.raises(ModelLoadError, match="unknown engine 'tensorrt'; choose one of auto"):
        open_model(model_path)


def test_every_command_offers_the_engines_open_model_knows() -> None:
    """The CLIs spell the choices out: their registration imports no onnxruntime."""
    offered = sorted(
        (action.dest, tuple(action.choices or ()))
        for action in _all_actions(build_parser())
        if action.dest in ("engine", "model_engine") and action.choices != ("local", "ray")
    )
    # serve --engine, model inspect --engine, score --model-engine
    assert offered == [("engine", ENGINES), ("engine", ENGINES), ("model_engine", ENGINES)]


def _all_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    found = []
    for action in parser._actions:
        found.append(action)
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found += _all_actions(sub)
    return found


def test_openvino_asked_for_without_the_package_is_a_clear_error(
    model_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(EngineUnavailable, match=r"needs the openvino package \(pip install"):
        open_model(model_path, engine="openvino", intra_op_threads=1)
    assert galmorph_main(["model", "inspect", str(model_path), "--engine", "openvino"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("galmorph model inspect: engine openvino needs the openvino package")
    assert "\n" not in error


def test_openvino_refuses_providers_that_name_cuda(model_path: Path) -> None:
    with pytest.raises(EngineUnavailable, match="runs on the CPU but the providers name CUDA"):
        open_model(model_path, engine="openvino", providers=[CUDA_PROVIDER, CPU_PROVIDER])


def test_parity_images_are_fixed_and_varied() -> None:
    images = parity_images(32, 48)
    assert images.shape == (8, 32, 48, 3) and images.dtype == np.uint8
    assert np.array_equal(images, parity_images(32, 48))
    assert len({image.tobytes() for image in images}) == len(images)


# --- the openvino engine ------------------------------------------------------------------------


@OPENVINO_RUNS
def test_openvino_runs_in_bf16_with_the_card_answers_within_tolerance(model_path: Path) -> None:
    model = open_model(model_path, engine="openvino", intra_op_threads=1)
    reference = OnnxModel(model_path, providers=[CPU_PROVIDER], intra_op_threads=1)
    assert isinstance(model, OpenVinoModel)
    report = model.engine_report()
    assert report["engine"] == "openvino" and report["precision"] == "bf16"
    assert model.bf16_layers == model.compute_layers > 0  # the execution graph, not the hint
    assert 0 < report["parity_max_abs_diff"] <= PARITY_TOLERANCE  # 0 would mean fp32 ran
    images = np.random.default_rng(1).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    got, want = model.run(images), reference.run(images)
    assert np.abs(got.probabilities - want.probabilities).max() <= PARITY_TOLERANCE
    assert got.embeddings is not None and got.embeddings.shape == want.embeddings.shape  # type: ignore[union-attr]
    assert got.in_distribution is not None and got.ood_score is not None
    # Results are copies: the next batch does not overwrite what an earlier one returned.
    first = model.predict(images[:2])
    kept = first.copy()
    model.predict(images[2:4])
    assert np.array_equal(first, kept)


@OPENVINO_RUNS
def test_openvino_answers_batches_from_several_threads(model_path: Path) -> None:
    model = open_model(model_path, engine="openvino", intra_op_threads=1)
    batches = [
        np.random.default_rng(seed).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
        for seed in range(6)
    ]
    serial = [model.predict(batch) for batch in batches]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        threaded = list(pool.map(model.predict, batches))
    for one, other in zip(serial, threaded, strict=True):
        np.testing.assert_array_equal(one, other)


@OPENVINO_RUNS
def test_auto_picks_openvino_on_this_bf16_host(model_path: Path) -> None:
    model = open_model(model_path, engine="auto", intra_op_threads=1)
    assert model.engine == "openvino"
    assert model.engine_report()["chosen"].startswith("auto: CPU with ")


@OPENVINO_RUNS
def test_parity_refusal_fails_when_asked_for_and_falls_back_under_auto(
    fragile_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(EngineUnavailable, match="differ from onnxruntime fp32 by"):
        open_model(fragile_path, engine="openvino", intra_op_threads=1)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model = open_model(fragile_path, engine="auto", intra_op_threads=1)
    assert type(model) is OnnxModel
    refusals = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(refusals) == 1, refusals
    assert refusals[0].startswith("engine auto: onnxruntime fp32, openvino refused: openvino bf16")
    assert "\n" not in refusals[0]


@OPENVINO_RUNS
def test_a_hint_that_did_not_apply_is_refused(
    model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(OpenVinoModel, "_bf16_layers", lambda self: (0, 2))
    with pytest.raises(EngineUnavailable, match="ran none of the 2 convolution/matmul layers"):
        open_model(model_path, engine="openvino", intra_op_threads=1)


@OPENVINO_RUNS
def test_inspect_and_the_scorer_manifest_say_what_runs(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from galmorph.scoring.run import ScoreConfig, score
    from galmorph.scoring.shards import ShardError
    from tests.support.cutout_factory import make_png

    assert galmorph_main(["model", "inspect", str(model_path), "--engine", "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)["engine"]
    assert inspected["engine"] == "openvino" and inspected["precision"] == "bf16"

    make_png(tmp_path, size=(64, 64), seed=0, name="a.png")
    (tmp_path / "catalog.csv").write_text("id_str,file_loc\na,a.png\n")

    def config(engine: str) -> ScoreConfig:
        return ScoreConfig(
            catalog=tmp_path / "catalog.csv",
            model=model_path,
            out_dir=tmp_path / "out",
            workers=0,
            progress=False,
            model_engine=engine,
        )

    score(config("openvino"))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["settings"]["engine"] == {"engine": "openvino", "precision": "bf16"}
    # fp32 parts are not mixed into a bf16 run's folder.
    with pytest.raises(ShardError, match="different run"):
        score(config("onnxruntime"))


@OPENVINO_RUNS
def test_the_server_reports_its_engine(model_path: Path, tmp_path: Path) -> None:
    import httpx

    from tests.support.server_process import serve

    with serve(model_path, tmp_path, "--engine", "openvino") as server:
        info = httpx.get(f"{server.url}/model", timeout=10).json()
        answer = httpx.post(
            f"{server.url}/classify",
            files={"file": ("a.png", _png(parity_images(64, 64)[0]), "image/png")},
            timeout=30,
        )
    assert info["engine"]["engine"] == "openvino" and info["engine"]["precision"] == "bf16"
    assert answer.status_code == 200, answer.text


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@OPENVINO_RUNS
def test_files_exported_in_another_precision_stay_on_onnxruntime(tmp_path: Path) -> None:
    int8 = FactoryModel(metadata_overrides={"galmorph.precision": '"int8"'})
    path = write_model(tmp_path / "int8.onnx", int8)
    with pytest.raises(EngineUnavailable, match=r"runs fp32 files in bf16; .* is int8"):
        open_model(path, engine="openvino", intra_op_threads=1)
    assert open_model(path, engine="auto", intra_op_threads=1).engine == "onnxruntime"


# --- the card's sample images -------------------------------------------------------------------

SAMPLES = np.random.default_rng(7).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)


def _with_samples(tmp_path: Path, value: str, name: str = "samples.onnx") -> Path:
    return write_model(
        tmp_path / name,
        FactoryModel(ood_threshold=0.5, metadata_overrides={SAMPLE_IMAGES_KEY: value}),
    )


def _png_entry(image: np.ndarray) -> str:
    return str(json.loads(encode_sample_images(image[None]))[0])


def _grey_png(size: int) -> str:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (size, size)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


MALFORMED = {
    "wrong size": encode_sample_images(np.zeros((8, 32, 64, 3), np.uint8)),
    "garbage": "{not json",
    "1000 entries": json.dumps([_png_entry(SAMPLES[0])] * 1000),
    "not a png": json.dumps(["aGVsbG8gd29ybGQ="] * 8),
    "grey": json.dumps([_png_entry(SAMPLES[0])] * 7 + [_grey_png(64)]),
    "truncated": json.dumps(
        [base64.b64encode(base64.b64decode(_png_entry(SAMPLES[0]))[:99]).decode()]
    ),
}


@pytest.mark.parametrize("damage", sorted(MALFORMED))
def test_a_file_with_bad_samples_loads_with_one_warning_and_no_samples(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = _with_samples(tmp_path, MALFORMED[damage])
    with caplog.at_level(logging.WARNING):
        model = open_model(path, engine="onnxruntime", intra_op_threads=1)
    assert model.sample_images is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"metadata {SAMPLE_IMAGES_KEY} ignored: " in warnings[0]
    assert str(path) in warnings[0] and "\n" not in warnings[0]
    assert model.predict(SAMPLES[:2]).shape == (2, 10)


def test_samples_are_checked_against_the_limits_before_decoding(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _with_samples(tmp_path, encode_sample_images(SAMPLES))
    loaded = OnnxModel(path, providers=[CPU_PROVIDER], intra_op_threads=1).sample_images
    assert loaded is not None and np.array_equal(loaded, SAMPLES)  # PNG is lossless
    too_many = np.concatenate([SAMPLES] * 3)[: MAX_SAMPLE_IMAGES + 1]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        path = _with_samples(tmp_path, encode_sample_images(too_many), "many.onnx")
        assert OnnxModel(path, providers=[CPU_PROVIDER], intra_op_threads=1).sample_images is None
    assert f"{MAX_SAMPLE_IMAGES + 1} images, more than {MAX_SAMPLE_IMAGES}" in caplog.text


@OPENVINO_RUNS
def test_openvino_checks_parity_on_the_card_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _with_samples(tmp_path, encode_sample_images(SAMPLES))
    checked: list[np.ndarray] = []
    measure = OpenVinoModel._max_abs_diff

    def spy(self: OpenVinoModel, images: np.ndarray) -> float:
        checked.append(images)
        return measure(self, images)

    monkeypatch.setattr(OpenVinoModel, "_max_abs_diff", spy)
    model = open_model(path, engine="openvino", intra_op_threads=1)
    assert model.engine_report()["parity_images"] == "8 card samples"
    assert len(checked) == 1 and np.array_equal(checked[0], SAMPLES)


@OPENVINO_RUNS
@pytest.mark.parametrize(
    ("value", "words"),
    [(None, "the file has no samples"), (MALFORMED["wrong size"], "its samples are malformed")],
)
def test_openvino_falls_back_to_synthetic_images(
    tmp_path: Path, model_path: Path, value: str | None, words: str
) -> None:
    path = model_path if value is None else _with_samples(tmp_path, value)
    model = open_model(path, engine="openvino", intra_op_threads=1)
    assert model.engine_report()["parity_images"] == f"8 synthetic: {words}"


@OPENVINO_RUNS
def test_the_refusal_says_which_images_it_was_measured_on(
    fragile_path: Path, tmp_path: Path
) -> None:
    fragile = onnx.load(str(fragile_path))
    entry = fragile.metadata_props.add()
    entry.key, entry.value = SAMPLE_IMAGES_KEY, encode_sample_images(SAMPLES)
    path = tmp_path / "fragile_samples.onnx"
    onnx.save(fragile, str(path))
    with pytest.raises(EngineUnavailable, match=r"\(> 0.01\) on 8 card samples$"):
        open_model(path, engine="openvino", intra_op_threads=1)
    with pytest.raises(EngineUnavailable, match=r"on 8 synthetic: the file has no samples$"):
        open_model(fragile_path, engine="openvino", intra_op_threads=1)


# --- the parity cache ---------------------------------------------------------------------------


@OPENVINO_RUNS
def test_the_parity_result_is_cached_per_file_openvino_and_cpu(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PARITY_CACHE_ENV, str(tmp_path / "cache"))
    first = open_model(model_path, engine="openvino", intra_op_threads=1)
    assert first.engine_report()["parity_cached"] is False
    (entry,) = (tmp_path / "cache").iterdir()

    def no_run(self: OpenVinoModel, images: np.ndarray) -> float:
        raise AssertionError("parity ran although its result is cached")

    monkeypatch.setattr(OpenVinoModel, "_max_abs_diff", no_run)
    again = open_model(model_path, engine="openvino", intra_op_threads=1)
    assert again.engine_report()["parity_cached"] is True
    assert again.parity_max_abs_diff == first.parity_max_abs_diff
    assert again.parity_source == first.parity_source
    # Another CPU is another key: the check runs (and here, refuses to be skipped).
    monkeypatch.setattr(openvino_engine, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    with pytest.raises(AssertionError, match="parity ran"):
        open_model(model_path, engine="openvino", intra_op_threads=1)
    monkeypatch.undo()
    monkeypatch.setenv(PARITY_CACHE_ENV, str(tmp_path / "cache"))
    # The tolerance applies to a cached difference too; a damaged entry is measured again.
    record = json.loads(entry.read_text())
    entry.write_text(json.dumps({**record, "max_abs_diff": 0.5}))
    with pytest.raises(EngineUnavailable, match=r"by 0.5000 .* \(cached in "):
        open_model(model_path, engine="openvino", intra_op_threads=1)
    entry.write_text("{damaged")
    model = open_model(model_path, engine="openvino", intra_op_threads=1)
    assert model.engine_report()["parity_cached"] is False
    assert json.loads(entry.read_text())["max_abs_diff"] == record["max_abs_diff"]


@OPENVINO_RUNS
def test_an_unwritable_cache_only_means_the_check_runs_each_time(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(PARITY_CACHE_ENV, str(blocker / "cache"))  # under a file: cannot exist
    for _ in range(2):
        model = open_model(model_path, engine="openvino", intra_op_threads=1)
        assert model.engine_report()["parity_cached"] is False
