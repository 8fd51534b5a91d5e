"""Base models known by name (see registry.py), and the sample review the README, the benchmarks and the soak read."""

from pathlib import Path

from .registry import ModelInfo, cached_path, get_model, identify, list_models, pull, resolve_model

SAMPLE_REVIEW = Path(__file__).parent / "sample_review.txt"

__all__ = ["SAMPLE_REVIEW", "ModelInfo", "cached_path", "get_model", "identify", "list_models", "pull",
           "resolve_model"]
