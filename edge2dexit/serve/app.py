"""The HTTP service: one classifier behind a small JSON API, a WebSocket for text as it arrives, and a page.

Endpoints (README "Embedding in an app"):
- `POST /v1/classify` `{"text": …}` → the Result as JSON; `{"texts": [...]}` → one Result (or error record) per
  text, in order; `"policy"` optional;
- `POST /predict` `{"inputs": str | [str]}` → `[{"label", "score"}]` (or one such list per input), the shape of
  text-embeddings-inference;
- `WS /v1/stream?policy=…`: messages `{"text": piece}`, `{"finish": true}`, `{"reset": true}`, each answered by a
  report (`streams.Session`): the decision the moment it is made, and what was read;
- `GET /health`, `GET /v1/bundle` (labels, policies, base model, model card), `GET /metrics` (Prometheus);
- `GET /`: the page (`static/`), which shows where reading stopped as you type.

Every text goes through the one engine thread (`worker.Worker`). Errors are one JSON object, never a traceback:
`{"error": message, "kind": class name, "exit_code": n}` (+ `"field"` where a field is at fault): 413 for a body over
`max_body`, 422 for a body or field the service cannot read (`RequestError`, exit code 2: usage) and for a text the
library refuses (its message and exit code: 3 bad text, 6 too long for the context), 401 without the API key,
503 with Retry-After when the queue is full or the service is stopping.

Safe by default: the CLI binds to loopback, only loopback host names are accepted there (no DNS rebinding), CORS is
off unless origins are named, a WebSocket from another origin is refused (browsers do not apply CORS to them),
and with an API key every endpoint but the page and /health needs it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..bundle import MODEL_CARD
from ..classifier import Classifier, Result
from ..errors import Edge2DExitError, SettingsError
from .metrics import CONTENT_TYPE, Metrics
from .settings import LOOPBACK, ServeSettings
from .streams import Session
from .worker import Overloaded, ShuttingDown, Worker

STATIC = "static"
PUBLIC_PATHS, PUBLIC_PREFIX = ("/", "/health"), "/static/"  # open without the API key
ENDPOINTS = ("/", "/health", "/v1/bundle", "/v1/classify", "/predict", "/v1/stream", "/metrics")
SUBPROTOCOL = "edge2dexit"  # what a browser's WebSocket asks for; the key may ride beside it as "bearer.<base64url>"
CLIENT_GONE = 499  # the status recorded for a request whose client left before its answer (nginx's)


class RequestError(Edge2DExitError):
    """A request the service cannot read: its body, a field or a value (HTTP 422, or 413 for a body too large)."""

    exit_code = 2

    def __init__(self, message: str, field: str | None = None, status: int = 422):
        super().__init__(message)
        self.field, self.status = field, status


def create_app(classifier: Classifier, settings: ServeSettings) -> Starlette:
    """The service over `classifier`, whose engine has `settings.streams` sequences beyond the batch's width (see
    `server.open_classifier`). The app starts its engine thread when it starts and ends it when it stops; the
    classifier stays the caller's to close."""
    service = _Service(classifier, settings)
    trusted = ["*"] if settings.host in ("0.0.0.0", "::", "") else sorted({LOOPBACK, "localhost", settings.host})
    middleware = [Middleware(_Metered, metrics=service.metrics),
                  Middleware(TrustedHostMiddleware, allowed_hosts=trusted)]
    if settings.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                                     allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]))
    if settings.api_key:
        middleware.append(Middleware(_BearerKey, key=settings.api_key))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.worker.stop)

    app = Starlette(
        routes=[
            Route("/", service.page),
            Route("/health", service.health),
            Route("/v1/bundle", service.bundle),
            Route("/v1/classify", service.classify, methods=["POST"]),
            Route("/predict", service.predict, methods=["POST"]),
            Route("/metrics", service.metrics_text),
            WebSocketRoute("/v1/stream", service.stream),
            Mount("/static", StaticFiles(packages=[("edge2dexit.serve", STATIC)]), name="static"),
        ],
        middleware=middleware,
        exception_handlers={
            Edge2DExitError: service.error,
            Overloaded: service.error,
            ShuttingDown: service.error,
            _ClientGone: _client_gone,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
        lifespan=lifespan,
    )
    app.state.worker = service.worker
    return app


class _Service:
    def __init__(self, classifier: Classifier, settings: ServeSettings):
        self.classifier, self.settings = classifier, settings
        width = classifier.engine.settings.width - settings.streams
        if width < 1:
            raise SettingsError(f"the engine's {classifier.engine.settings.width} sequences leave none for the "
                                f"batch beside {settings.streams} streams")
        self.worker = Worker(classifier, width, max(settings.queue, width))
        self.metrics = Metrics(self.worker)

    # --- endpoints ---------------------------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        return FileResponse(_static_file("index.html"), headers={
            "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'"})

    async def health(self, request: Request) -> Response:
        if self.worker.refusing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def bundle(self, request: Request) -> Response:
        bundle, engine = self.classifier.bundle, self.classifier.engine
        card = bundle.directory / MODEL_CARD if bundle.directory is not None else None
        return JSONResponse({
            "labels": list(bundle.labels),
            "policies": bundle.policies,
            "default_policy": self.classifier.policy_name,
            "base_model": {"name": bundle.base.name, "sha256": bundle.base.sha256,
                           "architecture": bundle.base.architecture, "n_layer": bundle.base.n_layer,
                           "n_embd": bundle.base.n_embd},
            "card": card.read_text(encoding="utf-8", errors="replace") if card is not None and card.is_file() else None,
            "context": {"n_ctx": engine.settings.n_ctx, "tokens_per_text": engine.capacity},
            "service": {"width": self.worker.width, "streams": self.worker.streams, "queue": self.worker.queue},
        })

    async def classify(self, request: Request) -> Response:
        body = await self._body(request, {"text", "texts", "policy"})
        policy = self._policy(body.get("policy"))
        if ("text" in body) == ("texts" in body):
            raise RequestError('give "text" (one text) or "texts" (a list of texts)', field="text")
        if "text" in body:
            (outcome,) = await self._classify(request, [_string(body["text"], "text")], policy)
            if isinstance(outcome, Edge2DExitError):
                raise outcome
            return JSONResponse(outcome.to_dict())
        outcomes = await self._classify(request, self._strings(body["texts"], "texts"), policy)
        return JSONResponse([o.to_dict() if isinstance(o, Result) else _error_body(o) for o in outcomes])

    async def predict(self, request: Request) -> Response:
        body = await self._body(request, {"inputs"})
        if "inputs" not in body:
            raise RequestError('give "inputs": a text or a list of texts', field="inputs")
        one = isinstance(body["inputs"], str)
        texts = [body["inputs"]] if one else self._strings(body["inputs"], "inputs")
        outcomes = await self._classify(request, texts, self.classifier.policy_name)
        for k, outcome in enumerate(outcomes):
            if isinstance(outcome, Edge2DExitError):
                outcome.field = "inputs" if one else f"inputs[{k}]"
                raise outcome
        answers = [outcome.as_pipeline() for outcome in outcomes]
        return JSONResponse(answers[0] if one else answers)

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def stream(self, websocket: WebSocket) -> None:
        """One stream per connection, on a sequence reserved for it until the connection ends."""
        try:
            if not self._same_origin_or_allowed(websocket):
                raise RequestError("a page from another origin may not open a stream (name it with --cors-origin)",
                                   status=403)
            policy = self._policy(websocket.query_params.get("policy"))
            seq = self.worker.reserve_stream()
        except (RequestError, Overloaded, ShuttingDown) as exc:
            await websocket.send_denial_response(self._error_response(exc))
            return
        session: Session | None = None
        try:
            session = await self._on_engine(lambda: Session(self.classifier, seq, policy))
            offered = websocket.scope.get("subprotocols", [])
            await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
            self.metrics.streams.inc()
            decided = False  # the text under way was counted
            while True:
                message = await websocket.receive_text()
                try:
                    step = _stream_step(message)
                    reply = await self._on_engine(lambda: step(session))
                except Edge2DExitError as exc:
                    if not isinstance(exc, RequestError):
                        self.metrics.outcome(exc)
                    reply = _error_body(exc)
                result = session.stream.result
                if result is not None and not decided:
                    self.metrics.outcome(result)
                decided = result is not None
                await websocket.send_json(reply)
        except WebSocketDisconnect:
            pass
        except ShuttingDown:
            await websocket.close(code=1012)  # service restart
        finally:
            if session is not None:
                await self._on_engine(session.close, closing=True)
            self.worker.release_stream(seq)

    # --- errors ------------------------------------------------------------------------------------------------

    async def error(self, request: Request, exc: Exception) -> Response:
        return self._error_response(exc)

    def _error_response(self, exc: Exception) -> Response:
        """503 with Retry-After for a full queue or a service that is stopping; 413 or 422 for a request it
        cannot read (RequestError); 422 for a text the library refused (empty, binary, too long...)."""
        if isinstance(exc, (Overloaded, ShuttingDown)):
            return JSONResponse({"error": str(exc), "kind": type(exc).__name__}, status_code=503,
                                headers={"Retry-After": str(self.settings.retry_after)})
        assert isinstance(exc, Edge2DExitError)
        return JSONResponse(_error_body(exc), status_code=exc.status if isinstance(exc, RequestError) else 422)

    # --- helpers -----------------------------------------------------------------------------------------------

    async def _classify(self, request: Request, texts: list[str], policy: str) -> list[Result | Edge2DExitError]:
        """Each text's outcome, once all are read; if the client leaves first, its texts are dropped (those in
        flight after their current decode) and the request ends as CLIENT_GONE."""
        futures = self.worker.classify(texts, policy)
        answers = asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({answers, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not answers.done():
            for future in futures:
                future.cancel()
            answers.cancel()
            self.metrics.cancelled.inc()
            raise _ClientGone
        gone.cancel()
        outcomes = answers.result()
        for outcome in outcomes:
            self.metrics.outcome(outcome)
        return outcomes

    async def _on_engine(self, fn: Callable[[], Any], closing: bool = False) -> Any:
        """`fn()` run on the engine thread. `closing`: cleaning up, when the engine may already have stopped."""
        try:
            return await asyncio.wrap_future(self.worker.call(fn))
        except ShuttingDown:
            if not closing:
                raise

    async def _body(self, request: Request, fields: set[str]) -> dict[str, Any]:
        """The JSON object in the body, at most `max_body` bytes, with no field but `fields`."""
        limit = self.settings.max_body
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise _too_large(len(raw), limit)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested past Python's stack
            raise RequestError(f"the body is not JSON ({exc})", field="body") from None
        if not isinstance(body, dict):
            raise RequestError(f"the body must be a JSON object, not {_json_type(body)}", field="body")
        unknown = sorted(set(body) - fields)
        if unknown:
            raise RequestError(f"unknown field {unknown[0]!r}; this endpoint reads {', '.join(sorted(fields))}",
                               field=unknown[0])
        return body

    def _policy(self, name: Any) -> str:
        if name is None:
            return self.classifier.policy_name
        if name not in self.classifier.bundle.policies:
            raise RequestError(f"unknown policy {name!r}; this bundle has {', '.join(self.classifier.bundle.policies)}",
                               field="policy")
        return name

    def _strings(self, value: Any, field: str) -> list[str]:
        if not isinstance(value, list) or not value:
            raise RequestError(f'"{field}" must be a non-empty list of texts, not {_json_type(value)}', field=field)
        if len(value) > self.worker.queue:
            raise RequestError(f'"{field}" holds {len(value)} texts; at most {self.worker.queue} in one request',
                               field=field)
        return [_string(text, f"{field}[{k}]") for k, text in enumerate(value)]

    def _same_origin_or_allowed(self, websocket: WebSocket) -> bool:
        origin = websocket.headers.get("origin")
        return (origin is None or origin in self.settings.cors_origins
                or urlsplit(origin).netloc == websocket.headers.get("host"))


class _ClientGone(Exception):
    """The client left before its answer."""


def _stream_step(message: str) -> Callable[[Session], dict[str, Any]]:
    """What one stream message asks of the session."""
    try:
        body = json.loads(message)
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"a stream message must be JSON ({exc})", field="message") from None
    if not isinstance(body, dict) or len(body) != 1 or not set(body) <= {"text", "finish", "reset"}:
        raise RequestError('a stream message is {"text": piece}, {"finish": true} or {"reset": true}',
                           field="message")
    (name, value), = body.items()
    if name == "text":
        piece = _string(value, "text")
        return lambda session: session.feed(piece)
    if value is not True:
        raise RequestError(f'"{name}" must be true', field=name)
    return Session.finish if name == "finish" else Session.reset


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f'"{field}" must be a string, not {_json_type(value)}', field=field)
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _too_large(size: int, limit: int) -> RequestError:
    return RequestError(f"the body is {size} bytes or more; at most {limit}", field="body", status=413)


