"""edge2dexit: two-dimensional early-exit text classification with a local GGUF LLM through llama.cpp."""

from .classifier import Classifier, Result, Stream
from .engine import Engine, EngineSettings
from .errors import BundleError, ContextOverflowError, Edge2DExitError, InputError, ModelError

__all__ = [
    "Classifier",
    "Result",
    "Stream",
    "Engine",
    "EngineSettings",
    "Edge2DExitError",
    "InputError",
    "ModelError",
    "BundleError",
    "ContextOverflowError",
]
