"""Result rows: catalog rows + class probabilities + decode errors -> the output table."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from galmorph.scoring.shards import MODEL_SHA_COLUMN, ROW_INDEX

from galmorph.core.contract import ModelCard
from galmorph.core.tables import class_columns

# The column names of a result row besides passthrough and per-class probabilities.
FIXED_COLUMNS = (ROW_INDEX, "id_str", "pred_label", "pred_index", "pred_prob")


class ResultBuilder:
    """Turns a block of catalog rows + probabilities + errors into output rows."""

    def __init__(self, card: ModelCard, model_sha256: str, passthrough: tuple[str, ...]) -> None:
        self.class_names = list(card.class_names)
        self.prob_columns = class_columns(card.class_names)
        self.model_sha256 = model_sha256
        self.passthrough = passthrough
        reserved = {*FIXED_COLUMNS, *self.prob_columns, MODEL_SHA_COLUMN, "error", "source"}
        clash = [c for c in passthrough if c in reserved]
        if clash:
            raise ValueError(f"passthrough column(s) {', '.join(clash)} clash with output columns")

    def build(self, block: pa.Table, probs: np.ndarray, errors: list[str | None]) -> pa.Table:
        n = len(block)
        ok = np.array([e is None for e in errors], bool)
        index = np.argmax(probs, axis=1) if probs.size else np.zeros(n, np.int64)
        mask = ~ok
        columns: dict[str, Any] = {
            ROW_INDEX: block.column(ROW_INDEX),
            "id_str": block.column("id_str"),
        }
        for name in self.passthrough:
            columns[name] = block.column(name)
        columns["pred_label"] = pa.array(
            [self.class_names[i] if good else None for i, good in zip(index, ok, strict=True)],
            pa.string(),
        )
        columns["pred_index"] = pa.array(index.astype(np.int64), mask=mask)
        columns["pred_prob"] = pa.array(
            probs[np.arange(n), index] if n else np.zeros(0, np.float32), mask=mask
        )
        for k, name in enumerate(self.prob_columns):
            columns[name] = pa.array(probs[:, k], mask=mask)
        columns[MODEL_SHA_COLUMN] = pa.array([self.model_sha256] * n, pa.string())
        columns["error"] = pa.array(errors, pa.string())
        return pa.table(columns)
