"""Seams between the decoder, the Python API and the server (issue 23): messages name their
input and never an object's repr, the FITS header card cap is named when it is hit, a JPEG
path and its decoded pixels get one answer, `Classifier.predict` can turn a refused cutout
into an error row, and the README, `GET /model` and the Open Inference Protocol agree on the
model's name."""

from __future__ import annotations

import base64
import io
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from astropy.io import fits
from fastapi.testclient import TestClient
from PIL import Image

from galmorph import Classifier, Prediction, Predictions
from galmorph.core.cutouts.decode import decode_cutout
from galmorph.core.cutouts.fits_io import MAX_HEADER_CARDS
from galmorph.core.cutouts.limits import CutoutError, CutoutErrorKind, DecodeLimits
from galmorph.core.data.tables import class_columns
from galmorph.core.modelfile.contract import ModelOutputs
from galmorph.scoring.decode_worker import DecodeSettings, decode_sources
from galmorph.scoring.rows import ResultBuilder
from galmorph.scoring.shards import ROW_INDEX
from tests.support.app_client import running, settings_for
from tests.support.cutout_factory import fits_header_only, make_grz_fits, make_png
from tests.support.onnx_factory import FactoryModel, write_model
from tests.support.training_helpers import REPO_ROOT

OBJECT_REPR = re.compile(r"object at 0x[0-9a-f]+|<[\w.]+ object")
CORRUPT_JPEG = b"\xff\xd8\xff" + bytes(100)  # JPEG magic, then nothing Pillow can read
CORRUPT_PNG = b"\x89PNG\r\n\x1a\n" + bytes(100)


def unparsable_card_fits() -> bytes:
    """A grz FITS file whose NAXIS1 card holds a value astropy cannot parse."""
    data = bytearray(make_grz_fits(size=32))
    at = data.index(b"NAXIS1  =")
    data[at + 10 : at + 30] = b"'unclosed 32        "
    return bytes(data)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("seams")
    return write_model(folder / "model.onnx", FactoryModel(ood_threshold=0.4))


@pytest.fixture(scope="module")
def clf(model_path: Path) -> Classifier:
    return Classifier(model_path, providers=["CPUExecutionProvider"], threads=1)


@pytest.fixture(scope="module")
def http(model_path: Path) -> Iterator[TestClient]:
    with running(settings_for(model_path)) as client:
        yield client


def refusal(call: Any) -> str:
    with pytest.raises(CutoutError) as caught:
        call()
    return caught.value.message


