"""What stands before every endpoint: the host check (no DNS rebinding), the API key, and the metering of every HTTP
request. Each refuses with the service's one error body (requests.error_body), over HTTP or as a WebSocket's denial."""

from __future__ import annotations

import base64
import binascii
import hmac

from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from .metrics import Metrics
from .requests import RequestError, error_response

PUBLIC_PATHS, PUBLIC_PREFIX = ("/", "/health"), "/static/"  # open without the API key
ENDPOINTS = ("/", "/health", "/v1/bundle", "/v1/classify", "/predict", "/v1/stream", "/metrics")


async def refuse(scope: Scope, receive: Receive, send: Send, error: RequestError) -> None:
    """Answer an HTTP request or a WebSocket handshake with `error`'s body."""
    response = error_response(error, retry_after=0)
    if scope["type"] == "http":
        await response(scope, receive, send)
    else:
        await WebSocket(scope, receive, send).send_denial_response(response)


class HostCheck:
    """Only the host names allowed (loopback names where the service listens on loopback) may be asked for: a web page
    cannot reach the service through DNS rebinding. `allowed` None: any host."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...] | None):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and self.allowed is not None:
            host = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"host"), "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.strip("[]") not in self.allowed:
                await refuse(scope, receive, send, RequestError(
                    f"this service answers to {', '.join(self.allowed)} only, not {host!r}", status=400,
                    kind="BadHost"))
                return
        await self.app(scope, receive, send)


class BearerKey:
    """Every request but the public paths needs `Authorization: Bearer KEY` (the scheme in any case, RFC 7235). A
    browser's WebSocket, which cannot set headers, may offer the key as a subprotocol: `bearer.<KEY in base64url>`,
    beside "edge2dexit"."""

    def __init__(self, app: ASGIApp, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] not in ("http", "websocket") or scope["path"] in PUBLIC_PATHS
                or scope["path"].startswith(PUBLIC_PREFIX) or self._allowed(scope)):
            await self.app(scope, receive, send)
            return
        await refuse(scope, receive, send, RequestError(
            "this service needs its API key: Authorization: Bearer KEY", status=401, kind="Unauthorized"))

    def _allowed(self, scope: Scope) -> bool:
        keys = []
        for name, value in scope["headers"]:
            scheme, _, key = value.partition(b" ")
            if name == b"authorization" and scheme.lower() == b"bearer":
                keys.append(key.strip())
        keys += [_unbase64(p.removeprefix("bearer.")) for p in scope.get("subprotocols", ()) if p.startswith("bearer.")]
        return any(hmac.compare_digest(key, self.key) for key in keys)


def _unbase64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return b""


class Metered:
    """Counts every HTTP request by endpoint and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500

        async def send_noting_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with self.metrics.latency.labels(endpoint).time():
            try:
                await self.app(scope, receive, send_noting_status)
            finally:
                self.metrics.requests.labels(endpoint, str(status)).inc()
