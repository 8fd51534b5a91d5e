"""Shared fixtures. Tests run the real llama.cpp on real small models, pulled into the user cache beforehand
(`edge2dexit models pull smollm2-135m gemma3-270m`, as .ci/run does): no test downloads anything."""

from __future__ import annotations

import pytest

from edge2dexit.engine import Engine, EngineSettings
from edge2dexit.errors import ModelError
from edge2dexit.models.registry import resolve_model

TASK_PROMPT = "Classify the sentiment of this movie review.\nReview:"
REVIEW = (
    "I went to see this movie last night with a couple of friends. The acting was wonderful, and the story kept "
    "me hooked from the first scene to the last. However, the ending felt rushed, as if the writers ran out of "
    "ideas. Still, I would recommend it to anyone who enjoys a good thriller. The music was great too. "
    "Overall, a solid film that I will happily watch again."
)


def _model_path(name: str) -> str:
    try:
        return str(resolve_model(name, pull_missing=False))
    except ModelError as exc:
        pytest.fail(f"{exc} (the test run expects it in the cache: edge2dexit models pull {name})")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return _model_path("smollm2-135m")


@pytest.fixture(scope="session")
def gemma_path() -> str:
    return _model_path("gemma3-270m")


@pytest.fixture(scope="session", params=["smollm2-135m", "gemma3-270m"])
def any_engine(request):
    """A real engine on each small model, shared by the tests of a session (loading takes ~0.5 s)."""
    with Engine(_model_path(request.param), EngineSettings(n_ctx=1024), prompt=TASK_PROMPT) as engine:
        yield engine


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_path):
    with Engine(smollm2_path, EngineSettings(n_ctx=1024), prompt=TASK_PROMPT) as engine:
        yield engine
