"""remusd's HTTP API on aiohttp: routes declared once, checked by jsonschema, described by OpenAPI.

A :class:`Route` declares an operation: its handler, its request and response
schemas (JSON Schema 2020-12), its query parameters and the errors it may
answer with. From that one table :class:`ApiServer` builds an aiohttp
application per listener, validates every request with jsonschema's
Draft 2020-12 validator before its handler runs, and serves the OpenAPI 3.1
document of that very table at ``/v1/openapi.json``, so the document cannot
drift from what is enforced. Handlers take an aiohttp request: the path
parameters in ``match_info``, the checked body in ``request[BODY]`` and
the converted query in ``request[QUERY]``.

Errors always have the same JSON shape, from the router's 404 to a
malformed request line::

    {"error": {"code": "NOT_FOUND", "message": "...", "details": {...} | null}}

Codes are stable strings a client can switch on; messages are for people.
A handler that raises anything other than :class:`ApiError` gets a 500
``INTERNAL`` with an incident id that is also in the log next to the
traceback; the traceback itself never goes to the client.

Limits: a body over :data:`MAX_BODY` is a 413 (aiohttp's ``client_max_size``,
and Content-Length checked before reading); a body that takes longer than
:data:`REQUEST_TIMEOUT` to arrive is a 408; the request line and each header
are bounded by aiohttp's parser (``max_line_size``, ``max_field_size``,
``max_headers``); a connection that sends no whole request within
:data:`IDLE_TIMEOUT` of opening or of its last answer is closed (aiohttp's
keep-alive timer runs from the connection's start); an answer or an event
the client does not read within :data:`WRITE_TIMEOUT` ends the connection;
at most :data:`MAX_CONNECTIONS` connections per listener, event streams
included; a TLS handshake gets :data:`REQUEST_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import socket
import ssl
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, TypeVar, cast

from aiohttp import web
from jsonschema import Draft202012Validator, ValidationError

logger = logging.getLogger(__name__)

# The codes the framework itself answers with; routes declare their own (``Route.errors``).
FRAMEWORK_CODES: Final = ("BAD_REQUEST", "UNAUTHORIZED", "NOT_FOUND", "METHOD_NOT_ALLOWED",
                          "REQUEST_TIMEOUT", "PAYLOAD_TOO_LARGE", "UNSUPPORTED_MEDIA_TYPE",
                          "INTERNAL")  # fmt: skip
BAD_REQUEST: Final = "BAD_REQUEST"
INTERNAL: Final = "INTERNAL"

MAX_BODY: Final = 1 << 20
REQUEST_TIMEOUT: Final = 10.0
IDLE_TIMEOUT: Final = 60.0
WRITE_TIMEOUT: Final = 30.0
SHUTDOWN_GRACE: Final = 5.0
PING_INTERVAL: Final = 15.0
MAX_CONNECTIONS: Final = 256  # per listener, event streams included
MAX_QUERY_FIELDS: Final = 64
# aiohttp's parser: the request line and each header at most 8 KiB, at most 32 headers
HANDLER_ARGS: Final[dict[str, Any]] = dict(
    keepalive_timeout=IDLE_TIMEOUT, max_line_size=8190, max_field_size=8190, max_headers=32,
    lingering_time=2.0, access_log=None,
)  # fmt: skip
PARAM_PATTERN: Final = "^[A-Za-z0-9_.-]+$"
PARAM_SCHEMA: Final = {"type": "string", "pattern": PARAM_PATTERN, "not": {"enum": [".", ".."]}}

JsonSchema = Mapping[str, Any]
_R = TypeVar("_R", bound=web.StreamResponse)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An error with a stable code, rendered as the JSON error body; ``headers``
    are added to the response (``Allow``, ``WWW-Authenticate``)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        close: bool = False,
    ) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"ApiError status {status} is not a 4xx or 5xx")
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers: dict[str, str] = dict(headers or {})
        self.close = close  # end the connection after the answer (a body left unread)

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


def _dumps(value: Any) -> str:
    # allow_nan=False: NaN is not JSON, and a client's parser may choke on it
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=_dumps)


def error_response(exc: ApiError) -> web.Response:
    resp = web.json_response(exc.body(), status=exc.status, headers=exc.headers, dumps=_dumps)
    if exc.close:
        resp.force_close()
    return _stamp(resp)


def _stamp(resp: _R) -> _R:
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    # API answers describe state at one moment; a cache would only lie
    if resp.status != 204:
        resp.headers.setdefault("Cache-Control", "no-store")
    return resp


def internal_error(what: str) -> web.Response:
    """A 500 whose incident id ties the client's report to the logged traceback."""
    incident = secrets.token_hex(6)
    logger.exception("%s failed (incident %s)", what, incident)
    return error_response(ApiError(500, INTERNAL, "internal server error", {"incident": incident}))


