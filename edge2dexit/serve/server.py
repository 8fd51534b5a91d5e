"""Running the service: the classifier it needs, and uvicorn around the app.

SIGTERM (or Ctrl-C) stops uvicorn from accepting connections; at that moment every text not yet started is
refused with 503 (`Worker.refuse_waiting`), the texts in flight finish and are answered, open streams are closed
(WebSocket code 1012, "service restart"), and the process ends. No request is left without an answer or a refusal.
"""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path
from typing import Callable

import uvicorn

from ..classifier import Classifier
from ..errors import SettingsError
from ..llama import gpu_offload
from ..settings import EngineSettings
from .app import create_app
from .settings import ServeSettings
from .worker import Worker


def open_classifier(bundle: str | Path | None, model: str | Path | None, policy: str | None, engine: EngineSettings,
                    settings: ServeSettings, lexical: bool, truncate: bool = False) -> Classifier:
    """The service's classifier: `engine.width` sequences (the backend's default if None) for texts read together,
    and `settings.streams` more, one per open stream; `lexical` and `truncate` as for `Classifier`."""
    width = engine.for_backend(gpu_offload()).width
    return Classifier(bundle, model=model, policy=policy, settings=replace(engine, width=width + settings.streams),
                      lexical=lexical, truncate=truncate)


def serve(classifier: Classifier, settings: ServeSettings, ready: Callable[[str], None] = lambda url: None) -> None:
    """Serve `classifier` until SIGTERM or Ctrl-C; `ready(url)` once it listens (with the real port if
    `settings.port` is 0)."""
    app = create_app(classifier, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                            ws_max_size=settings.max_body, lifespan="on")
    server = _Server(config, app.state.worker, ready)
    try:
        server.run()
    except SystemExit:  # uvicorn's way to say it could not listen (its log says why)
        raise SettingsError(f"cannot listen on {settings.host} port {settings.port}: in use, or not an address of "
                            "this machine") from None


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, worker: Worker, ready: Callable[[str], None]):
        super().__init__(config)
        self.worker, self.ready = worker, ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.ready(f"http://{f'[{host}]' if ':' in host else host}:{port}/")

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.worker.refuse_waiting()
        await super().shutdown(sockets)
