"""Options shared by several commands; their defaults come from the library's settings, never retyped here. Nothing
here loads llama.cpp: `--help` and commands that read no model must not start it (on a CUDA build that would
initialise the GPU)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Optional

import typer

from ..errors import SettingsError
from ..settings import EngineSettings



def defaults(settings: type) -> SimpleNamespace:
    """The defaults of a settings dataclass, read off its fields without making one (making one checks it, which
    may load what `--help` must not)."""
    return SimpleNamespace(**{f.name: f.default for f in dataclasses.fields(settings)
                              if f.default is not dataclasses.MISSING})


_ENGINE = defaults(EngineSettings)

BUNDLE = typer.Option(None, "--bundle", "-b", help="Bundle directory or exits.gguf (default: the built-in "
                                                    "sentiment bundle).")
MODEL = typer.Option(None, "--model", "-m", help="Base model: registry name or GGUF path (default: the bundle's).")
N_CTX = typer.Option(_ENGINE.n_ctx, "--n-ctx", min=16, help="Tokens per document: task prompt + text.")
WIDTH = typer.Option(_ENGINE.width, "--width", "-w", min=1, max=255, show_default="1 on a CPU, 32 on a GPU",
                     help="Documents read at once in shared llama.cpp decodes.")
THREADS = typer.Option(_ENGINE.n_threads, "--threads", min=1,
                       help="CPU threads for llama.cpp (default: every core available).")
LEXICAL = typer.Option(True, "--lexical/--no-lexical", help="Let the bundle's lexical exit answer where the words "
                       "alone decide (where the bundle has one); --no-lexical: the LLM reads every text.")
GPU_LAYERS = typer.Option(_ENGINE.n_gpu_layers, "--gpu-layers", min=0, show_default="every layer on a GPU build",
                          help="Layers to offload with a GPU build of llama.cpp (0: none).")


def engine_settings(n_ctx: int, width: Optional[int] = _ENGINE.width, threads: Optional[int] = None,
                    gpu_layers: Optional[int] = _ENGINE.n_gpu_layers) -> EngineSettings:
    try:
        return EngineSettings(n_ctx=n_ctx, width=width, n_threads=threads, n_gpu_layers=gpu_layers)
    except SettingsError as exc:
        raise typer.BadParameter(str(exc)) from None


def _policy_names() -> tuple[str, ...]:
    """The registered policies, looked up only when an option names one (the registry loads numpy, which `--help`
    must not)."""
    from ..policies import policy_names

    return policy_names()


def check_policy(name: Optional[str]) -> Optional[str]:
    if name is not None and name not in _policy_names():
        raise typer.BadParameter(f"{name!r} is not one of {', '.join(_policy_names())}")
    return name


def check_policies(value: Optional[str]) -> Optional[tuple[str, ...]]:
    """A comma-separated list of policy names, each checked."""
    if value is None:
        return None
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in names if name not in _policy_names()]
    if unknown or not names:
        raise typer.BadParameter(f"{', '.join(unknown) or 'nothing'}: choose among {', '.join(_policy_names())}")
    return names


POLICY = typer.Option(None, "--policy", "-p", callback=check_policy,
                      help="An exit policy of the bundle, e.g. prefix-mean, full or paper2d (default: the bundle's; "
                           "a wrong name lists them all).")