def _bad_request(where: str, field_name: str, problem: str) -> ApiError:
    message = f"{field_name}: {problem}" if field_name else problem
    if where != "body":
        message = f"{where} parameter {message}"
    return ApiError(
        400, BAD_REQUEST, message, {"field": field_name, "in": where, "problem": problem}
    )


# --------------------------------------------------------------------------
# Validation: jsonschema's errors in this API's words


def validate(schema: JsonSchema, value: Any, *, where: str = "body", prefix: str = "") -> None:
    """Check ``value`` against ``schema`` (Draft 2020-12); the first problem is a 400
    ``BAD_REQUEST`` whose details name the field ("settings.interval_ms",
    "disks[2].path"; "" for the value as a whole)."""
    _check(Draft202012Validator(schema), value, where, prefix)


def _check(validator: Draft202012Validator, value: Any, where: str, prefix: str = "") -> None:
    error = next(validator.iter_errors(value), None)
    if error is not None:
        raise _bad_request(where, *_describe(error, prefix))


def _describe(error: ValidationError, prefix: str) -> tuple[str, str]:
    path = prefix
    for part in error.absolute_path:
        path = f"{path}[{part}]" if isinstance(part, int) else _join(path, part)
    kind, value = str(error.validator), cast(Any, error.instance)
    want: Any = error.validator_value
    schema: Any = error.schema
    if kind == "required":
        return _join(path, next(n for n in want if n not in value)), "is required"
    if kind == "additionalProperties":
        known = schema.get("properties", {})
        return _join(path, next(n for n in value if n not in known)), "is not an allowed field"
    problems = {
        "type": lambda: (
            "must be "
            + " or ".join(_article(t) for t in ([want] if isinstance(want, str) else want))
            + f", not {_article(_json_type(value))}"
        ),
        "enum": lambda: "must be one of " + ", ".join(json.dumps(e) for e in want),
        "minimum": lambda: f"must be >= {want}",
        "maximum": lambda: f"must be <= {want}",
        "exclusiveMinimum": lambda: f"must be > {want}",
        "exclusiveMaximum": lambda: f"must be < {want}",
        "minLength": lambda: f"must be at least {want} characters long",
        "maxLength": lambda: f"must be at most {want} characters long",
        "pattern": lambda: f"must match the pattern {want}",
        "minItems": lambda: f"must have at least {want} items",
        "maxItems": lambda: f"must have at most {want} items",
    }
    problem = problems.get(kind)
    return path, problem() if problem is not None else error.message


def _join(path: str, name: Any) -> str:
    return f"{path}.{name}" if path else str(name)


def _json_type(value: Any) -> str:
    kinds = ("null", "boolean", "integer", "number", "string", "array", "object")
    return next(k for k in kinds if Draft202012Validator.TYPE_CHECKER.is_type(value, k))


def _article(type_name: str) -> str:
    if type_name == "null":
        return "null"
    return ("an " if type_name[0] in "aeiou" else "a ") + type_name


