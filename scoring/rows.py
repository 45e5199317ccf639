"""Result rows: catalog rows + model outputs + decode errors -> the output table.

Columns (galmorph.core.data.tables): the catalog's row index, id and passthrough columns,
pred_label/pred_index/pred_prob, one `p_<class>` per class, `ood_score` and `in_distribution`
when the model has an OOD score, `embeddings` (fixed_size_list<float32>[D]) when asked for,
the model's SHA-256 and `error`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from galmorph.core.data.tables import (
    IN_DISTRIBUTION_NAME,
    MODEL_SHA_COLUMN,
    class_columns,
    embeddings_array,
)
from galmorph.core.modelfile.contract import (
    EMBEDDINGS_NAME,
    OOD_SCORE_NAME,
    ModelCard,
    ModelOutputs,
)
from galmorph.scoring.shards import ROW_INDEX

if TYPE_CHECKING:
    from galmorph.core.modelfile.engine import OnnxModel

# The column names of a result row besides passthrough and per-class probabilities.
FIXED_COLUMNS = (ROW_INDEX, "id_str", "pred_label", "pred_index", "pred_prob")


def unrun_outputs(model: OnnxModel, n: int) -> ModelOutputs:
    """The outputs of n rows none of which reached the model: every output the model has, NaN
    (the flag False), so a batch with no decodable cutout becomes error rows like any other
    instead of a batch that lacks the OOD or embeddings columns."""
    width = model.embedding_size if model.has_embeddings else None
    return ModelOutputs(
        np.full((n, model.card.num_classes), np.nan, np.float32),
        None if width is None else np.full((n, width), np.nan, np.float32),
        np.full(n, np.nan, np.float32) if model.has_ood else None,
        np.zeros(n, bool) if model.has_ood else None,
    )


class ResultBuilder:
    """Turns a block of catalog rows + model outputs + errors into output rows.

    ood: the model has an OOD score (its columns are written); embedding_size: write the
    embeddings, D wide (None: not asked for).
    """

    def __init__(
        self,
        card: ModelCard,
        model_sha256: str,
        passthrough: tuple[str, ...],
        *,
        ood: bool = False,
        embedding_size: int | None = None,
    ) -> None:
        self.class_names = list(card.class_names)
        self.prob_columns = class_columns(card.class_names)
        self.model_sha256 = model_sha256
        self.passthrough = passthrough
        self.ood = ood
        self.embedding_size = embedding_size
        reserved = {*FIXED_COLUMNS, *self.prob_columns, MODEL_SHA_COLUMN, "error", "source"}
        reserved |= {OOD_SCORE_NAME, IN_DISTRIBUTION_NAME, EMBEDDINGS_NAME}
        clash = [c for c in passthrough if c in reserved]
        if clash:
            raise ValueError(f"passthrough column(s) {', '.join(clash)} clash with output columns")

    def build(self, block: pa.Table, outputs: ModelOutputs, errors: list[str | None]) -> pa.Table:
        """outputs: one row per block row (rows with an error are ignored)."""
        n = len(block)
        probs = outputs.probabilities
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
        if self.ood:
            if outputs.ood_score is None or outputs.in_distribution is None:
                raise ValueError("the model's OOD score is missing from its outputs")
            columns[OOD_SCORE_NAME] = pa.array(outputs.ood_score, pa.float32(), mask=mask)
            columns[IN_DISTRIBUTION_NAME] = pa.array(outputs.in_distribution, mask=mask)
        if self.embedding_size is not None:
            if outputs.embeddings is None:
                raise ValueError("the model's embeddings are missing from its outputs")
            columns[EMBEDDINGS_NAME] = embeddings_array(outputs.embeddings, mask=mask)
        columns[MODEL_SHA_COLUMN] = pa.array([self.model_sha256] * n, pa.string())
        columns["error"] = pa.array(errors, pa.string())
        return pa.table(columns)
