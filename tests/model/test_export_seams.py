"""The seams between training, export and serving (issue 23), each as a user meets it.

- A run of the small-data recipe trains on every row (no validation split): export fits the
  temperature and the OOD threshold on every row of a separate labelled file (`--data`), the OOD
  class statistics on the run's training rows, and without one says in one line what to pass.
- A run trained with `--class-names` on a file naming none exports, evaluates and resumes
  (the names travel in the run's config.json and model.json).
- `galmorph serve` with a model that cannot load, or with the sky route on and an unwritable
  cutout cache, exits 2 with one line instead of staying up unready or printing a traceback;
  a good model, file or folder, still serves.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from galmorph.cli import main
from galmorph.core.modelfile.artifact import GRAPH_FILE_NAME
from galmorph.core.modelfile.engine import CPU_PROVIDER, OnnxModel
from galmorph.model.checkpoint import load_spec
from galmorph.model.export import load_held_out_fit_images
from tests.support.onnx_factory import write_model
from tests.support.server_process import free_port, serve
from tests.support.training_helpers import (
    FOUR_CLASSES,
    TINY_RECIPE,
    child_env,
    four_class_file,
    make_synthetic,
    run_galmorph,
)

CLASS_NAMES = ("--class-names", ",".join(FOUR_CLASSES))
FAST_EXPORT = ("--threads", "1", "--fit-count", "100")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seams")
    train_g10 = make_synthetic(root / "g10_train.h5", n=80, seed=0)
    test_g10 = make_synthetic(root / "g10_test.h5", n=40, seed=1)
    return {
        "mine": four_class_file(root / "mine.h5", train_g10, None),
        "test": four_class_file(root / "my_test.h5", test_g10, tuple(reversed(FOUR_CLASSES))),
        "test_unnamed": four_class_file(root / "my_test_unnamed.h5", test_g10, None),
        "g10": test_g10,
    }


def train_run(files: dict[str, Path], out: Path, *flags: str) -> Path:
    command = ["train", "--data", str(files["mine"]), "--out", str(out), *TINY_RECIPE, *flags]
    assert main(command) == 0
    return out


@pytest.fixture(scope="module")
def every_row_run(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small-data recipe as it is: split_fractions [1, 0, 0]."""
    run = train_run(files, tmp_path_factory.mktemp("every_row") / "run", *CLASS_NAMES)
    assert json.loads((run / "split.json").read_text())["val"] == []
    return run


def export_refusal(*args: str | Path) -> str:
    """The one-line message an export in this process exits with."""
    with pytest.raises(SystemExit) as refused:
        main(["export", *map(str, args), *FAST_EXPORT])
    message = str(refused.value.code)
    assert message.startswith("galmorph export: ") and "\n" not in message, message
    return message


# ------------------------------------------------------------------ no validation rows
def test_export_of_a_run_without_validation_rows_says_what_to_pass(
    every_row_run: Path, tmp_path: Path
) -> None:
    done = run_galmorph("export", every_row_run, "--out", tmp_path / "m.onnx", timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if "galmorph export:" in line]
    assert len(lines) == 1 and "--data FILE" in lines[0] and "no validation rows" in lines[0]
    assert not (tmp_path / "m.onnx").exists()
    # Either fit alone still needs held-out rows: neither is dropped without a word.
    for flag in ("--no-calibrate", "--no-ood"):
        message = export_refusal(every_row_run, "--out", tmp_path / "m.onnx", flag)
        assert "--data FILE" in message


def test_export_fits_on_every_row_of_a_held_out_file(
    files: dict[str, Path], every_row_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mine.onnx"
    # A file of another size (40 rows, the run has 80), naming the classes in another order.
    args = ["export", str(every_row_run), "--data", str(files["test"]), "--out", str(out)]
    assert main([*args, *FAST_EXPORT]) == 0
    printed = capsys.readouterr().out
    assert "on 40 images of my_test.h5" in printed and "of 40 images of my_test.h5" in printed
    # The held-out file's galaxies also check the graph against PyTorch, not synthetic ones alone.
    assert "(40 real)" in printed
    model = OnnxModel(out, providers=[CPU_PROVIDER], intra_op_threads=1)
    card = model.card
    assert card.class_names == FOUR_CLASSES and model.has_ood
    calibration, ood = card.calibration, card.ood
    assert calibration["split"] == "all" and calibration["data"] == "my_test.h5"
    assert calibration["num_images"] == 40 and calibration["temperature"] > 0
    assert ood["threshold_fit"]["split"] == "all" and ood["threshold_fit"]["num_images"] == 40
    # The class statistics come from the run's 80 training rows, not from the held-out file.
    assert ood["fit"]["split"] == "train" and ood["fit"]["num_images"] == 80
    assert main(["model", "inspect", str(out)]) == 0
    assert "(40 images of my_test.h5)" in capsys.readouterr().out


def test_held_out_labels_are_read_in_the_model_class_order(
    files: dict[str, Path], every_row_run: Path
) -> None:
    spec = load_spec(every_row_run)
    fits = [
        load_held_out_fit_images(
            files[name], train_data=None, split=None, size=32, interpolation=spec.interpolation,
            count=100, class_names=spec.class_names,
        )
        for name in ("test", "test_unnamed")
    ]  # fmt: skip
    # The same galaxies, one file naming the classes in reverse order: the same labels.
    np.testing.assert_array_equal(fits[0].val_labels, fits[1].val_labels)
    assert fits[0].train_images is None and fits[0].held_out_file == "my_test.h5"


def test_held_out_file_of_other_classes_or_without_the_training_rows_is_refused(
    files: dict[str, Path], every_row_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "m.onnx"
    message = export_refusal(every_row_run, "--data", files["g10"], "--out", out)
    assert "differ from those of" in message and "Round Smooth" in message
    # The OOD class statistics need the run's training rows: their file moved away.
    moved = tmp_path / "run"
    shutil.copytree(every_row_run, moved)
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "data": str(tmp_path / "gone.h5")}))
    message = export_refusal(moved, "--data", files["test"], "--out", out)
    assert f"is not at {tmp_path / 'gone.h5'}" in message and "--no-ood" in message
    assert not out.exists()