def _parse_json(body: bytes) -> Any:
    """JSON as RFC 8259 reads it, less what would fail later: NaN and Infinity, numbers
    too large for a double, and lone surrogates (which no UTF-8 can carry onwards)."""
    try:
        value = json.loads(body, parse_constant=_not_json, parse_float=_finite)
        json.dumps(value, ensure_ascii=False).encode()
        return value
    except json.JSONDecodeError as exc:
        problem = f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    except (ValueError, RecursionError) as exc:
        # bad UTF-8, NaN, integers over Python's digit limit, lone surrogates, nesting
        problem = f"is not valid JSON: {exc}"
    raise ApiError(
        400, BAD_REQUEST, f"request body {problem}", {"field": "", "in": "body", "problem": problem}
    )


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is out of range")
    return number


def _convert_query(type_name: str, text: str) -> Any:
    if type_name == "integer":
        return int(text) if re.fullmatch(r"-?[0-9]{1,18}", text) else None
    if type_name == "number":
        with contextlib.suppress(ValueError):
            return _finite(text)
        return None
    if type_name == "boolean":
        return {"true": True, "1": True, "false": False, "0": False}.get(text.lower())
    return text


# --------------------------------------------------------------------------
# Routes


@dataclass(frozen=True)
class Route:
    """One operation: a method on a path template, its handler and its contract.

    ``path`` segments are literals or whole-segment ``{name}`` params, each
    matching :data:`PARAM_SCHEMA` after URL-decoding. ``errors`` are the
    (status, code) pairs the handler may raise beyond the framework's own.
    ``query`` declares query parameters (name -> scalar schema): when given,
    unknown ones are refused and values are converted to the schema's type.
    ``public`` routes need no bearer token even on TCP (liveness probes).
    """

    method: str
    path: str
    handler: Handler
    summary: str = ""
    request_schema: JsonSchema | None = None
    response_schema: JsonSchema | None = None
    errors: Sequence[tuple[int, str]] = ()
    status: int = 200
    content_type: str = "application/json"
    query: Mapping[str, JsonSchema] | None = None
    public: bool = False
    operation_id: str = ""

    def __post_init__(self) -> None:
        for schema in (self.request_schema, self.response_schema, *(self.query or {}).values()):
            if schema is not None:
                Draft202012Validator.check_schema(schema)
        if not self.operation_id:
            object.__setattr__(self, "operation_id", getattr(self.handler, "__name__", "op"))

    @property
    def params(self) -> list[str]:
        return re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", self.path)


class _Checked:
    """A route with its validators compiled: what runs before the handler."""

    def __init__(self, route: Route) -> None:
        self.route = route
        schema = route.request_schema
        self.body = None if schema is None else Draft202012Validator(schema)
        self.query = {k: Draft202012Validator(v) for k, v in (route.query or {}).items()}

    async def serve(self, request: web.Request) -> web.StreamResponse:
        for name, value in request.match_info.items():
            if not re.fullmatch(PARAM_PATTERN, value):
                raise _bad_request("path", name, f"must match {PARAM_PATTERN}")
            if value in (".", ".."):
                raise _bad_request("path", name, "must not be . or ..")
        request[QUERY] = self._query(request)
        request[BODY] = await self._body(request)
        return await self.route.handler(request)

    def _query(self, request: web.Request) -> dict[str, Any]:
        if len(request.query) > MAX_QUERY_FIELDS:
            raise _bad_request("query", "", f"more than {MAX_QUERY_FIELDS} fields")
        if self.route.query is None:
            return dict(request.query)
        out: dict[str, Any] = {}
        for name, text in request.query.items():
            if name not in self.query:
                raise _bad_request("query", name, "is not a known parameter")
            type_name = self.route.query[name].get("type", "string")
            value = _convert_query(type_name, text)
            if value is None:
                raise _bad_request("query", name, f"must be {_article(type_name)}")
            _check(self.query[name], value, "query", name)
            out[name] = value
        return out

    async def _body(self, request: web.Request) -> Any:
        length = request.content_length
        if length is not None and length > MAX_BODY:
            raise _too_large()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                data = await request.read() if request.body_exists else b""
        except web.HTTPRequestEntityTooLarge:
            raise _too_large() from None
        except TimeoutError:
            message = "the request took too long to arrive"
            raise ApiError(408, "REQUEST_TIMEOUT", message, close=True) from None
        parsed: Any = None
        if data:
            ctype = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
            if ctype != "application/json":
                message, details = "the request body must be application/json", ctype or None
                raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", message, {"content_type": details})
            parsed = _parse_json(data)
        elif self.body is not None:
            raise _bad_request("body", "", "a JSON request body is required")
        if self.body is not None:
            _check(self.body, parsed, "body")
        return parsed


