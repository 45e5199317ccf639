"""The Python API (`from galmorph import Classifier`): arrays, flux cubes, FITS paths, HDUs and
lists of them get the answer the server gives the same input."""

from __future__ import annotations

import io
import subprocess
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
from galmorph.api.classifier import MissingOutputError
from galmorph.core.cutouts.decode import CutoutError
from tests.support.app_client import running, settings_for
from tests.support.cutout_factory import galaxy_planes, make_grz_fits, tan_wcs_header
from tests.support.onnx_factory import FactoryModel, write_model
from tests.support.training_helpers import REPO_ROOT

OOD_THRESHOLD = 0.4


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("api")
    return write_model(folder / "model.onnx", FactoryModel(ood_threshold=OOD_THRESHOLD))


@pytest.fixture(scope="module")
def clf(model_path: Path) -> Classifier:
    return Classifier(model_path, providers=["CPUExecutionProvider"], threads=1)


@pytest.fixture(scope="module")
def http(model_path: Path) -> Iterator[TestClient]:
    with running(settings_for(model_path)) as client:
        yield client


def classify(http: TestClient, data: bytes, name: str) -> dict[str, Any]:
    answer = http.post("/classify?embeddings=true", files={"file": (name, data)})
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def assert_same(prediction: Prediction, answer: dict[str, Any]) -> None:
    """The API's answer is the server's: probabilities, OOD, embeddings, what was done."""
    assert prediction.probabilities == pytest.approx(answer["probabilities"], rel=1e-6)
    assert prediction.label == answer["top_class"]
    assert prediction.ood_score == pytest.approx(answer["ood_score"], rel=1e-6)
    assert prediction.in_distribution is answer["in_distribution"]
    assert prediction.embeddings is not None
    np.testing.assert_allclose(prediction.embeddings, answer["embeddings"], rtol=1e-6)
    info = prediction.preprocessing.to_dict()
    for key in ("bands_used", "original_shape", "stretch", "resized_from", "crop_pad_from"):
        assert info[key] == answer["preprocessing"][key], key


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_import_galmorph_stays_light() -> None:
    code = (
        "import sys, galmorph, galmorph.cli\n"
        "assert 'onnxruntime' not in sys.modules and 'torch' not in sys.modules\n"
        "from galmorph import Classifier\n"
        "assert 'onnxruntime' in sys.modules and 'torch' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=False
    )
    assert result.returncode == 0, result.stderr


def test_fits_path_bytes_hdu_and_hdulist_equal_the_http_answer(
    clf: Classifier, http: TestClient, real_data: Path
) -> None:
    path = real_data / "hst-fits" / "abell_2744_spiral_galaxy_f105w.fits.gz"
    answer = classify(http, path.read_bytes(), path.name)
    by_path = clf.predict(path, embeddings=True)
    assert isinstance(by_path, Prediction) and by_path.source == path.name
    assert_same(by_path, answer)
    assert by_path.preprocessing.warnings == answer["preprocessing"]["warnings"]
    by_bytes = clf.predict(path.read_bytes(), embeddings=True)
    assert isinstance(by_bytes, Prediction)
    assert_same(by_bytes, answer)
    with fits.open(path) as hdus:
        for item in (hdus, hdus[0]):
            prediction = clf.predict(item, embeddings=True)
            assert isinstance(prediction, Prediction)
            assert_same(prediction, answer)


def test_an_image_extension_hdu_is_classified(clf: Classifier, http: TestClient) -> None:
    planes = galaxy_planes(64)
    cube = np.stack([planes[b] for b in "grz"])
    header = tan_wcs_header((64, 64), 0.262)
    header["BANDS"] = "grz"
    extension = fits.ImageHDU(cube, header)
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), extension]).writeto(buffer)
    prediction = clf.predict(extension, embeddings=True)
    assert isinstance(prediction, Prediction)
    assert_same(prediction, classify(http, buffer.getvalue(), "ext.fits"))


