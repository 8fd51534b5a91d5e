"""Every default of the service, in one place: the CLI's options and the load test read them from here."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SettingsError

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ServeSettings:
    host: str = LOOPBACK  # loopback: only programs on this machine can connect
    port: int = 8765
    api_key: str | None = None  # set: every request but `/` and `/health` needs `Authorization: Bearer KEY`
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API from their pages (none: CORS off)
    streams: int = 4  # streams open at once, each on a sequence of its own beside the batch's `width`
    queue: int = 256  # texts accepted and not yet answered, in flight included (at least the width); past it: 503
    max_body: int = 4 << 20  # bytes of one request body; past it: 413
    retry_after: int = 1  # seconds a refused client is told to wait (503)

    def __post_init__(self) -> None:
        problems = [f"{name} must be at least {least}, got {value}"
                    for name, value, least in (("port", self.port, 0), ("streams", self.streams, 0),
                                               ("queue", self.queue, 1), ("max_body", self.max_body, 1))
                    if value < least]
        if problems:
            raise SettingsError("; ".join(problems))
