"""The test run's own cache: every test sees a fresh EDGE2DEXIT_HOME with links to the real models, never the
real cache (see conftest.py)."""

from __future__ import annotations

import json
import os

from edge2dexit.cache import HOME_ENV, cache_dir, sha256_file
from edge2dexit.models.registry import cached_path, get_model, resolve_model


def test_each_test_has_a_home_of_its_own(isolated_home, session_home, real_home):
    assert cache_dir() == isolated_home == type(isolated_home)(os.environ[HOME_ENV])
    assert cache_dir() not in (real_home, session_home)
    assert not str(real_home).startswith(str(isolated_home))


def test_models_are_links_to_the_real_files_and_stamps_are_copied(isolated_home, real_home, model_file):
    smollm2 = cached_path(get_model("smollm2-135m"))
    assert smollm2.parent == isolated_home / "models" and smollm2.is_symlink()
    assert smollm2.resolve() == type(smollm2)(model_file("smollm2-135m"))
    assert resolve_model("smollm2-135m", pull_missing=False) == smollm2
    # `models pull` stamps every file it checks, so the real cache has stamps to copy
    assert json.loads((isolated_home / "sha256.json").read_text()) == json.loads(
        (real_home / "sha256.json").read_text())


def test_writes_land_in_the_test_home(isolated_home, real_home, tmp_path):
    before = (real_home / "sha256.json").read_bytes()
    blob = tmp_path / "blob"
    blob.write_bytes(b"x")
    sha256_file(blob)
    assert str(blob.resolve()) in json.loads((isolated_home / "sha256.json").read_text())
    assert (real_home / "sha256.json").read_bytes() == before