def _too_large() -> ApiError:
    message = f"request body over {MAX_BODY} bytes"
    return ApiError(413, "PAYLOAD_TOO_LARGE", message, {"limit": MAX_BODY}, close=True)


# --------------------------------------------------------------------------
# The application: authentication, errors, bounded writes


# what a handler reads of its request: the checked body, the converted query
BODY: Final[web.RequestKey[Any]] = web.RequestKey("body")
QUERY: Final[web.RequestKey[dict[str, Any]]] = web.RequestKey("query")
_ROUTES: Final = web.AppKey("routes", dict)
_TOKEN: Final = web.AppKey("token", str)
_CLOSING: Final = web.AppKey("closing", asyncio.Event)


def bearer_ok(headers: Mapping[str, str], token: str) -> bool:
    scheme, _, given = headers.get("Authorization", "").strip().partition(" ")
    # compare_digest: the time taken must not tell an attacker how much matched
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), token.encode()
    )


def _unauthorized(request: web.Request) -> ApiError:
    if "Authorization" in request.headers:
        challenge, message = 'Bearer realm="remusd", error="invalid_token"', "bad bearer token"
    else:
        challenge, message = 'Bearer realm="remusd"', "a bearer token is required"
    return ApiError(401, "UNAUTHORIZED", message, headers={"WWW-Authenticate": challenge})


def _routing_error(request: web.Request) -> ApiError:
    exc = request.match_info.http_exception
    path = request.rel_url.raw_path
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allow = sorted(exc.allowed_methods)
        return ApiError(
            405,
            "METHOD_NOT_ALLOWED",
            f"{request.method} is not allowed on {path}",
            {"allowed": allow},
            headers={"Allow": ", ".join(allow)},
        )
    return ApiError(404, "NOT_FOUND", f"no such path: {path}")


@web.middleware
async def _api(request: web.Request, handler: Handler) -> web.StreamResponse:
    checked: _Checked | None = request.app[_ROUTES].get(request.match_info.handler)
    token = request.app.get(_TOKEN)
    try:
        # 401 for any path that is not public, existing or not: no mapping the API
        public = checked is not None and checked.route.public
        if token is not None and not public and not bearer_ok(request.headers, token):
            raise _unauthorized(request)
        if checked is None:
            raise _routing_error(request)
        resp = await handler(request)
    except ApiError as exc:
        resp = error_response(exc)
    except Exception:
        resp = internal_error(f"{request.method} {checked.route.path if checked else '?'}")
    logger.debug("%s %s -> %s", request.method, request.rel_url, resp.status)
    if not resp.prepared:
        await _bounded(_send(request, _stamp(resp)), request)
    return resp


async def _send(request: web.Request, resp: web.StreamResponse) -> None:
    await resp.prepare(request)
    await resp.write_eof()


async def _bounded(write: Awaitable[Any], request: web.Request) -> None:
    """A write the client must take within WRITE_TIMEOUT, or lose the connection."""
    try:
        async with asyncio.timeout(WRITE_TIMEOUT):
            await write
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("the client stopped reading") from None


def encode_sse(event: str, data: Any, event_id: str | None = None) -> bytes:
    """One event in text/event-stream framing. JSON never contains a raw newline,
    so data is always a single ``data:`` line."""
    for what, value in (("event name", event), ("event id", event_id or "")):
        if re.search(r"[\x00\r\n]", value):
            raise ValueError(f"SSE {what} {value!r} contains CR, LF or NUL")
    lines = [f"id: {event_id}"] if event_id is not None else []
    if event and event != "message":
        lines.append(f"event: {event}")
    lines.append("data: " + _dumps(data))
    return ("\n".join(lines) + "\n\n").encode()


