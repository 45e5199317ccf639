"""Embeddings and the out-of-distribution score: the statistics, the graph that computes them,
and the same numbers from the server, the scorer and the Python API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient

from galmorph import Classifier
from galmorph.core.cutouts.decode import decode_path
from galmorph.core.modelfile import ood
from galmorph.core.modelfile.contract import EMBEDDINGS_NAME, INPUT_NAME, OOD_SCORE_NAME
from galmorph.core.modelfile.engine import OnnxModel
from galmorph.model.export import ImageClassifierGraph
from galmorph.model.registry import create_model
from galmorph.scoring.run import ScoreConfig, score
from tests.support.app_client import running, settings_for
from tests.support.cutout_factory import make_grz_fits
from tests.support.onnx_factory import FactoryModel, write_model
from tests.support.trained_model import TrainedExport

CPU = ["CPUExecutionProvider"]


def clusters(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three Gaussian classes with a shared, correlated covariance; (x, labels, centres)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 4.0, (3, dim))
    mixing = rng.normal(0.0, 1.0, (dim, dim)) / np.sqrt(dim)
    labels = rng.integers(0, 3, n)
    return centres[labels] + rng.normal(0.0, 1.0, (n, dim)) @ mixing, labels, centres


# --- the statistics --------------------------------------------------------------------------


def test_class_gaussians_measure_distance_in_the_classes_own_metric() -> None:
    x, labels, centres = clusters(4000, 16)
    gaussians = ood.fit_class_gaussians(x, labels)
    np.testing.assert_allclose(gaussians.means, centres, atol=0.15)
    held_out, _, _ = clusters(2000, 16, seed=1)  # other draws: new centres, far from these
    inside, _, _ = clusters(2000, 16, seed=0)
    scores_in = ood.mahalanobis_score(inside, gaussians)
    # Per dimension, a squared distance drawn from the model is about 1 (shrinkage aside).
    assert 0.7 < np.median(scores_in) < 1.1
    assert ood.auroc(scores_in, ood.mahalanobis_score(held_out, gaussians)) > 0.99
    # Whitening makes W W^T the inverse of the (shrunk) covariance.
    origin, whitener, whitened = gaussians.mahalanobis_terms()
    np.testing.assert_allclose(whitened, (gaussians.means - origin) @ whitener)
    covariance = np.linalg.inv(whitener @ whitener.T)
    assert np.allclose(covariance, covariance.T) and np.linalg.eigvalsh(covariance).min() > 0


def test_threshold_flags_the_stated_fraction_of_in_distribution_images() -> None:
    scores = np.random.default_rng(0).gamma(2.0, 1.0, 10_000)
    threshold = ood.threshold_at_fpr(scores, 0.05)
    assert (scores > threshold).mean() == pytest.approx(0.05, abs=0.001)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        ood.threshold_at_fpr(scores, 0.0)


def test_auroc_is_the_probability_that_an_outlier_scores_higher() -> None:
    assert ood.auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert ood.auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 0.0
    assert ood.auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5  # ties count half
    assert ood.auroc(np.array([0.0, 2.0]), np.array([1.0])) == 0.5


def test_too_few_images_for_the_classes_are_refused() -> None:
    with pytest.raises(ValueError, match="3 images cannot describe 3 classes"):
        ood.fit_class_gaussians(np.zeros((3, 4)), np.array([0, 1, 2]))


# --- the graph -------------------------------------------------------------------------------


def test_the_graph_computes_the_numpy_score() -> None:
    torch.manual_seed(0)
    model = create_model("gm_astroformer_tiny", num_classes=10, img_size=32).eval()
    plain = ImageClassifierGraph(model, (0.5,) * 3, (0.25,) * 3).eval()
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8))
    with torch.no_grad():
        embeddings = plain(images)[2].numpy()
    gaussians = ood.fit_class_gaussians(embeddings, rng.integers(0, 10, 64))
    graph = ImageClassifierGraph(model, (0.5,) * 3, (0.25,) * 3, gaussians=gaussians).eval()
    with torch.no_grad():
        outputs = graph(images[:8])
    assert len(outputs) == 4
    want = ood.mahalanobis_score(embeddings[:8], gaussians)
    np.testing.assert_allclose(outputs[3].numpy(), want, rtol=1e-4)


@pytest.mark.slow
def test_exported_score_is_the_training_split_statistics(trained_export: TrainedExport) -> None:
    model = OnnxModel(trained_export.model, providers=CPU, intra_op_threads=1)
    fit = trained_export.fit
    card = model.card
    assert model.has_ood and model.has_embeddings and card.ood["method"] == "mahalanobis"
    assert card.ood["fit"] == {"split": "train", "num_images": len(fit.train_labels), "classes": 10}
    train = model.run(fit.train_images).embeddings
    assert train is not None
    gaussians = ood.fit_class_gaussians(train, fit.train_labels)
    outputs = model.run(fit.val_images)
    assert outputs.embeddings is not None and outputs.ood_score is not None
    assert outputs.in_distribution is not None
    np.testing.assert_allclose(
        outputs.ood_score, ood.mahalanobis_score(outputs.embeddings, gaussians), rtol=1e-3
    )
    # The threshold flags 5% of the validation images it was chosen on (to one image).
    flagged = (~outputs.in_distribution).mean()
    assert abs(flagged - card.ood["in_distribution_fpr"]) <= 1.5 / len(fit.val_labels)
    assert card.ood_threshold == card.ood["threshold"]


@pytest.mark.slow
def test_a_star_and_blank_sky_are_out_of_distribution(
    trained_export: TrainedExport, real_data: Path
) -> None:
    """The issue's case: a single star was called an edge-on galaxy at 0.40."""
    clf = Classifier(trained_export.model, providers=CPU, threads=1)
    star = clf.predict(real_data / "hst-fits" / "f105w_psf.fits.gz")
    blank = clf.predict(np.zeros((3, 64, 64), np.float32), bands="grz", pixel_scale=1.048)
    outputs = clf.model.run(trained_export.fit.val_images)
    assert outputs.ood_score is not None
    typical = float(np.median(outputs.ood_score))
    for prediction in (star, blank):
        assert not isinstance(prediction, list)
        assert prediction.in_distribution is False
        assert prediction.ood_score is not None and prediction.ood_score > 2 * typical