# ------------------------------------------------------------------ --class-names runs
def test_a_run_trained_with_class_names_exports_evaluates_and_resumes(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = train_run(files, tmp_path / "run", *CLASS_NAMES, "--val-fraction", "0.25")
    out = tmp_path / "model.onnx"
    # No --data: the training file from config.json, read with the run's names.
    assert main(["export", str(run), "--out", str(out), *FAST_EXPORT]) == 0
    card = OnnxModel(out, providers=[CPU_PROVIDER], intra_op_threads=1).card
    assert card.class_names == FOUR_CLASSES and card.calibration["split"] == "val"
    assert card.ood["threshold_fit"]["num_images"] == 20
    capsys.readouterr()
    args = ["evaluate", str(run), "--data", str(files["mine"]), "--split", "val"]
    assert main([*args, "--no-progress", "--out", str(tmp_path / "eval")]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 20
    # A resume that does not repeat --class-names reads the file as the run did.
    train_run(files, run, "--val-fraction", "0.25", "--set", "epochs=2", "--resume")


# ------------------------------------------------------------------ serve refuses to start
def serve_until_exit(model: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`galmorph serve` as a real process; a server that stays up fails the test."""
    environment = {k: v for k, v in child_env().items() if not k.startswith("GALMORPH_")}
    command = [sys.executable, "-m", "galmorph", "serve", "--model", str(model)]
    command += ["--port", str(free_port()), "--threads", "1", "--providers", CPU_PROVIDER]
    try:
        return subprocess.run(
            command,
            cwd=cwd,
            env={**environment, **env},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"serve stayed up with {model.name}:\n{exc.stderr!r}")


def foreign_model(path: Path) -> Path:
    """An ONNX file of someone else's: float NCHW input, no galmorph card."""
    shape = [1, 3, 224, 224]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "foreign",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "foreign", "missing"])
def test_serve_exits_with_one_line_when_the_model_cannot_load(kind: str, tmp_path: Path) -> None:
    path = tmp_path / f"{kind}.onnx"
    if kind == "corrupt":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    elif kind == "truncated":
        whole = write_model(tmp_path / "good.onnx").read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "foreign":
        foreign_model(path)
    done = serve_until_exit(path, tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("galmorph serve: "), done.stderr
    assert str(path) in lines[0] or path.name in lines[0]
    cause = {
        "corrupt": "cannot load",
        "truncated": "cannot load",
        "foreign": "not a galmorph model",
        "missing": "not found",
    }
    assert cause[kind] in lines[0]


def test_serve_with_the_sky_route_and_an_unwritable_cache_exits_with_one_line(
    tmp_path: Path,
) -> None:
    model = write_model(tmp_path / "model.onnx")
    # A cache below a regular file: unwritable even for root, who ignores permission bits.
    (tmp_path / "a_file").write_text("")
    cache = tmp_path / "a_file" / "cache"
    done = serve_until_exit(
        model, tmp_path, GALMORPH_SKY_ENABLED="true", GALMORPH_CUTOUT_CACHE=str(cache)
    )
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"cutout cache {cache} is not writable" in lines[0]
    assert "GALMORPH_CUTOUT_CACHE" in lines[0]


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_serve_still_starts_a_good_model_after_the_check(layout: str, tmp_path: Path) -> None:
    """The check opens the model once; the server opens it again and becomes ready. A model
    folder (the layout of models over 2 GiB) is served like a file, not refused as missing."""
    model = tmp_path / "model.onnx"
    if layout == "folder":
        model.mkdir()
        write_model(model / GRAPH_FILE_NAME)
    else:
        write_model(model)
    with serve(model, tmp_path) as server:
        assert server.process.poll() is None
    assert "providers requested" in server.log()
    # The check's own CPU load is not logged as if the server ran on it.
    assert server.log().count("providers requested") == 1
