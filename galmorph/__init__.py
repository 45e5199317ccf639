"""galmorph: galaxy morphology classification with Astroformer and onnxruntime.

`from galmorph import Classifier` is the Python API (galmorph.api.classifier); it is imported
on first use, so that `import galmorph` (and `galmorph --help`) stays free of onnxruntime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from galmorph.core.version import __version__

if TYPE_CHECKING:
    from galmorph.api.classifier import Classifier, Prediction, Predictions

__all__ = ["Classifier", "Prediction", "Predictions", "__version__"]
_LAZY = {"Classifier", "Prediction", "Predictions"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from galmorph.api import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module 'galmorph' has no attribute {name!r}")
