"""Columns of result tables, shared by the batch scorer and the Python API (pyarrow).

One probability column per class (`p_<class>`), the OOD score and flag, and the embeddings as
one fixed-size-list column: `embeddings` is `fixed_size_list<float32>[D]`, one list of D numbers
per row (null for rows that failed), which Parquet stores as a list column and pandas reads as
one numpy array per row (`np.stack(df.embeddings)` gives the (N, D) matrix).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
import pyarrow as pa

# The OOD flag is a column only; the score and embeddings columns take the names of the model's
# outputs (galmorph.core.modelfile.contract).
IN_DISTRIBUTION_NAME = "in_distribution"
# The row's id and the SHA-256 of the model that scored it: the scorer writes them, the
# similarity index keys on the first and refuses scores of another model by the second.
ID_COLUMN = "id_str"
MODEL_SHA_COLUMN = "model_sha256"


def class_columns(class_names: Iterable[str]) -> list[str]:
    """`p_<class>` column names: lower case, non-alphanumerics to `_`; must stay unique."""
    names = []
    for name in class_names:
        ident = re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")
        names.append(f"p_{ident or 'class'}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"class names collide as column names: {', '.join(duplicates)}")
    return names


def embeddings_array(embeddings: np.ndarray, mask: np.ndarray | None = None) -> pa.Array:
    """(N, D) float32 -> fixed_size_list<float32>[D]; rows where mask is True are null."""
    values = np.ascontiguousarray(embeddings, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {values.shape}")
    flat = pa.array(values.reshape(-1), pa.float32())
    nulls = None if mask is None else pa.array(np.asarray(mask, bool))
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1], mask=nulls)