# --- the same numbers everywhere -------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(
        tmp_path_factory.mktemp("emb") / "model.onnx", FactoryModel(ood_threshold=0.4)
    )


@pytest.fixture(scope="module")
def http(model_path: Path) -> Iterator[TestClient]:
    with running(settings_for(model_path)) as client:
        yield client


def test_embeddings_are_identical_from_server_scorer_and_python(
    model_path: Path, http: TestClient, tmp_path: Path, real_data: Path
) -> None:
    folder = tmp_path / "cutouts"
    folder.mkdir()
    make_grz_fits(folder, size=90, name="a.fits")
    make_grz_fits(folder, size=64, seed=3, bands="griz", name="b.fits.gz", gz=True)
    (folder / "c.png").write_bytes(
        (real_data / "galaxy10-real" / "class0_Disturbed.png").read_bytes()
    )
    files = sorted(folder.iterdir())
    summary = score(
        ScoreConfig(catalog=str(folder), model=model_path, out_dir=tmp_path / "scores",
                    workers=0, ort_threads=1, providers=tuple(CPU), progress=False,
                    embeddings=True)
    )  # fmt: skip
    assert summary.rows_scored == 3 and not summary.errors
    table = pq.read_table(tmp_path / "scores" / "scores.parquet")
    assert table.schema.field(EMBEDDINGS_NAME).type == pa.list_(pa.float32(), 8)
    rows = {Path(s).name: i for i, s in enumerate(table.column("id_str").to_pylist())}
    clf = Classifier(model_path, providers=CPU, threads=1)
    from_python = clf.embed(files)
    for i, path in enumerate(files):
        answer = http.post(
            "/classify?embeddings=true", files={"file": (path.name, path.read_bytes())}
        )
        from_server = np.asarray(answer.json()["embeddings"], np.float32)
        row = rows[path.stem] if path.stem in rows else rows[path.name]
        from_scorer = np.asarray(table.column(EMBEDDINGS_NAME)[row].as_py(), np.float32)
        np.testing.assert_array_equal(from_python[i], from_server)
        np.testing.assert_array_equal(from_python[i], from_scorer)
        assert table.column(OOD_SCORE_NAME)[row].as_py() == pytest.approx(
            answer.json()["ood_score"]
        )
        assert table.column("in_distribution")[row].as_py() is answer.json()["in_distribution"]
    # The graph's own output, for the decoded image, is what all three gave.
    model = OnnxModel(model_path, providers=CPU, intra_op_threads=1)
    image = decode_path(files[0], spec=model.card.input_spec).image[None]
    (direct,) = model.session.run([EMBEDDINGS_NAME], {INPUT_NAME: image})
    np.testing.assert_array_equal(direct[0], from_python[0])


def test_the_scorer_writes_what_the_model_has(tmp_path: Path) -> None:
    folder = tmp_path / "cutouts"
    folder.mkdir()
    make_grz_fits(folder, size=64, name="a.fits")
    (folder / "broken.fits").write_bytes(b"SIMPLE  = nonsense")
    old = write_model(tmp_path / "old.onnx", FactoryModel(embeddings=False))
    common = {"catalog": str(folder), "workers": 0, "ort_threads": 1, "progress": False,
              "providers": tuple(CPU)}  # fmt: skip
    with pytest.raises(ValueError, match="has no embeddings output"):
        score(ScoreConfig(model=old, out_dir=tmp_path / "old", embeddings=True, **common))
    score(ScoreConfig(model=old, out_dir=tmp_path / "plain", **common))
    plain = pq.read_table(tmp_path / "plain" / "scores.parquet")
    assert OOD_SCORE_NAME not in plain.column_names and EMBEDDINGS_NAME not in plain.column_names
    with pytest.raises(ValueError, match="CSV has no list columns"):
        score(ScoreConfig(model=old, out_dir=tmp_path / "csv", output_format="csv",
                          embeddings=True, **common))  # fmt: skip
    new = write_model(tmp_path / "new.onnx", FactoryModel(ood_threshold=0.4))
    score(ScoreConfig(model=new, out_dir=tmp_path / "fits", output_format="fits", embeddings=True,
                      **common))  # fmt: skip
    from astropy.io import fits

    with fits.open(tmp_path / "fits" / "scores.fits") as hdus:
        rows = hdus[1].data
        assert rows.columns[EMBEDDINGS_NAME].format == "8E"
        broken = [i for i, e in enumerate(rows["error"]) if e]
        assert len(broken) == 1 and np.isnan(rows[EMBEDDINGS_NAME][broken[0]]).all()
        good = 1 - broken[0]
        assert np.isfinite(rows[EMBEDDINGS_NAME][good]).all() and rows["in_distribution"][good] in (
            True,
            False,
        )


def test_a_score_without_a_threshold_is_refused(tmp_path: Path) -> None:
    from galmorph.core.modelfile.engine import ModelLoadError

    spec = FactoryModel(ood_threshold=0.4, metadata_overrides={"galmorph.ood": "{}"})
    with pytest.raises(ModelLoadError, match="'ood_score' but no threshold"):
        OnnxModel(write_model(tmp_path / "m.onnx", spec), providers=CPU)
