"""`--engine ray`: the same scoring on Ray Data, for clusters that already run Ray.

Catalog rows (read by galmorph.scoring.catalog, Parquet and CSV streamed) go into Ray Data in
windows of whole shards; `map_batches` decodes cutouts in CPU tasks (galmorph.core.cutouts.decode
via galmorph.scoring.decode_worker, as the local engine) and runs inference in a callable-class
actor pool: one onnxruntime session (galmorph.core.modelfile.engine.OnnxModel) per actor, one GPU
per actor when the cluster has GPUs. Order is preserved, so the driver turns results into rows with
the same ResultBuilder (galmorph.scoring.rows) as the local engine and writes the same atomic
Parquet parts: resume, the manifest and the exactly-once merge are shared, not re-implemented.

Ray is imported only when this engine is used (pip extra `ray`). Connects to RAY_ADDRESS when
set, else starts a local instance; a caller may also `ray.init(...)` first.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from galmorph.core.modelfile.contract import ModelOutputs
from galmorph.scoring.decode_worker import DecodeSettings, decode_sources
from galmorph.scoring.rows import ResultBuilder, unrun_outputs

IMAGE_COLUMN = "_image"
PROBS_COLUMN = "_probs"
EMBEDDINGS_COLUMN = "_embeddings"
OOD_COLUMN = "_ood_score"
IN_DISTRIBUTION_COLUMN = "_in_distribution"
ERROR_COLUMN = "_error"
# Rows handed to Ray at once: bounds the driver's and the object store's share of the catalog
# (paths and coordinates only; images live inside the pipeline).
WINDOW_ROWS = 50_000


def _decode_batch(batch: pa.Table, settings: DecodeSettings) -> pa.Table:
    """Ray task: decode this batch's cutouts; images travel as fixed-size binary rows."""
    images, errors = decode_sources(settings, batch.column("source").to_pylist())
    row_bytes = int(np.prod(images.shape[1:]))
    column = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(row_bytes), len(images), [None, pa.py_buffer(np.ascontiguousarray(images))]
    )
    return batch.append_column(IMAGE_COLUMN, column).append_column(
        ERROR_COLUMN, pa.array(errors, pa.string())
    )


class OnnxPredictor:
    """Ray actor: one onnxruntime session, reused for every batch this actor receives."""

    def __init__(
        self,
        model_path: str,
        intra_op_threads: int | None,
        providers: tuple[str, ...] | None = None,
    ) -> None:
        from galmorph.core.modelfile.engine import OnnxModel

        self.model = OnnxModel(
            model_path,
            providers=providers,
            intra_op_threads=intra_op_threads,
            inter_op_threads=1,
        )
        height, width = self.model.input_size
        self.shape = (height, width, 3)

    def __call__(self, batch: pa.Table) -> pa.Table:
        column = batch.column(IMAGE_COLUMN).combine_chunks()
        images = np.frombuffer(
            column.buffers()[1], np.uint8, count=len(column) * int(np.prod(self.shape))
        )
        images = images.reshape(len(column), *self.shape)
        ok = batch.column(ERROR_COLUMN).is_null().to_numpy(zero_copy_only=False)
        if ok.any():
            outputs = self.model.run(images[ok]).scatter(ok)
        else:
            outputs = unrun_outputs(self.model, len(batch))
        batch = batch.drop_columns([IMAGE_COLUMN])
        batch = batch.append_column(PROBS_COLUMN, _rows(outputs.probabilities))
        if outputs.embeddings is not None:
            batch = batch.append_column(EMBEDDINGS_COLUMN, _rows(outputs.embeddings))
        if outputs.ood_score is not None and outputs.in_distribution is not None:
            batch = batch.append_column(OOD_COLUMN, pa.array(outputs.ood_score))
            batch = batch.append_column(IN_DISTRIBUTION_COLUMN, pa.array(outputs.in_distribution))
        return batch


def _rows(values: np.ndarray) -> pa.Array:
    """(N, W) float32 -> one fixed-size list per row."""
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _matrix(batch: pa.Table, column: str, width: int) -> np.ndarray:
    flat = batch.column(column).combine_chunks().flatten().to_numpy()
    return np.asarray(flat, np.float32).reshape(len(batch), width)


def _outputs(batch: pa.Table, num_classes: int) -> ModelOutputs:
    """The actors' columns back as the model's outputs."""
    names = batch.column_names
    embeddings = None
    if EMBEDDINGS_COLUMN in names:
        width = batch.schema.field(EMBEDDINGS_COLUMN).type.list_size
        embeddings = _matrix(batch, EMBEDDINGS_COLUMN, width)
    ood = OOD_COLUMN in names
    return ModelOutputs(
        _matrix(batch, PROBS_COLUMN, num_classes),
        embeddings,
        batch.column(OOD_COLUMN).to_numpy() if ood else None,
        batch.column(IN_DISTRIBUTION_COLUMN).to_numpy(zero_copy_only=False) if ood else None,
    )


class RayEngine:
    def __init__(
        self,
        model_path: Path,
        settings: DecodeSettings,
        *,
        batch_size: int,
        workers: int,
        providers: tuple[str, ...] | None = None,
        window_rows: int = WINDOW_ROWS,
    ) -> None:
        self.model_path = str(Path(model_path).resolve())
        self.providers = providers
        self.settings = settings
        self.batch_size = batch_size
        self.workers = workers
        self.window_rows = window_rows

    def run(self, blocks: Iterable[pa.Table], builder: ResultBuilder) -> Iterator[pa.Table]:
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        window: list[pa.Table] = []
        rows = 0
        for block in blocks:
            window.append(block)
            rows += len(block)
            if rows >= self.window_rows:
                yield from self._run_window(window, builder)
                window, rows = [], 0
        if window:
            yield from self._run_window(window, builder)

    def _actor_options(self) -> dict[str, Any]:
        import ray

        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus:
            return {"compute": ray.data.ActorPoolStrategy(size=gpus), "num_gpus": 1}
        # CPU only: one actor; its session gets the threads that decode tasks leave free.
        cpus = int(ray.cluster_resources().get("CPU", 1))
        threads = max(1, cpus - max(self.workers, 1))
        return {
            "compute": ray.data.ActorPoolStrategy(size=1),
            "num_cpus": threads,
            "fn_constructor_kwargs": {
                "model_path": self.model_path,
                "intra_op_threads": threads,
                "providers": self.providers,
            },
        }

    def _run_window(self, window: list[pa.Table], builder: ResultBuilder) -> Iterator[pa.Table]:
        import ray

        options = self._actor_options()
        options.setdefault(
            "fn_constructor_kwargs",
            {"model_path": self.model_path, "intra_op_threads": None, "providers": self.providers},
        )
        refs: list[Any] = [ray.put(block) for block in window]
        dataset: ray.data.Dataset = ray.data.from_arrow_refs(refs)
        dataset = dataset.map_batches(
            functools.partial(_decode_batch, settings=self.settings),
            batch_size=self.batch_size,
            batch_format="pyarrow",
            num_cpus=1,
        )
        dataset = dataset.map_batches(
            OnnxPredictor, batch_size=self.batch_size, batch_format="pyarrow", **options
        )
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            assert isinstance(batch, pa.Table)
            outputs = _outputs(batch, len(builder.prob_columns))
            errors = batch.column(ERROR_COLUMN).to_pylist()
            yield builder.build(batch, outputs, errors)
