"""The output folder's side of a run: the manifest it is pinned to, and writing whole shards.

Result rows arrive in catalog order in tables of any length; ShardAssembler cuts them at shard
boundaries and writes each shard the moment it is complete (atomically, via
galmorph.scoring.shards), so a killed run loses at most the shards still being filled.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import pyarrow as pa

from galmorph.core.modelfile.contract import ModelCard
from galmorph.core.sky.client import CutoutSpec
from galmorph.scoring.catalog import Catalog, CatalogOptions
from galmorph.scoring.shards import ROW_INDEX, Manifest, ShardError, ShardPlan, write_part


def build_manifest(
    catalog: Catalog,
    options: CatalogOptions,
    card: ModelCard,
    model_sha256: str,
    *,
    shard_size: int,
    stretch: str | None,
    cutouts: CutoutSpec | None = None,
    embeddings: bool = False,
    engine: dict[str, Any] | None = None,
) -> Manifest:
    """What a rerun must match to resume in the same folder; `stretch` None means the model's.

    `cutouts`: what a sky catalog's cutouts are fetched as. The base URL is left out, so a
    rerun may go through a mirror (or the cache alone) and still resume.
    """
    settings: dict[str, Any] = {
        "id_col": options.id_col,
        "path_col": options.path_col,
        "passthrough": list(catalog.passthrough),
        "stretch": stretch or card.stretch,
        # What every cutout was rendered to: the model card's input spec.
        "input": {
            "size": list(card.input_size),
            "pixel_scale": card.pixel_scale,
            "field_of_view": [round(side, 4) for side in card.field_of_view],
            "interpolation": card.interpolation,
            "bands": dict(card.bands),
        },
    }
    if embeddings:  # parts with and without the column must not be merged
        settings["embeddings"] = True
    if engine is not None and engine["engine"] != "onnxruntime":
        # bf16 parts must not be merged with fp32 ones; onnxruntime (absent) is as before.
        settings["engine"] = {"engine": engine["engine"], "precision": engine["precision"]}
    if cutouts is not None:
        fetched = cutouts.to_dict()
        del fetched["base_url"]
        settings["cutouts"] = {"ra_col": options.ra_col, "dec_col": options.dec_col, **fetched}
    return Manifest(
        catalog=catalog.fingerprint(),
        num_rows=catalog.num_rows,
        shard_size=shard_size,
        model_sha256=model_sha256,
        model_name=card.model_name,
        class_names=list(card.class_names),
        settings=settings,
    )


class ShardAssembler:
    """Collects result rows in order and writes each shard the moment it is complete."""

    def __init__(self, out_dir: Path, plan: ShardPlan, shards: list[int]) -> None:
        self.out_dir = out_dir
        self.plan = plan
        self._pending = deque(shards)
        self._pieces: list[pa.Table] = []
        self._have = 0
        self.errors: dict[str, int] = {}

    def add(self, table: pa.Table) -> None:
        while len(table):
            shard = self._pending[0]
            rows = self.plan.rows(shard)
            take = min(len(rows) - self._have, len(table))
            self._pieces.append(table.slice(0, take))
            self._have += take
            table = table.slice(take)
            if self._have == len(rows):
                self._flush(shard)

    def _flush(self, shard: int) -> None:
        part = pa.concat_tables(self._pieces).combine_chunks()
        first = part.column(ROW_INDEX)[0].as_py()
        if first != self.plan.rows(shard).start:  # a bug here would silently shift rows
            raise ShardError(f"shard {shard} would start at row {first}")
        for value in part.column("error").drop_null().to_pylist():
            kind = value.split(":", 1)[0]
            self.errors[kind] = self.errors.get(kind, 0) + 1
        write_part(self.out_dir, shard, part)
        self._pending.popleft()
        self._pieces, self._have = [], 0

    def finish(self) -> None:
        if self._pending:
            raise ShardError(f"scoring ended before shards {list(self._pending)[:5]} were full")