def test_a_flux_cube_with_its_bands_equals_the_fits_file_of_it(
    clf: Classifier, http: TestClient
) -> None:
    data = make_grz_fits(size=100, pixel_scale=0.262)
    with fits.open(io.BytesIO(data)) as hdus:
        cube = np.array(hdus[0].data)
    answer = classify(http, data, "cube.fits")
    prediction = clf.predict(cube, bands="grz", pixel_scale=0.262, embeddings=True)
    assert isinstance(prediction, Prediction)
    assert_same(prediction, answer)
    assert prediction.preprocessing.bands_used == ["g", "r", "z"]
    # Bands are found by name: the same planes in another order give the same answer.
    reordered = clf.predict(cube[::-1].copy(), bands=["z", "r", "g"], pixel_scale=0.262)
    assert isinstance(reordered, Prediction)
    assert reordered.probabilities == pytest.approx(prediction.probabilities, rel=1e-6)
    no_scale = clf.predict(cube, bands="grz")
    assert isinstance(no_scale, Prediction)
    assert any("no celestial WCS" in w for w in no_scale.preprocessing.warnings)
    with pytest.raises(ValueError, match="a flux cube of 3 planes needs its bands"):
        clf.predict(cube)


@pytest.mark.parametrize("size", [64, 100])
def test_uint8_arrays_equal_a_png_of_them(clf: Classifier, http: TestClient, size: int) -> None:
    image = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
    prediction = clf.predict(image, embeddings=True)
    assert isinstance(prediction, Prediction) and prediction.source == "array"
    assert_same(prediction, classify(http, png_bytes(image), "image.png"))
    # What the model saw: the image itself at the input size, else the image resized.
    (seen,) = clf.prepare(image)
    assert seen.shape == (64, 64, 3) and np.array_equal(seen, image) == (size == 64)


def test_many_inputs_give_predictions_and_a_table(
    clf: Classifier, http: TestClient, real_data: Path
) -> None:
    files = sorted((real_data / "galaxy10-real").glob("class*.png"))[:3]
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    inputs: list[Any] = [*files, rgb]
    predictions = clf.predict(inputs, embeddings=True)
    assert isinstance(predictions, Predictions) and len(predictions) == 4
    for path, prediction in zip(files, predictions, strict=False):
        assert_same(prediction, classify(http, path.read_bytes(), path.name))
    table = predictions.to_arrow()
    assert table.column_names[:4] == ["source", "pred_label", "pred_index", "pred_prob"]
    assert table.column("source").to_pylist() == [f.name for f in files] + ["array"]
    assert table.schema.field("embeddings").type == pa.list_(pa.float32(), 8)
    assert table.column("in_distribution").to_pylist() == [p.in_distribution for p in predictions]
    frame = predictions.to_pandas()
    np.testing.assert_array_equal(np.stack(frame["embeddings"]), clf.embed(inputs))
    assert frame["p_barred_spiral"].tolist() == pytest.approx(
        [p.probabilities["Barred Spiral"] for p in predictions]
    )
    # A 4-D array is a batch; embed of one input is one vector.
    batch = np.stack([rgb, rgb])
    assert len(clf.predict(batch)) == 2  # type: ignore[arg-type]
    assert clf.embed(rgb).shape == (8,) and clf.embed(batch).shape == (2, 8)
    assert predictions[3].embeddings == pytest.approx(clf.embed(rgb))


def test_refusals_name_the_input(clf: Classifier, tmp_path: Path) -> None:
    bad = tmp_path / "notes.fits"
    bad.write_text("not a FITS file")
    good = make_grz_fits(tmp_path, size=64)
    with pytest.raises(CutoutError, match=r"^input 1: 'notes.fits' is named like FITS"):
        clf.predict([good, bad])
    with pytest.raises(TypeError, match="cannot classify a dict"):
        clf.predict({"not": "an image"})
    with pytest.raises(CutoutError, match=r"uint8 image must be RGB"):
        clf.predict(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="no cutouts given"):
        clf.predict([])


def test_a_model_without_embeddings_says_so(tmp_path: Path) -> None:
    old = write_model(tmp_path / "old.onnx", FactoryModel(embeddings=False))
    clf = Classifier(old, providers=["CPUExecutionProvider"], threads=1)
    image = np.zeros((64, 64, 3), np.uint8)
    prediction = clf.predict(image)
    assert isinstance(prediction, Prediction)
    assert prediction.ood_score is None and prediction.in_distribution is None
    with pytest.raises(MissingOutputError, match="has no embeddings output"):
        clf.embed(image)
    with pytest.raises(MissingOutputError):
        clf.predict(image, embeddings=True)
    assert "embeddings" not in clf.predict([image]).to_arrow().column_names  # type: ignore[union-attr]