async def event_stream(
    request: web.Request,
    events: AsyncIterator[tuple[str, Any, str | None]],
    *,
    ping_interval: float = PING_INTERVAL,
) -> web.StreamResponse:
    """Answer with Server-Sent Events: (event name, JSON-able data, id or None) from
    ``events`` until it ends, the client goes (found at the next write: a comment
    goes out every ``ping_interval`` seconds with nothing else to send) or the
    server closes. One event is in flight at a time, so nothing piles up for a slow
    client: it has WRITE_TIMEOUT to take each. ``events`` is closed either way, so
    an async generator's ``finally`` runs. If it raises, an ``error`` event with an
    INTERNAL body goes out and the stream ends."""
    resp = _stamp(web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                              "Cache-Control": "no-cache",
                                              # nginx buffers unless told not to
                                              "X-Accel-Buffering": "no"}))  # fmt: skip
    closing: asyncio.Future[Any] = asyncio.ensure_future(request.app[_CLOSING].wait())
    pending: asyncio.Future[Any] | None = None
    try:
        await _bounded(resp.prepare(request), request)
        while request.method != "HEAD":
            pending = pending or asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait(
                {pending, closing}, timeout=ping_interval, return_when=asyncio.FIRST_COMPLETED
            )
            if closing in done:
                break
            if pending not in done:
                await _bounded(resp.write(b": ping\n\n"), request)
                continue
            finished, pending = pending, None
            try:
                chunk = encode_sse(*finished.result())
            except StopAsyncIteration:
                break
            except Exception:
                incident = secrets.token_hex(6)
                logger.exception("event stream failed (incident %s)", incident)
                error = ApiError(500, INTERNAL, "the event stream failed", {"incident": incident})
                await _bounded(resp.write(encode_sse("error", error.body())), request)
                break
            await _bounded(resp.write(chunk), request)
        await _bounded(resp.write_eof(), request)
    except ConnectionError:
        logger.debug("event stream client gone")
    finally:
        closing.cancel()
        if pending is not None:
            # cancel the waiting __anext__ first: a running generator cannot be closed
            pending.cancel()
            await asyncio.wait({pending})
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]
    return resp


