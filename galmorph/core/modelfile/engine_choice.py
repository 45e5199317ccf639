"""Which engine runs a model: `auto`, `onnxruntime` or `openvino`, for the server, the scorer,
the Python API and `model inspect` alike (docs/scoring.md, "CPU-only hosts").

onnxruntime is OnnxModel (engine.py); openvino is OpenVinoModel (openvino_engine.py), bf16 on
the CPU. `auto` takes openvino where it can run (no CUDA meant, the package installed, bf16
units, parity at load), else onnxruntime; when openvino could have run but refused, one warning
line says why.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from galmorph.core.modelfile.engine import ModelLoadError, OnnxModel
from galmorph.core.modelfile.openvino_engine import (
    EngineUnavailable,
    OpenVinoModel,
    cpu_bf16_flags,
    openvino_refusal,
)

logger = logging.getLogger(__name__)

ENGINES = ("auto", "onnxruntime", "openvino")
# The engine where none is given: the server's setting of the same name, the scorer's and the
# Python API's default (auto where unset).
ENGINE_ENV = "GALMORPH_ENGINE"


def open_model(
    path: str | Path,
    *,
    engine: str | None = None,
    providers: Sequence[str] | None = None,
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
) -> OnnxModel:
    """The model on `engine` (None: $GALMORPH_ENGINE, else auto). An engine that cannot run
    raises EngineUnavailable when asked for by name; a bad file raises ModelLoadError on any."""
    engine = engine or os.environ.get(ENGINE_ENV) or "auto"
    if engine not in ENGINES:
        raise ModelLoadError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    threads = {"intra_op_threads": intra_op_threads, "inter_op_threads": inter_op_threads}
    if engine == "onnxruntime":
        return OnnxModel(path, providers=providers, **threads)
    if engine == "openvino":
        return OpenVinoModel(path, providers=providers, **threads)
    refusal = openvino_refusal(providers)
    if refusal is None:
        try:
            model: OnnxModel = OpenVinoModel(path, providers=providers, **threads)
        except EngineUnavailable as exc:
            logger.warning("engine auto: onnxruntime fp32, openvino refused: %s", exc)
            refusal = f"openvino refused: {exc}"
        else:
            model.engine_reason = (
                f"auto: CPU with {', '.join(cpu_bf16_flags())}, openvino installed"
            )
            return model
    model = OnnxModel(path, providers=providers, **threads)
    model.engine_reason = f"auto: {refusal}"
    return model