def _error_body(exc: Edge2DExitError) -> dict[str, Any]:
    body = {"error": str(exc), "kind": type(exc).__name__, "exit_code": exc.exit_code}
    if getattr(exc, "field", None) is not None:
        body["field"] = exc.field
    return body


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=CLIENT_GONE)  # nobody reads it; the metrics count it


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail, "kind": "HTTPException"}, status_code=exc.status_code,
                        headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug: one line to the client (the traceback goes to the server's log)."""
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); please report it", "kind": "InternalError",
                         "exit_code": 1}, status_code=500)


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone away (after its body was read, uvicorn says nothing else)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _static_file(name: str) -> str:
    from importlib.resources import files

    return str(files("edge2dexit.serve") / STATIC / name)


class _BearerKey:
    """Every request but the public paths needs `Authorization: Bearer KEY`. A browser's WebSocket, which cannot
    set headers, may offer the key as a subprotocol: `bearer.<KEY in base64url>`, beside "edge2dexit"."""

    def __init__(self, app: ASGIApp, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] not in ("http", "websocket") or scope["path"] in PUBLIC_PATHS
                or scope["path"].startswith(PUBLIC_PREFIX) or self._allowed(scope)):
            await self.app(scope, receive, send)
            return
        response = JSONResponse({"error": "this service needs its API key: Authorization: Bearer KEY",
                                 "kind": "Unauthorized"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        if scope["type"] == "http":
            await response(scope, receive, send)
        else:
            await WebSocket(scope, receive, send).send_denial_response(response)

    def _allowed(self, scope: Scope) -> bool:
        keys = [value.removeprefix(b"Bearer ") for name, value in scope["headers"]
                if name == b"authorization" and value.startswith(b"Bearer ")]
        keys += [_unbase64(p.removeprefix("bearer.")) for p in scope.get("subprotocols", ()) if p.startswith("bearer.")]
        return any(hmac.compare_digest(key, self.key) for key in keys)


def _unbase64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return b""


class _Metered:
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