class _Protocol(web.RequestHandler):
    """aiohttp's connection handler, answering malformed HTTP in the API's error shape."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had begun; the connection is broken")
        if status >= 500:
            logger.error("request failed: %r", exc, exc_info=exc)
            error = ApiError(status, INTERNAL, "internal server error", close=True)
        else:
            logger.debug("malformed request: %s", message)
            error = ApiError(status, BAD_REQUEST, f"malformed HTTP request: {message or exc}",
                             close=True)  # fmt: skip
        return error_response(error)


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]


class _Site(web.BaseSite):
    """A listener on a socket already bound, whose connections are capped."""

    __slots__ = ("_name", "_sock")

    def __init__(self, runner: web.AppRunner, sock: socket.socket, name: str,
                 ssl_context: ssl.SSLContext | None = None) -> None:  # fmt: skip
        super().__init__(runner, ssl_context=ssl_context)
        self._sock, self._name = sock, name

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None

        def connection() -> asyncio.Protocol:
            if len(server.connections) >= MAX_CONNECTIONS:
                return _Refused()
            return _Protocol(server, loop=loop, **HANDLER_ARGS)

        if self._sock.family == socket.AF_UNIX:
            self._server = await loop.create_unix_server(connection, sock=self._sock)
        else:
            timeout = REQUEST_TIMEOUT if self._ssl_context else None
            self._server = await loop.create_server(
                connection, sock=self._sock, ssl=self._ssl_context, ssl_handshake_timeout=timeout
            )


# --------------------------------------------------------------------------
# OpenAPI


def _error_schema(codes: Iterable[str]) -> dict[str, Any]:
    error = {"type": "object", "required": ["code", "message", "details"], "properties": {
        "code": {"type": "string", "enum": list(codes)}, "message": {"type": "string"},
        "details": {"type": ["object", "null"]}}}  # fmt: skip
    return {"type": "object", "required": ["error"], "properties": {"error": error}}


def route_errors(route: Route, *, token: bool) -> dict[int, list[str]]:
    """Declared errors plus the ones the framework may answer with for this route."""
    errors: dict[int, list[str]] = {}
    implied = [(400, BAD_REQUEST)] if route.request_schema or route.params or route.query else []
    if route.request_schema is not None:
        implied += [(413, "PAYLOAD_TOO_LARGE"), (415, "UNSUPPORTED_MEDIA_TYPE")]
    if token and not route.public:
        implied.append((401, "UNAUTHORIZED"))
    for status, code in [*route.errors, *implied, (500, INTERNAL)]:
        if code not in errors.setdefault(status, []):
            errors[status].append(code)
    return dict(sorted(errors.items()))


def openapi(routes: Iterable[Route], title: str, version: str, *, token: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` as one listener serves them: with
    ``token``, every operation but the public ones requires the bearer token;
    without (the unix socket), none does. Schemas are JSON Schema 2020-12 as 3.1
    wants, so the routes' own go in unchanged."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        params = [{"name": n, "in": "path", "required": True, "schema": PARAM_SCHEMA}
                  for n in route.params]  # fmt: skip
        params += [{"name": n, "in": "query", "required": False, "schema": dict(s)}
                   for n, s in (route.query or {}).items()]  # fmt: skip
        op: dict[str, Any] = {"operationId": route.operation_id, "summary": route.summary}
        if params:
            op["parameters"] = params
        if route.request_schema is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": dict(route.request_schema)}},
            }
        ok: dict[str, Any] = {"description": route.summary or "Success"}
        if route.status != 204:
            schema = dict(route.response_schema or {})
            if route.content_type != "application/json":
                schema = {"type": "string"}
            ok["content"] = {route.content_type: {"schema": schema}}
        op["responses"] = {str(route.status): ok}
        for status, codes in route_errors(route, token=token).items():
            op["responses"][str(status)] = {
                "description": f"{HTTPStatus(status).phrase}: {', '.join(codes)}",
                "content": {"application/json": {"schema": _error_schema(codes)}},
            }
        if not token or route.public:
            op["security"] = []
        paths.setdefault(route.path, {})[route.method.lower()] = op
    here, there = ("this TCP listener", "the unix socket") if token else ("the unix socket", "TCP")
    info = {"title": title, "version": version, "description": (
        'Errors are JSON: {"error": {"code", "message", "details"}}. Any path may answer '
        "404 NOT_FOUND or 405 METHOD_NOT_ALLOWED, and any request 400 BAD_REQUEST (malformed "
        "HTTP), 408 REQUEST_TIMEOUT or 413 PAYLOAD_TOO_LARGE. This document describes "
        f"{here}: "
        + ("every operation but those whose security is empty requires the bearer token; "
           f"{there} (mode 0600) requires none." if token else
           "no operation requires a token, the socket's file mode (0600) is its access "
           f"control; over {there} the bearer token is required.")
    )}  # fmt: skip
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": info,
        "paths": paths,
        "components": {
            "schemas": {"Error": _error_schema(FRAMEWORK_CODES)},
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "Required on TCP listeners only; the unix socket needs none",
            }},
        },
    }  # fmt: skip
    doc["security"] = [{"bearerAuth": []}] if token else []
    return doc


# --------------------------------------------------------------------------
# The server


class ApiServer:
    """Serves one route table on unix sockets and TCP listeners, each an aiohttp
    application of its own in the caller's loop: on a unix socket no token is
    asked (its mode, 0600 by default, is the access control), on TCP a bearer token
    if one is given. ``openapi_path`` (None: none) serves each listener's document.
    :meth:`close` ends event streams at once and gives handlers already running
    :data:`SHUTDOWN_GRACE`."""

    def __init__(
        self,
        routes: Iterable[Route],
        *,
        title: str = "remusd",
        version: str = "1",
        openapi_path: str | None = "/v1/openapi.json",
    ) -> None:
        self.title, self.version = title, version
        self.routes = list(routes)
        if openapi_path is not None:
            self.routes.append(Route("GET", openapi_path, self._openapi, "This API's OpenAPI 3.1 "
                                     "document", response_schema={"type": "object"},
                                     operation_id="getOpenApi"))  # fmt: skip
        self._runners: list[web.AppRunner] = []
        self._unix_paths: list[tuple[str, int, int]] = []  # path, st_dev, st_ino

    def openapi(self, *, token: bool) -> dict[str, Any]:
        return openapi(self.routes, self.title, self.version, token=token)

    async def _openapi(self, request: web.Request) -> web.Response:
        return json_response(self.openapi(token=_TOKEN in request.app))

    def app(self, token: str | None = None) -> web.Application:
        app = web.Application(middlewares=[_api], client_max_size=MAX_BODY)
        app[_ROUTES] = {}
        app[_CLOSING] = asyncio.Event()
        if token is not None:
            if not token:
                raise ValueError("an empty bearer token would accept anyone")
            app[_TOKEN] = token

        async def closing(app: web.Application) -> None:
            app[_CLOSING].set()

        app.on_shutdown.append(closing)
        for route in self.routes:
            checked = _Checked(route)
            app[_ROUTES][checked.serve] = checked
            if route.method == "GET":
                app.router.add_get(route.path, checked.serve)  # and HEAD
            else:
                app.router.add_route(route.method, route.path, checked.serve)
        return app

    async def _serve(self, app: web.Application, sock: socket.socket, name: str,
                     ssl_context: ssl.SSLContext | None = None) -> None:  # fmt: skip
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE,
                               **HANDLER_ARGS)  # fmt: skip
        await runner.setup()
        self._runners.append(runner)
        await _Site(runner, sock, name, ssl_context).start()

    async def start_unix(self, path: str | os.PathLike[str], mode: int = 0o600) -> None:
        """Listen on a unix socket at ``path`` with file mode ``mode``. A stale socket
        (nothing listening) is replaced; a live one is an error, so a second remusd
        cannot steal the first one's clients."""
        path = os.fspath(path)
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            # chmod before listen(): until then a connect is refused, so there is no
            # moment at which the umask's wider mode lets anyone in
            os.chmod(path, mode)
            st = os.stat(path)
            await self._serve(self.app(), sock, f"unix:{path}")
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        self._unix_paths.append((path, st.st_dev, st.st_ino))
        logger.info("listening on unix:%s (mode %04o)", path, mode)

    async def start_tcp(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
                        token: str | None = None) -> int:  # fmt: skip
        """Listen on TCP; returns the bound port (useful with port 0)."""
        if token is None:
            logger.warning("TCP listener on %s:%s without a bearer token", host, port)
        elif ssl_context is None:
            logger.warning("TCP listener on %s:%s sends its bearer token in clear", host, port)
        loop = asyncio.get_running_loop()
        info = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        sock = socket.socket(info[0][0], socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(info[0][4])
            bound = int(sock.getsockname()[1])
            await self._serve(self.app(token), sock, f"{host}:{bound}", ssl_context)
        except BaseException:
            sock.close()
            raise
        logger.info("listening on %s://%s:%d", "https" if ssl_context else "http", host, bound)
        return bound

    async def close(self) -> None:
        """Stop listening, end connections (busy ones get the grace), remove the unix
        sockets this server created."""
        await asyncio.gather(*(runner.cleanup() for runner in self._runners))
        self._runners.clear()
        for path, dev, ino in self._unix_paths:
            # only our own socket: a successor may already have bound the path
            with contextlib.suppress(OSError):
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == (dev, ino):
                    os.unlink(path)
        self._unix_paths.clear()


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # blocking, once, at start-up; a unix connect only waits when the listener's
    # backlog is full, and then it is certainly alive
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    except TimeoutError:
        pass
    finally:
        probe.close()
    raise OSError(f"another server is already listening on {path}")
