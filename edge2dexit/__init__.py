"""edge2dexit: two-dimensional early-exit text classification with a local GGUF LLM through llama.cpp.

The names below load lazily (PEP 562): `import edge2dexit.policies` or `edge2dexit.heads` loads no native code,
and `from edge2dexit import Classifier` loads llama.cpp only then.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import BundleError, ContextOverflowError, Edge2DExitError, InputError, ModelError

_LAZY = {
    "Classifier": "classifier",
    "Result": "classifier",
    "Stream": "classifier",
    "Engine": "engine",
    "EngineSettings": "settings",
}

__all__ = [*_LAZY, "Edge2DExitError", "InputError", "ModelError", "BundleError", "ContextOverflowError"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
