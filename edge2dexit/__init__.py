"""edge2dexit: two-dimensional early-exit text classification with a local GGUF LLM through llama.cpp.

The names below load lazily (PEP 562): `import edge2dexit.policies` or `edge2dexit.heads` loads no native code,
and `from edge2dexit import Classifier` loads llama.cpp only then; `train` and `EarlyExitClassifier` need the
`train` extra (torch, scikit-learn).
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import BundleError, ContextOverflowError, Edge2DExitError, InputError, ModelError, OutputError, SettingsError

_LAZY = {
    "Classifier": "classifier",
    "Result": "reader",
    "Evidence": "reader",
    "Stream": "reader",
    "Engine": "engine",
    "EngineSettings": "settings",
    "train": "convert.estimator",
    "EarlyExitClassifier": "convert.estimator",
}

__all__ = [*_LAZY, "Edge2DExitError", "InputError", "ModelError", "BundleError", "ContextOverflowError",
           "SettingsError", "OutputError"]


def __dir__() -> list[str]:
    """The public names (loaded or not), as `dir(edge2dexit)` and completion should show them."""
    return sorted(__all__)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        if _LAZY[name] != "settings":
            from . import native  # noqa: F401  (llama.cpp before numpy, where numpy is not loaded yet: native.py)
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
