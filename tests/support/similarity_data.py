"""Scored tables with embeddings, as `galmorph score --embeddings` writes them, for the
similarity index's tests: synthetic ones (clustered vectors, no model) and real ones (a factory
ONNX model's outputs on small PNG cutouts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from galmorph.core.data.tables import embeddings_array
from galmorph.core.modelfile.engine import OnnxModel

CLASSES = ("Disturbed", "Merging", "Round Smooth")
SHA_A = "a" * 64
SHA_B = "b" * 64


def scored_table(
    ids: list[str],
    embeddings: np.ndarray,
    sha: str,
    *,
    labels: list[str] | None = None,
    ood: np.ndarray | None = None,
    errors: np.ndarray | None = None,
) -> pa.Table:
    """A scorer-shaped table; rows where `errors` is True have null embeddings and an error."""
    n = len(ids)
    failed = np.zeros(n, bool) if errors is None else errors
    labels = labels or [CLASSES[i % len(CLASSES)] for i in range(n)]
    ood = np.linspace(0.1, 0.9, n, dtype=np.float32) if ood is None else ood
    return pa.table(
        {
            "row_index": pa.array(np.arange(n, dtype=np.int64)),
            "id_str": pa.array(ids),
            "ra": pa.array(np.linspace(10.0, 20.0, n)),
            "dec": pa.array(np.linspace(-5.0, 5.0, n)),
            "pred_label": pa.array([None if f else x for x, f in zip(labels, failed, strict=True)]),
            "pred_prob": pa.array(np.full(n, 0.9, np.float32), mask=failed),
            "ood_score": pa.array(ood.astype(np.float32), mask=failed),
            "in_distribution": pa.array(ood <= 0.5, mask=failed),
            "embeddings": embeddings_array(embeddings, mask=failed),
            "model_sha256": pa.array([sha] * n),
            "error": pa.array(["decode: bad" if f else None for f in failed], pa.string()),
        }
    )


def clustered(n: int, dim: int, seed: int, clusters: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).normal(0, 1, (clusters, dim))
    return (centres[rng.integers(0, clusters, n)] + rng.normal(0, 0.3, (n, dim))).astype(np.float32)


def write_parts(folder: Path, tables: list[pa.Table]) -> Path:
    """A scoring output folder: part-NNNNN.parquet for each table."""
    folder.mkdir(parents=True, exist_ok=True)
    for number, table in enumerate(tables):
        pq.write_table(table, folder / f"part-{number:05d}.parquet")
    return folder


def galaxy_pngs(folder: Path, n: int, size: int = 64, seed: int = 0) -> list[Path]:
    """n small PNG cutouts: elliptical blobs of varied shape and colour."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] - size / 2
    paths = []
    for i in range(n):
        angle, ratio, width = rng.uniform(0, np.pi), rng.uniform(0.2, 1), rng.uniform(3, 12)
        u = x * np.cos(angle) + y * np.sin(angle)
        v = (-x * np.sin(angle) + y * np.cos(angle)) / ratio
        light = np.exp(-(u**2 + v**2) / (2 * width**2))
        colour = rng.uniform(0.4, 1.0, 3)
        image = (255 * light[..., None] * colour).astype(np.uint8)
        paths.append(folder / f"g{i:03d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def score_pngs(model_path: Path, paths: list[Path], out: Path) -> Path:
    """The scorer's output for these cutouts, one part, embeddings from the model itself
    (decoded as the server decodes uploads)."""
    from galmorph.core.cutouts.decode import decode_path

    model = OnnxModel(model_path, providers=["CPUExecutionProvider"])
    images = np.stack([decode_path(p, spec=model.card.input_spec).image for p in paths])
    outputs = model.run(images)
    assert outputs.embeddings is not None
    ood = outputs.ood_score if outputs.ood_score is not None else None
    labels = [model.card.class_names[i] for i in outputs.probabilities.argmax(1)]
    table = scored_table([p.stem for p in paths], outputs.embeddings, model.sha256,
                         labels=labels, ood=ood)  # fmt: skip
    return write_parts(out, [table])
