"""Base models known by name: see registry.py."""

from .registry import ModelInfo, cached_path, get_model, identify, list_models, pull, resolve_model

__all__ = ["ModelInfo", "cached_path", "get_model", "identify", "list_models", "pull", "resolve_model"]
