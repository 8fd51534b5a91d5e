"""Options shared by several commands; their defaults come from the library's settings, never retyped here."""

from __future__ import annotations

from typing import Optional

import typer

from ..engine import EngineSettings
from ..policies import POLICIES

_ENGINE = EngineSettings()

N_CTX = typer.Option(_ENGINE.n_ctx, "--n-ctx", help="Tokens per document: task prompt + text.")
WIDTH = typer.Option(_ENGINE.width, "--width", "-w", min=1, max=255,
                     help="Documents read at once in shared llama.cpp decodes.")
THREADS = typer.Option(_ENGINE.n_threads, "--threads", help="CPU threads for llama.cpp (default: every core available).")
GPU_LAYERS = typer.Option(_ENGINE.n_gpu_layers, "--gpu-layers", help="Layers to offload with a GPU build of llama.cpp.")


def engine_settings(n_ctx: int, width: int = _ENGINE.width, threads: Optional[int] = None,
                    gpu_layers: int = _ENGINE.n_gpu_layers) -> EngineSettings:
    return EngineSettings(n_ctx=n_ctx, width=width, n_threads=threads, n_gpu_layers=gpu_layers)


def check_policy(name: Optional[str]) -> Optional[str]:
    if name is not None and name not in POLICIES:
        raise typer.BadParameter(f"{name!r} is not one of {', '.join(POLICIES)}")
    return name


POLICY = typer.Option(None, "--policy", "-p", callback=check_policy,
                      help=f"{' | '.join(POLICIES)} (default: the bundle's).")