# --- 1. messages name the input, never an object's repr -----------------------------------


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("galaxy.jpg", CORRUPT_JPEG),
        ("galaxy.png", CORRUPT_PNG),
        ("cube.fits", unparsable_card_fits()),
    ],
)
def test_refusals_of_every_input_kind_name_it_without_a_repr(
    clf: Classifier, http: TestClient, tmp_path: Path, name: str, data: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    good = make_png(size=(64, 64))
    messages = {
        "decoder": refusal(lambda: decode_cutout(data, spec=clf.card.input_spec)),
        "path": refusal(lambda: clf.predict(path)),
        "bytes": refusal(lambda: clf.predict(data)),
        "list": refusal(lambda: clf.predict([good, good, str(path)])),
        "embed": refusal(lambda: clf.embed([good, data])),
        "prepare": refusal(lambda: clf.prepare(data)),
    }
    rows = clf.predict([good, data, path], errors="row")
    assert isinstance(rows, Predictions)
    messages["row"] = str(rows[1].error) + str(rows[2].error)
    answer = http.post("/classify", files={"file": (name, data)})
    assert answer.status_code == 422, answer.text
    messages["server"] = answer.json()["detail"]
    batch = http.post("/classify/batch", files=[("files", (name, data))]).json()
    messages["batch"] = json.dumps(batch)
    infer = {"inputs": [{"name": "files", "shape": [1], "datatype": "BYTES", "data": []}]}
    infer["inputs"][0]["data"] = [base64.b64encode(data).decode()]
    answer = http.post(f"/v2/models/{clf.card.model_name}/infer", json=infer)
    messages["inference protocol"] = answer.text
    for where, message in messages.items():
        assert not OBJECT_REPR.search(message), (where, message)
    assert "corrupt" in messages["decoder"], messages["decoder"]
    assert messages["path"].startswith(f"{name}: "), messages["path"]  # the file, named once
    assert messages["list"].startswith(f"input 2 ({name}): "), messages["list"]
    assert messages["embed"].startswith("input 1: "), messages["embed"]
    assert messages["bytes"] == messages["decoder"] == messages["prepare"]


def test_in_memory_inputs_are_named_by_position(clf: Classifier) -> None:
    hdu = fits.PrimaryHDU(np.full((16, 16), np.nan, np.float32))  # no finite pixel
    inputs: list[Any] = [
        fits.HDUList([hdu]),
        hdu,
        np.zeros((4, 4, 5), np.uint8),  # not RGB
        np.zeros(16, np.float32),  # floats that are no image
    ]
    good = np.zeros((64, 64, 3), np.uint8)
    for index, item in enumerate(inputs):
        listed = [*[good] * index, item]
        message = refusal(lambda listed=listed: clf.predict(listed))
        assert message.startswith(f"input {index}: "), message
        assert not OBJECT_REPR.search(message), message
        single = refusal(lambda item=item: clf.predict(item))
        assert not OBJECT_REPR.search(single) and not single.startswith("input"), single


# --- 2. the FITS header card cap ------------------------------------------------------------


def test_a_header_over_the_card_cap_is_too_large_naming_the_cap() -> None:
    header = fits_header_only(())
    body = header[: header.index(b"END" + b" " * 77)]
    data = body + (b"COMMENT " + b"x" * 72) * (MAX_HEADER_CARDS + 100) + b"END".ljust(80)
    data += b" " * (-len(data) % 2880)
    with pytest.raises(CutoutError) as caught:
        decode_cutout(data, spec=FactoryModel().card().input_spec)
    assert caught.value.kind is CutoutErrorKind.TOO_LARGE  # 413, not a corrupt file's 422
    message = caught.value.message
    assert f"more than {MAX_HEADER_CARDS} cards" in message, message
    assert str(DecodeLimits().max_fits_header_cards) in message and "END" not in message
    # A header of exactly the cap still reads.
    fits_ok = fits.Header([("COMMENT", "x")] * (MAX_HEADER_CARDS - 10))
    buffer = io.BytesIO()
    fits.PrimaryHDU(np.ones((3, 32, 32), np.float32), fits_ok).writeto(buffer)
    decode_cutout(buffer.getvalue(), spec=FactoryModel().card().input_spec)


def test_readme_states_the_card_caps() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    cards = f"{DecodeLimits().max_fits_header_cards:,} header cards"
    assert cards in readme and f"{MAX_HEADER_CARDS:,} in one header" in readme


# --- 3. JPEG: the path and its pixels get one answer ----------------------------------------


def jpeg_of(image: np.ndarray, side: int) -> bytes:
    buffer = io.BytesIO()
    picture = Image.fromarray(image).resize((side, side), Image.Resampling.LANCZOS)
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_a_jpeg_path_and_its_decoded_pixels_get_the_same_answer(
    clf: Classifier, real_data: Path
) -> None:
    paths = sorted((real_data / "galaxy10-real").glob("*.jpg"))
    pixels = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    # The real 256 px JPEGs, and one brought to 4096 px: decoded in full, as the arrays were.
    large = jpeg_of(pixels[0], 4096)
    inputs: list[Any] = [*paths, large]
    arrays = [*pixels, np.asarray(Image.open(io.BytesIO(large)).convert("RGB"))]
    np.testing.assert_array_equal(clf.prepare(inputs), clf.prepare(arrays))
    by_path, by_pixels = clf.predict(inputs), clf.predict(arrays)
    for one, other in zip(by_path, by_pixels, strict=True):
        assert one.probabilities == other.probabilities, one.source
        assert one.preprocessing is not None
        assert not any("JPEG decoded at" in w for w in one.preprocessing.warnings), one.source


def test_no_reduced_decode_was_measured_within_the_tolerance() -> None:
    """Why the decoder never drafts: benchmarks/bench_jpeg_draft.py found no draft factor, at
    any size, that keeps a trained model's answer within 1e-3 of the full decode's."""
    results = json.loads((REPO_ROOT / "benchmarks/results/jpeg_draft.json").read_text())
    assert results["tolerance"] == 1e-3 and not results["any_draft_within_tolerance"]
    rows = [row for model in results["models"] for row in model["rows"]]
    assert len(rows) >= 20 and min(row["max_dp"] for row in rows) > results["tolerance"]


# --- 4. Classifier.predict: error rows, progress, reprs --------------------------------------


def test_errors_row_turns_a_refused_cutout_into_the_scorers_error_row(
    clf: Classifier, tmp_path: Path
) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(make_png(size=(64, 64)))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(CORRUPT_JPEG)
    rgb = np.zeros((64, 64, 3), np.uint8)
    inputs: list[Any] = [good, bad, tmp_path / "missing.fits", rgb, b"not an image"]
    with pytest.raises(CutoutError, match=r"^input 1 \(bad.jpg\): corrupt JPEG"):
        clf.predict(inputs)  # "raise" stays the default
    with pytest.raises(ValueError, match="errors must be one of raise, row"):
        clf.predict(inputs, errors="skip")  # type: ignore[arg-type]
    rows = clf.predict(inputs, errors="row", embeddings=True)
    assert isinstance(rows, Predictions) and len(rows) == 5
    assert [p.error is None for p in rows] == [True, False, False, True, False]
    assert rows[0].probabilities == clf.predict([good])[0].probabilities  # type: ignore[index]
    failed = rows[1]
    assert failed.label is None and failed.probability is None and failed.probabilities == {}
    assert failed.preprocessing is None and failed.embeddings is None and failed.source == "bad.jpg"
    assert rows[2].error is not None and rows[2].error.startswith("invalid: cannot read")
    assert rows[4].error is not None and rows[4].error.startswith("unsupported: ")
    # The scorer's error text for the same file, and the scorer's columns, nulls included.
    _, scorer_errors = decode_sources(DecodeSettings(clf.card, None, "path"), [str(bad)])
    assert failed.error == scorer_errors[0]
    table = rows.to_arrow()
    width = clf.model.embedding_size
    assert width is not None
    builder = ResultBuilder(clf.card, "sha", (), ood=True, embedding_size=width)
    block = pa.table({ROW_INDEX: pa.array([0, 1], pa.int64()), "id_str": ["a", "b"]})
    outputs = ModelOutputs(
        np.full((2, 10), 0.1, np.float32),
        np.zeros((2, width), np.float32),
        np.zeros(2, np.float32),
        np.ones(2, bool),
    )
    scorer = builder.build(block, outputs, [None, scorer_errors[0]])
    shared = [c for c in scorer.column_names if c not in (ROW_INDEX, "id_str", "model_sha256")]
    assert table.column_names == ["source", *shared]
    for column in shared:
        assert table.schema.field(column).type == scorer.schema.field(column).type, column
        assert table.column(column)[1].is_valid == scorer.column(column)[1].is_valid, column
    assert table.column("error").to_pylist()[:2] == [None, scorer_errors[0]]
    sources = ["good.png", "bad.jpg", "missing.fits", "array", "bytes"]
    assert table.column("source").to_pylist() == sources
    frame = rows.to_pandas()
    assert frame[class_columns(clf.class_names)].isna().sum(axis=1).tolist() == [0, 10, 10, 0, 10]
    # One input alone: its error row.
    alone = clf.predict(bad, errors="row")
    assert isinstance(alone, Prediction) and alone.error == failed.error


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_for_long_lists_on_a_terminal(
    clf: Classifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    clf.predict([image] * 3)
    assert terminal.getvalue() == ""  # a short list: no bar
    clf.predict([image] * 120)
    assert "0/120" in terminal.getvalue() and "cutout" in terminal.getvalue()
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)
    clf.predict([image] * 120)
    assert piped.getvalue() == ""  # not a terminal: no bar unless asked
    clf.predict([image] * 3, progress=True)
    assert "0/3" in piped.getvalue()


def test_reprs_say_what_they_hold(clf: Classifier) -> None:
    card = clf.card
    text = repr(clf)
    for part in (
        card.model_name,
        f"classes={card.num_classes}",
        f"input={card.input_size[0]}x{card.input_size[1]}",
        f'pixel_scale={card.pixel_scale:g}"/px',
        "CPUExecutionProvider",
    ):
        assert part in text, text
    rows = clf.predict([np.zeros((64, 64, 3), np.uint8), CORRUPT_PNG], errors="row")
    assert isinstance(rows, Predictions)
    one = repr(rows[0])
    assert one.startswith("Prediction('array', label=") and "ood_score=" in one, one
    assert "PreprocessInfo" not in one and "{" not in one, one
    assert repr(rows[1]).startswith("Prediction('bytes', error='invalid: corrupt PNG")
    assert repr(rows).startswith(f"Predictions(2 cutouts, 1 refused, {card.num_classes} classes")


# --- 5. the model's name: README, GET /model and the Open Inference Protocol ----------------


def test_readme_model_and_inference_protocol_agree_on_the_name(http: TestClient) -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("### KServe / Triton clients") :]
    claim = re.search(r"The name is `GET /model`'s\s+`(\w+)`", section)
    assert claim, "the KServe section must say which GET /model field is the name"
    info = http.get("/model").json()
    name = info[claim.group(1)]
    metadata = http.get(f"/v2/models/{name}")
    assert metadata.status_code == 200, metadata.text
    assert metadata.json()["name"] == name
    assert info["version"] in metadata.json()["versions"]
    assert http.get(f"/v2/models/{name}/versions/{info['version']}/ready").json()["ready"]
