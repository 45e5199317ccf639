"""The model card tells the truth about the images a model was trained on.

Two small models are trained on synthetic Galaxy10 files at 64 px (1.048"/px) and 128 px
(0.524"/px). Evaluation galaxies are written as Galaxy10-layout HDF5 rows together with the
Legacy-Survey-style FITS flux cubes they were rendered from, at the survey's 0.262"/px (256 px,
Galaxy10's own size) and at each model's scale. Classified from FITS through the server's decoder,
they must get the answers their HDF5 rows get through evaluation; with the old card (0.262"/px
whatever the training size) they do not. And evaluation, the server and the scorer give the
same probabilities for the same rows.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from galmorph.core.cutouts.decode import decode_path
from galmorph.core.data.galaxy10 import Galaxy10File
from galmorph.core.modelfile.contract import ModelCard
from galmorph.core.modelfile.engine import CPU_PROVIDER, OnnxModel
from galmorph.model.export import export_onnx
from galmorph.scoring.rows import class_columns
from galmorph.scoring.run import ScoreConfig, score
from galmorph.training.evaluate import OnnxPredictor, predict_split
from galmorph.training.synth import synthesize
from galmorph.training.train import train
from tests.support.server_process import serve
from tests.support.training_helpers import tiny_config

pytestmark = pytest.mark.slow

EVAL_SEED, EVAL_N = 7, 48


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("imaging_truth")


def _model(work: Path, size: int) -> Path:
    data = synthesize(work / f"train{size}.h5", n=400, size=size, seed=0, progress=False)
    config = tiny_config(
        data, work / f"run{size}", img_size=size, epochs=4, batch_size=32,
        augment={"policy": "galaxy", "color_jitter": 0.0}, mixup={"mixup_alpha": 0.0},
    )  # fmt: skip
    train(config)
    return export_onnx(work / f"run{size}", work / f"model{size}.onnx", intra_op_threads=1)


@pytest.fixture(scope="module")
def models(work: Path) -> dict[int, Path]:
    return {size: _model(work, size) for size in (64, 128)}


@pytest.fixture(scope="module")
def galaxies(work: Path) -> dict[int, tuple[Path, Path]]:
    """size -> (HDF5 file, folder of FITS cutouts) of the same evaluation galaxies."""
    return {
        size: (
            synthesize(
                work / f"eval{size}.h5",
                n=EVAL_N,
                size=size,
                seed=EVAL_SEED,
                fits_dir=work / f"fits{size}",
                progress=False,
            ),
            work / f"fits{size}",
        )
        for size in (64, 128, 256)
    }


def _engine(path: Path) -> OnnxModel:
    return OnnxModel(path, providers=[CPU_PROVIDER], intra_op_threads=1)


def _fits_classes(engine: OnnxModel, folder: Path, card: ModelCard) -> np.ndarray:
    paths = sorted(folder.glob("*.fits"))
    assert len(paths) == EVAL_N
    images = np.stack([decode_path(path, spec=card.input_spec).image for path in paths])
    return engine.predict(images).argmax(axis=1)


def _row_classes(model: Path, h5: Path) -> np.ndarray:
    with Galaxy10File(h5) as data:
        return predict_split(
            OnnxPredictor(model, threads=1), data, np.arange(EVAL_N), progress=False
        ).argmax(axis=1)


@pytest.mark.parametrize(("size", "fits_size"), [(64, 256), (64, 64), (128, 256), (128, 128)])
def test_fits_and_hdf5_rows_of_the_same_galaxies_agree(
    models: dict[int, Path], galaxies: dict[int, tuple[Path, Path]], size: int, fits_size: int
) -> None:
    engine = _engine(models[size])
    card = engine.card
    assert card.pixel_scale == pytest.approx(0.262 * 256 / size)
    assert card.field_of_view == pytest.approx((0.262 * 256, 0.262 * 256))
    h5, fits_folder = galaxies[fits_size]
    rows = _row_classes(models[size], h5)
    from_fits = _fits_classes(engine, fits_folder, card)
    agreement = float((rows == from_fits).mean())
    assert agreement >= 0.9, f"FITS at {fits_size} px vs its HDF5 rows: agreement {agreement:.2f}"
    if fits_size == 256:
        # The card every export used to carry: 0.262"/px whatever the training size.
        old = _fits_classes(engine, fits_folder, replace(card, pixel_scale=0.262))
        assert float((rows == old).mean()) < agreement - 0.2


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_evaluate_server_and_scorer_give_the_same_probabilities(
    models: dict[int, Path], galaxies: dict[int, tuple[Path, Path]], work: Path
) -> None:
    """The 64 px model on 128 px rows, so every path has to resize, and the same way."""
    model, h5 = models[64], galaxies[128][0]
    with Galaxy10File(h5) as data:
        evaluated = predict_split(
            OnnxPredictor(model, threads=1), data, np.arange(EVAL_N), progress=False
        )
        rows = data.images(np.arange(EVAL_N))
    card = _engine(model).card
    columns = class_columns(card.class_names)

    score(
        ScoreConfig(
            catalog=h5,
            model=model,
            out_dir=work / "scores",
            workers=0,
            ort_threads=1,
            providers=(CPU_PROVIDER,),
            progress=False,
        )
    )
    scored_table = pq.read_table(work / "scores" / "scores.parquet").to_pandas()
    scored = scored_table[columns].to_numpy()

    served = []
    with serve(model, work) as server:
        for image in rows:
            reply = httpx.post(f"{server.url}/classify", content=_png(image), timeout=30)
            assert reply.status_code == 200, reply.text
            probabilities = reply.json()["probabilities"]
            served.append([probabilities[name] for name in card.class_names])
    served_array = np.asarray(served)

    np.testing.assert_allclose(scored, evaluated, atol=1e-5)
    np.testing.assert_allclose(served_array, evaluated, atol=1e-5)
    assert (scored.argmax(1) == evaluated.argmax(1)).all()
