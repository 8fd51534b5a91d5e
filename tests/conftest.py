"""Shared fixtures. Tests run the real llama.cpp on real small models, pulled into the user cache beforehand
(`edge2dexit models pull smollm2-135m@q8_0 gemma3-270m`, as .ci/run does): no test downloads anything.

No test writes into the real cache: every test (and every session- or module-scoped fixture) sees an
EDGE2DEXIT_HOME of its own, whose `models/` holds links to the real cached model files and whose `sha256.json`
is a copy of the real one (so the models' sha256 are not recomputed). The real home and the model paths are
resolved once, here, at import, before any of that.
"""

from __future__ import annotations

import edge2dexit.native  # noqa: F401  (first: the order a CUDA build needs, docs/llama-cpp.md §10)

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from edge2dexit.cache import HOME_ENV, cache_dir
from edge2dexit.engine import Engine, EngineSettings
from edge2dexit.errors import ModelError
from edge2dexit.llama import TAPS
from edge2dexit.models.registry import DEFAULT_MODEL, resolve_model

from helpers import TASK_PROMPT, random_lora, tiny_convert

# The real cache: $EDGE2DEXIT_HOME as set when pytest started, else the package's default.
REAL_HOME: Path = cache_dir()
ENGINE_MODELS = (DEFAULT_MODEL, "gemma3-270m")  # the default runtime file of SmolLM2, and Gemma as shipped
MODEL_NAMES = ("smollm2-135m", *ENGINE_MODELS)  # every file the tests read (the first is the one SmolLM2 ships)
WITH_LORA = DEFAULT_MODEL + "+lora"  # SmolLM2 through a random LoRA adapter: exactness must hold with one too


def make_home(directory: Path) -> Path:
    """A cache directory whose models/ links to the real cached models and with a copy of the real stamps."""
    models = directory / "models"
    models.mkdir(parents=True, exist_ok=True)
    real_models = REAL_HOME / "models"
    if real_models.is_dir():
        for file in real_models.glob("*.gguf"):
            (models / file.name).symlink_to(file.resolve())
    stamps = REAL_HOME / "sha256.json"
    if stamps.is_file():
        shutil.copyfile(stamps, directory / "sha256.json")
    return directory


def _resolve_models() -> dict[str, str | ModelError]:
    """Each model's real file, found (and its sha256 checked) through a throw-away home like the tests' own, so
    that even a missing sha256 stamp is written there and not into the real cache."""
    probe = Path(tempfile.mkdtemp(prefix="edge2dexit-home-"))
    saved = os.environ.get(HOME_ENV)
    os.environ[HOME_ENV] = str(make_home(probe))
    found: dict[str, str | ModelError] = {}
    try:
        for name in MODEL_NAMES:
            try:
                found[name] = str(resolve_model(name, pull_missing=False).resolve())
            except ModelError as exc:
                found[name] = exc
    finally:
        if saved is None:
            del os.environ[HOME_ENV]
        else:
            os.environ[HOME_ENV] = saved
        shutil.rmtree(probe)
    return found


_MODEL_PATHS = _resolve_models()  # once, at import, before any test's home


def model_path(name: str) -> str:
    found = _MODEL_PATHS[name]
    if isinstance(found, ModelError):
        pytest.fail(f"{found} (the test run expects it in the cache: edge2dexit models pull {name})")
    return found


def pytest_configure(config):
    config.addinivalue_line("markers", "llama: loads a real model with llama.cpp")


@pytest.fixture(scope="session", autouse=True)
def session_home(tmp_path_factory):
    """The home that session- and module-scoped fixtures (engines, classifiers, converted bundles) see."""
    home = make_home(tmp_path_factory.mktemp("session-home"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(HOME_ENV, str(home))
        yield home


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets a fresh EDGE2DEXIT_HOME of its own."""
    home = make_home(tmp_path_factory.mktemp("home"))
    monkeypatch.setenv(HOME_ENV, str(home))
    return home


@pytest.fixture(scope="session")
def real_home() -> Path:
    """The user's cache, which no test may write to."""
    return REAL_HOME


@pytest.fixture(scope="session")
def model_file():
    """The real file of a registry model, by name (one of MODEL_NAMES)."""
    return model_path


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return model_path(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def gemma_path() -> str:
    return model_path("gemma3-270m")


@pytest.fixture(scope="session")
def lora_path(tmp_path_factory) -> Path:
    return random_lora(model_path(DEFAULT_MODEL), tmp_path_factory.mktemp("lora") / "lora.gguf")


@pytest.fixture(scope="session", params=[(name, tap) for name in (*ENGINE_MODELS, WITH_LORA) for tap in TAPS],
                ids=lambda param: "-".join(param))
def any_engine(request):
    """A real engine on each small model, and on SmolLM2 through a LoRA adapter, each with the C and the Python
    eval-callback tap, shared by the tests of a session (loading takes ~0.5 s)."""
    (name, tap), lora = request.param, None
    if name == WITH_LORA:
        name, lora = DEFAULT_MODEL, request.getfixturevalue("lora_path")
    with Engine.load(model_path(name), EngineSettings(n_ctx=1024, tap=tap), prompt=TASK_PROMPT, lora=lora) as engine:
        yield engine


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_path):
    with Engine.load(smollm2_path, EngineSettings(n_ctx=1024), prompt=TASK_PROMPT) as engine:
        yield engine


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, smollm2_path):
    """A bundle converted from two dozen synthetic reviews (`helpers.tiny_convert`), shared by the session: tests
    read it and never change it (copy it first)."""
    return tiny_convert(tmp_path_factory.mktemp("convert"), smollm2_path)
