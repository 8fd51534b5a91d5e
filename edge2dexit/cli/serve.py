"""`edge2dexit serve`: the classifier as a local HTTP service, for apps in any language (edge2dexit/serve/)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import SettingsError
from ..serve.settings import LOOPBACK, ServeSettings
from .app import app, friendly
from .options import BUNDLE, GPU_LAYERS, LEXICAL, MODEL, N_CTX, POLICY, THREADS, WIDTH, engine_settings

_SERVE = ServeSettings()


@app.command()
@friendly
def serve(
    bundle: Optional[Path] = BUNDLE,
    model: Optional[str] = MODEL,
    policy: Optional[str] = POLICY,
    lexical: bool = LEXICAL,
    host: str = typer.Option(_SERVE.host, "--host", help="Address to listen on; anything but loopback lets other "
                                                         "machines in (set --api-key)."),
    port: int = typer.Option(_SERVE.port, "--port", min=0, max=65535, help="Port (0: any free one, printed)."),
    api_key: Optional[str] = typer.Option(_SERVE.api_key, "--api-key", envvar="EDGE2DEXIT_API_KEY",
                                          help="Require `Authorization: Bearer KEY` on every endpoint but / and "
                                               "/health (from the environment, it stays out of `ps`)."),
    cors_origin: List[str] = typer.Option(list(_SERVE.cors_origins), "--cors-origin",
                                          help="A browser origin allowed to call the API, e.g. "
                                               "http://localhost:3000 (repeatable; default: none, CORS off)."),
    streams: int = typer.Option(_SERVE.streams, "--streams", min=0, help="Streams open at once (/v1/stream), each "
                                                                         "on a sequence of its own."),
    queue: int = typer.Option(_SERVE.queue, "--queue", min=1, help="Texts accepted and not yet answered; past it "
                                                                   "a request gets 503 with Retry-After."),
    max_body: int = typer.Option(_SERVE.max_body, "--max-body", min=1, help="Bytes of one request; past it: 413."),
    truncate: bool = typer.Option(False, "--truncate", help="Read a text longer than the context as far as it fits "
                                                            "instead of refusing it (a request may say \"truncate\"; "
                                                            "a stream always reads what fits)."),
    n_ctx: int = N_CTX,
    width: Optional[int] = WIDTH,
    threads: Optional[int] = THREADS,
    gpu_layers: Optional[int] = GPU_LAYERS,
) -> None:
    """Serve the classifier over HTTP on this machine: POST /v1/classify and /predict, a WebSocket stream at
    /v1/stream, /health, /v1/bundle, /metrics, and a page at / that shows where reading stopped. Every client
    shares one engine: texts sent at the same time are read together, --width at a time."""
    try:
        from ..serve.server import open_classifier, serve as run
    except ImportError as exc:
        raise SettingsError(f"serve needs the serve extra ({exc.name} is missing): pip install "
                            "'edge2dexit[serve]'") from None

    settings = ServeSettings(host=host, port=port, api_key=api_key or None, cors_origins=tuple(cors_origin),
                             streams=streams, queue=queue, max_body=max_body)
    if host not in (LOOPBACK, "localhost", "::1") and not settings.api_key:
        typer.echo(f"edge2dexit: warning: listening on {host} without --api-key: anyone who can reach this "
                   "machine can use the service", err=True)
    engine = engine_settings(n_ctx, width, threads, gpu_layers)
    with open_classifier(bundle, model, policy, engine, settings, lexical, truncate) as clf:
        run(clf, settings, ready=lambda url: typer.echo(
            f"edge2dexit: serving {url} (labels {', '.join(clf.labels)}, policy "
            f"{clf.policy_name}, width {clf.engine.settings.width - streams}, {streams} streams)", err=True))
