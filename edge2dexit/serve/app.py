"""The HTTP service: one classifier behind a small JSON API, a WebSocket for text as it arrives, and a page.

Endpoints (README "Embedding in an app"):
- `POST /v1/classify` `{"text": …}` → the Result as JSON; `{"texts": [...]}` → one Result (or error record) per
  text, in order; `"policy"`, `"max_error"`, `"coverage"` and `"truncate"` optional, per request;
- `POST /predict` `{"inputs": str | [str], "truncate": bool}` → `[{"label", "score"}]` (or one such list per input),
  the shape of text-embeddings-inference (its `raw_scores`, `truncation_direction` and `parameters` are refused by
  name);
- `WS /v1/stream?policy=…&max_error=…&coverage=…`: messages `{"text": piece}`, `{"finish": true}`, `{"reset": true}`,
  each answered by a report (`streams.Session`): the decision the moment it is made, and what was read;
- `GET /health`, `GET /v1/bundle` (labels, policies, base model, model card), `GET /metrics` (Prometheus);
- `GET /`: the page (`static/`), which shows where reading stopped as you type.

Every text goes through the one engine thread (`worker.Worker`). What stands before the endpoints (host check, API
key, metering) is in `middleware`; what a request may hold, and the one error body of every refusal, in `requests`.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..bundle import MODEL_CARD
from ..classifier import Classifier, Result
from ..errors import Edge2DExitError, SettingsError
from ..reader import Answering
from .metrics import CONTENT_TYPE, Metrics
from .middleware import BearerKey, HostCheck, Metered
from .requests import TEI_REFUSED, RequestError, error_body, error_response, promises, read_body, stream_step, \
    string, strings
from .settings import LOOPBACK, ServeSettings
from .streams import Session
from .worker import ShuttingDown, Worker

STATIC = "static"
SUBPROTOCOL = "edge2dexit"  # what a browser's WebSocket asks for; the key may ride beside it as "bearer.<base64url>"
CLIENT_GONE = 499  # the status recorded for a request whose client left before its answer (nginx's)
STREAM_QUERY = ("policy", "max_error", "coverage")  # what a stream's URL may set


def create_app(classifier: Classifier, settings: ServeSettings) -> Starlette:
    """The service over `classifier`, whose engine has `settings.streams` sequences beyond the batch's width (see
    `server.open_classifier`). The app starts its engine thread when it starts and ends it when it stops; the
    classifier stays the caller's to close."""
    service = _Service(classifier, settings)
    hosts = None if settings.host in ("0.0.0.0", "::", "") else tuple(sorted({LOOPBACK, "localhost", "::1",
                                                                                 settings.host}))
    middleware = [Middleware(Metered, metrics=service.metrics), Middleware(HostCheck, allowed=hosts)]
    if settings.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                                     allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]))
    if settings.api_key:
        middleware.append(Middleware(BearerKey, key=settings.api_key))

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
            _ClientGone: _client_gone,
            HTTPException: service.http_error,
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
        body = await read_body(request, {"text", "texts", "policy", "max_error", "coverage", "truncate"},
                               self.settings.max_body)
        answering = self._answering(body.get("policy"), body)
        if ("text" in body) == ("texts" in body):
            raise RequestError('give "text" (one text) or "texts" (a list of texts)', field="text")
        if "text" in body:
            (outcome,) = await self._classify(request, [string(body["text"], "text")], answering)
            if isinstance(outcome, Edge2DExitError):
                raise outcome
            return JSONResponse(outcome.to_dict())
        outcomes = await self._classify(request, strings(body["texts"], "texts", self.worker.queue), answering)
        return JSONResponse([o.to_dict() if isinstance(o, Result) else error_body(o) for o in outcomes])

    async def predict(self, request: Request) -> Response:
        body = await read_body(request, {"inputs", "truncate"}, self.settings.max_body, refused=TEI_REFUSED)
        if "inputs" not in body:
            raise RequestError('give "inputs": a text or a list of texts', field="inputs")
        one = isinstance(body["inputs"], str)
        texts = [body["inputs"]] if one else strings(body["inputs"], "inputs", self.worker.queue)
        outcomes = await self._classify(request, texts, self._answering(None, body))
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
            query = self._stream_query(websocket)
            seq = self.worker.reserve_stream()
        except Edge2DExitError as exc:
            await websocket.send_denial_response(self._response(exc))
            return
        session: Session | None = None
        try:
            session = await self._on_engine(lambda: Session(self.classifier, seq, **query))
            offered = websocket.scope.get("subprotocols", [])
            await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
            self.metrics.streams.inc()
            await self._converse(websocket, session)
        except WebSocketDisconnect:
            pass
        except ShuttingDown:
            await websocket.close(code=1012)  # service restart
        finally:
            if session is not None:
                await self._on_engine(session.close, closing=True)
            self.worker.release_stream(seq)

    async def _converse(self, websocket: WebSocket, session: Session) -> None:
        """Answer each message of an open stream with one report; count each text's outcome once."""
        decided = False  # the text under way was counted
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            try:
                step = stream_step(message["text"] if message.get("text") is not None else message.get("bytes"))
                reply = await self._on_engine(lambda: step(session))
            except ShuttingDown:
                raise
            except Edge2DExitError as exc:
                if not isinstance(exc, RequestError):
                    self.metrics.outcome(exc)
                reply = error_body(exc)
            result = session.stream.result
            if result is not None and not decided:
                self.metrics.outcome(result)
            decided = result is not None
            await websocket.send_json(reply)

    # --- errors ------------------------------------------------------------------------------------------------

    async def error(self, request: Request, exc: Exception) -> Response:
        return self._response(exc)

    async def http_error(self, request: Request, exc: Exception) -> Response:
        """Routing's refusals (404, 405) in the service's one error body."""
        assert isinstance(exc, HTTPException)
        kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        return self._response(RequestError(f"{request.method} {request.url.path}: {exc.detail}",
                                           status=exc.status_code, kind=kind))

    def _response(self, exc: Edge2DExitError) -> Response:
        return error_response(exc, self.settings.retry_after)

    # --- helpers -----------------------------------------------------------------------------------------------

    def _answering(self, policy: Any, values: dict[str, Any]) -> Answering:
        """How the texts of a request are answered: its policy, what it asks to be promised, and truncation."""
        if policy is not None and policy not in self.classifier.bundle.policies:
            raise RequestError(f"unknown policy {policy!r}; this bundle has "
                               f"{', '.join(self.classifier.bundle.policies)}", field="policy")
        return self.classifier.reader.answering(policy, **promises(values))

    def _stream_query(self, websocket: WebSocket) -> dict[str, Any]:
        """A stream's policy and promises, from its URL; anything else there is refused."""
        params = websocket.query_params
        unknown = sorted(set(params) - set(STREAM_QUERY))
        if unknown:
            raise RequestError(f"unknown query parameter {unknown[0]!r}; a stream reads {', '.join(STREAM_QUERY)}",
                               field=unknown[0])
        values: dict[str, Any] = {}
        for name in ("max_error", "coverage"):
            if name in params:
                try:
                    values[name] = float(params[name])
                except ValueError:
                    raise RequestError(f"{name} must be a number in (0, 1), not {params[name]!r}",
                                       field=name) from None
        policy = params.get("policy")
        answering = self._answering(policy, values)  # what the bundle cannot promise is refused here
        return {"policy": answering.policy, "max_error": values.get("max_error"), "coverage": values.get("coverage")}

    async def _classify(self, request: Request, texts: list[str],
                        answering: Answering) -> list[Result | Edge2DExitError]:
        """Each text's outcome, once all are read (a text the service could not start, it stopping, gets its
        refusal in its place); if the client leaves first, its texts are dropped (those in flight after their
        current decode) and the request ends as CLIENT_GONE."""
        futures = self.worker.classify(texts, answering)
        answers = asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
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
            if isinstance(outcome, BaseException) and not isinstance(outcome, Edge2DExitError):
                raise outcome  # a bug
            self.metrics.outcome(outcome)
        return outcomes

    async def _on_engine(self, fn: Callable[[], Any], closing: bool = False) -> Any:
        """`fn()` run on the engine thread. `closing`: cleaning up, when the engine may already have stopped."""
        try:
            return await asyncio.wrap_future(self.worker.call(fn))
        except ShuttingDown:
            if not closing:
                raise

    def _same_origin_or_allowed(self, websocket: WebSocket) -> bool:
        origin = websocket.headers.get("origin")
        return (origin is None or origin in self.settings.cors_origins
                or urlsplit(origin).netloc == websocket.headers.get("host"))


class _ClientGone(Exception):
    """The client left before its answer."""


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=CLIENT_GONE)  # nobody reads it; the metrics count it


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
