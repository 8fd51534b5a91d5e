"""What the service reads from a request or a stream message, checked, and the one error body every refusal gets.

Every error, from any layer (a middleware, routing, a request's body, the library, a full queue), is one JSON object:
`{"error": message, "kind": class, "exit_code": n}`, plus `"field"` where one field is at fault. `exit_code` is what
the CLI would exit with (README, Reliability): 2 for a request the service cannot read or is not allowed to make, the
library's own codes for a text it refuses (3 bad text, 6 too long), 75 for "busy or stopping, try again" (503).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable

from starlette.requests import Request
from starlette.responses import JSONResponse

from ..errors import Edge2DExitError, Unavailable
from .streams import Session

# The fields of TEI's /predict that mean something this service does not do: refused by name, not ignored
TEI_REFUSED = {
    "raw_scores": "scores are calibrated probabilities; raw logits are not given",
    "parameters": "pipeline parameters are not read; give the fields of the request instead",
    "truncation_direction": "texts are cut at their end only (truncate)",
}


class RequestError(Edge2DExitError):
    """A request the service cannot read or will not serve: its body, a field or a value (HTTP 422 unless `status`
    says otherwise: 413 too large, 401 no key, 404, 405, 400 a bad host, 403 another origin's page)."""

    exit_code = 2

    def __init__(self, message: str, field: str | None = None, status: int = 422, kind: str | None = None):
        super().__init__(message)
        self.field, self.status, self.kind = field, status, kind


def error_body(exc: Edge2DExitError) -> dict[str, Any]:
    body = {"error": str(exc), "kind": getattr(exc, "kind", None) or type(exc).__name__, "exit_code": exc.exit_code}
    if getattr(exc, "field", None) is not None:
        body["field"] = exc.field
    return body


def error_response(exc: Edge2DExitError, retry_after: int) -> JSONResponse:
    """The response of a refusal: 503 with Retry-After for Unavailable, a RequestError's own status, 422 for a text
    the library refused (empty, binary, too long...)."""
    if isinstance(exc, Unavailable):
        return JSONResponse(error_body(exc), status_code=503, headers={"Retry-After": str(retry_after)})
    headers = {"WWW-Authenticate": "Bearer"} if getattr(exc, "status", None) == 401 else None
    return JSONResponse(error_body(exc), status_code=getattr(exc, "status", 422), headers=headers)


async def read_body(request: Request, fields: Iterable[str], limit: int,
                    refused: dict[str, str] | None = None) -> dict[str, Any]:
    """The JSON object in the body, at most `limit` bytes, with no field but `fields` (a field of `refused` is
    refused with its reason)."""
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
        raise RequestError(f"the body must be a JSON object, not {json_type(body)}", field="body")
    for name in sorted(set(body) & set(refused or {})):
        raise RequestError(f'"{name}" is not supported here: {refused[name]}', field=name)
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}; this endpoint reads {', '.join(sorted(fields))}",
                           field=unknown[0])
    return body


def promises(values: dict[str, Any]) -> dict[str, Any]:
    """`max_error`, `coverage` (numbers in (0, 1)) and `truncate` (a boolean) as given, checked for their type; the
    classifier checks what the bundle can promise."""
    out = {}
    for name in ("max_error", "coverage"):
        value = values.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise RequestError(f'"{name}" must be a number in (0, 1), not {json_type(value)}', field=name)
        out[name] = value
    truncate = values.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise RequestError(f'"truncate" must be true or false, not {json_type(truncate)}', field="truncate")
    out["truncate"] = truncate
    return out


def string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f'"{field}" must be a string, not {json_type(value)}', field=field)
    return value


def strings(value: Any, field: str, most: int) -> list[str]:
    if not isinstance(value, list) or not value:
        raise RequestError(f'"{field}" must be a non-empty list of texts, not {json_type(value)}', field=field)
    if len(value) > most:
        raise RequestError(f'"{field}" holds {len(value)} texts; at most {most} in one request', field=field)
    return [string(text, f"{field}[{k}]") for k, text in enumerate(value)]


def stream_step(message: str | bytes) -> Callable[[Session], dict[str, Any]]:
    """What one stream message asks of the session."""
    if isinstance(message, bytes):
        raise RequestError("a stream message is a text frame of JSON, not a binary frame", field="message")
    try:
        body = json.loads(message)
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"a stream message must be JSON ({exc})", field="message") from None
    if not isinstance(body, dict) or len(body) != 1 or not set(body) <= {"text", "finish", "reset"}:
        raise RequestError('a stream message is {"text": piece}, {"finish": true} or {"reset": true}',
                           field="message")
    (name, value), = body.items()
    if name == "text":
        piece = string(value, "text")
        return lambda session: session.feed(piece)
    if value is not True:
        raise RequestError(f'"{name}" must be true', field=name)
    return Session.finish if name == "finish" else Session.reset


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _too_large(size: int, limit: int) -> RequestError:
    return RequestError(f"the body is {size} bytes or more; at most {limit}", field="body", status=413)
