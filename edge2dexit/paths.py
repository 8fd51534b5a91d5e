"""Where edge2dexit keeps files it creates: one cache directory, overridable for tests and users."""

import os
from pathlib import Path

HOME_ENV = "EDGE2DEXIT_HOME"


def cache_dir() -> Path:
    """The user cache directory: $EDGE2DEXIT_HOME, else $XDG_CACHE_HOME/edge2dexit, else ~/.cache/edge2dexit."""
    explicit = os.environ.get(HOME_ENV)
    if explicit:
        path = Path(explicit)
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge2dexit"
    path.mkdir(parents=True, exist_ok=True)
    return path
