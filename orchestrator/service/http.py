"""remusd's HTTP/JSON framework: routing, validation, errors, OpenAPI, and a thin server.

Everything above :class:`HttpServer` is sans I/O, the way h11 separates HTTP
from sockets: :class:`Router` matches paths, :func:`validate` checks JSON
against a small JSON Schema subset, :func:`prepare` turns a request's parts
into a :class:`Request` (or an :class:`ApiError`), :func:`dispatch` runs the
handler and shapes every outcome, error or not, into bytes to send, and
:func:`openapi` describes the route table. None of it touches a socket, so
all of it is testable by calling it.

:class:`HttpServer` is the adapter: asyncio streams, one ``h11.Connection``
per connection (keep-alive and pipelining are h11's state machine), body
limits and timeouts, Server-Sent Events, bearer tokens on TCP listeners.

Errors always have the same JSON shape::

    {"error": {"code": "NOT_FOUND", "message": "...", "details": {...} | null}}

Codes are stable strings a client can switch on; messages are for people.
A handler that raises anything other than :class:`ApiError` gets a 500
``INTERNAL`` with an incident id that is also in the log next to the
traceback; the traceback itself never goes to the client.
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
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple
from urllib.parse import parse_qsl, unquote

import h11

logger = logging.getLogger(__name__)

# Error codes the framework itself produces. Applications add their own
# (CONFLICT, ...), declared per route in ``Route.errors``.
BAD_REQUEST: Final = "BAD_REQUEST"
UNAUTHORIZED: Final = "UNAUTHORIZED"
NOT_FOUND: Final = "NOT_FOUND"
METHOD_NOT_ALLOWED: Final = "METHOD_NOT_ALLOWED"
REQUEST_TIMEOUT: Final = "REQUEST_TIMEOUT"
PAYLOAD_TOO_LARGE: Final = "PAYLOAD_TOO_LARGE"
UNSUPPORTED_MEDIA_TYPE: Final = "UNSUPPORTED_MEDIA_TYPE"
INTERNAL: Final = "INTERNAL"
FRAMEWORK_CODES: Final = (
    BAD_REQUEST,
    UNAUTHORIZED,
    NOT_FOUND,
    METHOD_NOT_ALLOWED,
    REQUEST_TIMEOUT,
    PAYLOAD_TOO_LARGE,
    UNSUPPORTED_MEDIA_TYPE,
    INTERNAL,
)

MAX_BODY: Final = 1 << 20
# Request line plus headers; h11 answers 431 beyond it.
MAX_HEADER_BYTES: Final = 16 * 1024
READ_SIZE: Final = 64 * 1024
PARAM_PATTERN: Final = "^[A-Za-z0-9_.-]+$"
_PARAM_RE: Final = re.compile(PARAM_PATTERN)
_TEMPLATE_PARAM_RE: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HEADER_NAME_RE: Final = re.compile(r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_HEADER_VALUE_BAD_RE: Final = re.compile(r"[\x00\r\n]")
# Query strings with more fields than this are refused rather than parsed.
MAX_QUERY_FIELDS: Final = 64

JsonSchema = Mapping[str, Any]


# --------------------------------------------------------------------------
# Errors


class ApiError(Exception):
    """An error with a stable code, rendered as the JSON error body.

    Raise it from a handler to answer with ``status``; ``headers`` are added
    to the response (the framework uses them for ``Allow`` and
    ``WWW-Authenticate``).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"ApiError status {status} is not a 4xx or 5xx")
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


def _bad_request(where: str, field_name: str, problem: str) -> ApiError:
    message = f"{field_name}: {problem}" if field_name else problem
    if where != "body":
        message = f"{where} parameter {message}"
    return ApiError(
        400, BAD_REQUEST, message, {"field": field_name, "in": where, "problem": problem}
    )


# --------------------------------------------------------------------------
# Requests, responses, event streams


@dataclass(frozen=True)
class Request:
    """One parsed, authenticated and validated request, as a handler sees it.

    ``headers`` has lower-case names (repeated headers joined with ", ").
    ``query`` holds strings, or for routes that declare ``query``, values
    converted to their schema's type. ``body`` is the parsed JSON or None
    when there was none. ``transport`` is "unix" or "tcp": an application may
    reserve some operations for the local socket.
    """

    method: str
    path: str
    params: dict[str, str]
    query: dict[str, Any]
    headers: Mapping[str, str]
    body: Any
    transport: str = "unix"


@dataclass(frozen=True)
class Rendered:
    """A response reduced to what goes on the wire (sans I/O)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True)
class Response:
    """A handler's answer.

    ``body`` is JSON-encoded (None means no body at all). ``raw`` bytes, if
    given, are sent as they are with ``content_type`` (Prometheus text for
    /metrics, say) and ``body`` is ignored. ``headers`` are extra headers.
    """

    status: int = 200
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    raw: bytes | None = None
    content_type: str | None = None

    def render(self) -> Rendered:
        """The bytes to send; raises (ValueError, TypeError) on a body or header
        that cannot go out, which :func:`dispatch` turns into a 500."""
        if not 200 <= self.status <= 599:
            raise ValueError(f"response status {self.status} is out of range")
        if self.raw is not None:
            data = bytes(self.raw)
            ctype: str | None = self.content_type or "application/octet-stream"
        elif self.body is None:
            data, ctype = b"", None
        else:
            # allow_nan=False: NaN is not JSON, and a client's parser may choke on it.
            data = json.dumps(self.body, allow_nan=False, separators=(",", ":")).encode()
            ctype = self.content_type or "application/json"
        if self.status in (204, 304) and data:
            raise ValueError(f"a {self.status} response cannot have a body")
        headers = _base_headers(ctype)
        if self.status not in (204, 304):
            headers.append(("content-length", str(len(data))))
        headers = _merge_headers(headers, self.headers)
        return Rendered(self.status, headers, data)


class ServerSentEvent(NamedTuple):
    """One event of an :class:`EventStream`; a plain 3-tuple works as well."""

    event: str
    data: Any
    id: str | None = None


class EventStream:
    """A handler's answer that is a stream of Server-Sent Events.

    ``events`` yields (event name, JSON-able data, id or None). The stream
    stays open until the iterator ends or the client goes away; in the
    second case the iterator is cancelled and, if it has ``aclose``, closed,
    so an async generator's ``finally`` (unsubscribing, say) runs either way.
    A comment line goes out every ``ping_interval`` seconds with nothing else
    to send: it keeps proxies from timing the stream out and finds dead
    peers. If the iterator raises, an ``error`` event with an INTERNAL body
    goes out and the stream ends.
    """

    def __init__(
        self,
        events: AsyncIterable[tuple[str, Any, str | None]],
        *,
        ping_interval: float | None = 15.0,
        retry_ms: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.events = events
        self.ping_interval = ping_interval
        self.retry_ms = retry_ms
        self.headers: dict[str, str] = dict(headers or {})

    def response_headers(self) -> list[tuple[str, str]]:
        headers = _base_headers("text/event-stream")
        headers.append(("cache-control", "no-cache"))
        # nginx buffers responses unless told not to; an event must go out at once.
        headers.append(("x-accel-buffering", "no"))
        return _merge_headers(headers, self.headers)


def encode_sse(event: str, data: Any, event_id: str | None = None) -> bytes:
    """One event in text/event-stream framing. JSON never contains a raw
    newline, so data is always a single ``data:`` line."""
    for what, value in (("event name", event), ("event id", event_id or "")):
        if _HEADER_VALUE_BAD_RE.search(value):
            raise ValueError(f"SSE {what} {value!r} contains CR, LF or NUL")
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event and event != "message":
        lines.append(f"event: {event}")
    lines.append("data: " + json.dumps(data, allow_nan=False, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode()


def _base_headers(content_type: str | None) -> list[tuple[str, str]]:
    headers = [("x-content-type-options", "nosniff")]
    if content_type is not None:
        headers.append(("content-type", content_type))
        # API answers describe state at one moment; a cache would only lie.
        headers.append(("cache-control", "no-store"))
    return headers


def _merge_headers(base: list[tuple[str, str]], extra: Mapping[str, str]) -> list[tuple[str, str]]:
    """``base`` with ``extra`` overriding same-named entries; checks every
    header so that a bad one fails in render rather than in h11, mid-send."""
    extra_lower = {k.lower(): v for k, v in extra.items()}
    merged = [(k, v) for k, v in base if k not in extra_lower] + list(extra_lower.items())
    for name, value in merged:
        if not _HEADER_NAME_RE.fullmatch(name):
            raise ValueError(f"bad header name {name!r}")
        if _HEADER_VALUE_BAD_RE.search(value) or not value.isascii():
            raise ValueError(f"bad value for header {name}: {value!r}")
    return merged


def render_error(exc: ApiError, *, close: bool = False) -> Rendered:
    headers = dict(exc.headers)
    if close:
        headers["connection"] = "close"
    return Response(exc.status, exc.body(), headers).render()


# --------------------------------------------------------------------------
# JSON Schema subset

_TYPES: Final[dict[str, Callable[[Any], bool]]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    # bool is an int in Python but not in JSON. A number with a zero fractional part
    # is an integer (JSON Schema 2020-12: 59999.0 is one; JSON has one number type).
    "integer": lambda v: (
        not isinstance(v, bool)
        and (isinstance(v, int) or (isinstance(v, float) and v.is_integer()))
    ),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}
_ANNOTATIONS: Final = frozenset(
    {"description", "title", "default", "examples", "format", "deprecated", "readOnly", "writeOnly"}
)
_KEYWORDS: Final = _ANNOTATIONS | {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "items",
    "minItems",
    "maxItems",
}


def check_schema(schema: JsonSchema, where: str = "schema") -> None:
    """Refuse a schema that uses what :func:`validate` does not implement.

    Run when a route is declared: a ``oneOf`` that silently validated
    nothing would be worse than an error at start-up.
    """
    if not isinstance(schema, Mapping):
        raise ValueError(f"{where}: a schema must be a mapping")
    unknown = set(schema) - _KEYWORDS
    if unknown:
        raise ValueError(f"{where}: unsupported schema keywords {sorted(unknown)}")
    types = schema.get("type")
    for t in [types] if isinstance(types, str) else list(types or ()):
        if t not in _TYPES:
            raise ValueError(f"{where}: unknown type {t!r}")
    for name, sub in dict(schema.get("properties") or {}).items():
        check_schema(sub, f"{where}.properties.{name}")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ValueError(f"{where}: required must be a list of names")
    extra = schema.get("additionalProperties", True)
    if not isinstance(extra, bool):
        check_schema(extra, f"{where}.additionalProperties")
    if "items" in schema:
        check_schema(schema["items"], f"{where}.items")
    if "enum" in schema and not isinstance(schema["enum"], list):
        raise ValueError(f"{where}: enum must be a list")
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        if key in schema and not _TYPES["number"](schema[key]):
            raise ValueError(f"{where}: {key} must be a number")
    for key in ("minLength", "maxLength", "minItems", "maxItems"):
        if key in schema and not (_TYPES["integer"](schema[key]) and schema[key] >= 0):
            raise ValueError(f"{where}: {key} must be a non-negative integer")
    if "pattern" in schema:
        try:
            re.compile(schema["pattern"])
        except (re.error, TypeError) as exc:
            raise ValueError(f"{where}: bad pattern: {exc}") from None


def validate(schema: JsonSchema, value: Any, *, where: str = "body", prefix: str = "") -> None:
    """Check ``value`` against ``schema``; the first problem found is a 400
    ``BAD_REQUEST`` whose details name the field ("settings.interval_ms",
    "disks[2].path"; "" for the value as a whole).

    ``pattern`` is searched, not matched, as in JSON Schema: anchor it.
    ``format`` is an annotation only.
    """
    problem = _first_problem(schema, value, prefix)
    if problem is not None:
        raise _bad_request(where, *problem)


def _first_problem(schema: JsonSchema, value: Any, path: str) -> tuple[str, str] | None:
    types = schema.get("type")
    if types is not None:
        allowed = [types] if isinstance(types, str) else list(types)
        if not any(_TYPES[t](value) for t in allowed):
            want = " or ".join(_article(t) for t in allowed)
            return path, f"must be {want}, not {_article(_json_type(value))}"
    if "enum" in schema and not any(_json_equal(value, e) for e in schema["enum"]):
        choices = ", ".join(json.dumps(e) for e in schema["enum"])
        return path, f"must be one of {choices}"
    if _TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            return path, f"must be >= {schema['minimum']}"
        if "maximum" in schema and value > schema["maximum"]:
            return path, f"must be <= {schema['maximum']}"
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            return path, f"must be > {schema['exclusiveMinimum']}"
        if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            return path, f"must be < {schema['exclusiveMaximum']}"
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            return path, f"must be at least {schema['minLength']} characters long"
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            return path, f"must be at most {schema['maxLength']} characters long"
        if "pattern" in schema and not re.search(schema["pattern"], value):
            return path, f"must match the pattern {schema['pattern']}"
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            return path, f"must have at least {schema['minItems']} items"
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            return path, f"must have at most {schema['maxItems']} items"
        if "items" in schema:
            for i, item in enumerate(value):
                found = _first_problem(schema["items"], item, f"{path}[{i}]")
                if found is not None:
                    return found
    if isinstance(value, dict):
        properties: Mapping[str, JsonSchema] = schema.get("properties") or {}
        for name in schema.get("required", ()):
            if name not in value:
                return _join(path, name), "is required"
        for name, sub in properties.items():
            if name in value:
                found = _first_problem(sub, value[name], _join(path, name))
                if found is not None:
                    return found
        extra = schema.get("additionalProperties", True)
        for name in value:
            if name in properties:
                continue
            if extra is False:
                return _join(path, name), "is not an allowed field"
            if isinstance(extra, Mapping):
                found = _first_problem(extra, value[name], _join(path, name))
                if found is not None:
                    return found
    return None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _json_type(value: Any) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _TYPES[name](value):
            return name
    return type(value).__name__


def _article(type_name: str) -> str:
    if type_name == "null":
        return "null"
    return ("an " if type_name[0] in "aeiou" else "a ") + type_name


def _json_equal(a: Any, b: Any) -> bool:
    # Python says True == 1; JSON does not.
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return bool(a == b)


# --------------------------------------------------------------------------
# Routes and routing

Handler = Callable[[Request], Awaitable["Response | EventStream"]]


@dataclass(frozen=True)
class Route:
    """One operation: a method on a path template, its handler and its contract.

    ``template`` segments are literals or whole-segment ``{name}`` params;
    a param matches ``[A-Za-z0-9_.-]+`` after URL-decoding. ``errors`` are
    the (status, code) pairs the handler may raise beyond the framework's
    own, for the OpenAPI document. ``query`` declares query parameters
    (name -> scalar schema): when given, unknown ones are refused and values
    are converted to the schema's type. ``status`` and ``content_type``
    describe success ("text/event-stream" for an :class:`EventStream`).
    ``public`` routes need no bearer token even on TCP (liveness probes).
    """

    method: str
    template: str
    handler: Handler
    summary: str = ""
    request_schema: JsonSchema | None = None
    response_schema: JsonSchema | None = None
    errors: Sequence[tuple[int, str]] = ()
    tags: Sequence[str] = ()
    status: int = 200
    content_type: str = "application/json"
    query: Mapping[str, JsonSchema] | None = None
    public: bool = False
    description: str = ""
    operation_id: str | None = None
    # Parsed template: each segment is ("lit", text) or ("param", name).
    segments: tuple[tuple[str, str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Z]+", self.method):
            raise ValueError(f"{self.template}: method {self.method!r} must be upper case")
        if not self.template.startswith("/"):
            raise ValueError(f"{self.template}: a template starts with /")
        segments: list[tuple[str, str]] = []
        for seg in self.template[1:].split("/"):
            m = _TEMPLATE_PARAM_RE.fullmatch(seg)
            if m:
                segments.append(("param", m.group(1)))
            elif "{" in seg or "}" in seg:
                raise ValueError(f"{self.template}: a param must be a whole segment: {seg!r}")
            else:
                segments.append(("lit", seg))
        names = [n for kind, n in segments if kind == "param"]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.template}: repeated param name")
        object.__setattr__(self, "segments", tuple(segments))
        for name, schema in (
            ("request_schema", self.request_schema),
            ("response_schema", self.response_schema),
        ):
            if schema is not None:
                check_schema(schema, f"{self.method} {self.template} {name}")
        for qname, qschema in (self.query or {}).items():
            check_schema(qschema, f"{self.method} {self.template} query {qname}")
            if qschema.get("type", "string") not in ("string", "integer", "number", "boolean"):
                raise ValueError(f"{self.template}: query {qname} must have one scalar type")
        for status, code in self.errors:
            if not 400 <= status <= 599 or not code:
                raise ValueError(f"{self.template}: bad declared error {(status, code)!r}")

    @property
    def param_names(self) -> list[str]:
        return [name for kind, name in self.segments if kind == "param"]

    @property
    def shape(self) -> tuple[str, ...]:
        """The template with param names erased: two routes of one method and
        one shape would be ambiguous."""
        return tuple("{}" if kind == "param" else text for kind, text in self.segments)

    def match_path(self, raw_segments: Sequence[str]) -> dict[str, str] | None:
        """Raw (still percent-encoded) params if the path fits the template."""
        if len(raw_segments) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for (kind, text), raw in zip(self.segments, raw_segments, strict=True):
            if kind == "lit":
                if raw != text:
                    return None
            elif not raw:
                return None
            else:
                params[text] = raw
        return params


class Router:
    """The route table. ``openapi_path`` (None to leave it out) serves the
    OpenAPI document of this very table, so it cannot drift from the code."""

    def __init__(
        self,
        routes: Iterable[Route] = (),
        *,
        title: str = "remusd",
        version: str = "1",
        description: str = "",
        openapi_path: str | None = "/v1/openapi.json",
    ) -> None:
        self.title = title
        self.version = version
        self.description = description
        self._routes: list[Route] = []
        if openapi_path is not None:
            self.add(
                Route(
                    "GET",
                    openapi_path,
                    self._serve_openapi,
                    summary="This API's OpenAPI 3.1 document",
                    response_schema={"type": "object"},
                    tags=("meta",),
                    operation_id="getOpenApi",
                )
            )
        for route in routes:
            self.add(route)

    @property
    def routes(self) -> tuple[Route, ...]:
        return tuple(self._routes)

    def add(self, route: Route) -> Route:
        for other in self._routes:
            if other.shape != route.shape:
                continue
            if other.method == route.method:
                raise ValueError(
                    f"{route.method} {route.template} clashes with {other.method} {other.template}"
                )
            if other.template != route.template:
                # OpenAPI counts these as one path, which can only have one set of names.
                raise ValueError(
                    f"{route.template} names its params unlike {other.template}: use the same"
                )
        self._routes.append(route)
        return route

    def route(self, method: str, template: str, **options: Any) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`add`; ``options`` are :class:`Route` fields."""

        def register(handler: Handler) -> Handler:
            self.add(Route(method, template, handler, **options))
            return handler

        return register

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route for ``method`` on ``path`` and its URL-decoded params.

        404 if no template fits, 405 (with Allow) if some fit but not with
        this method. Where several fit, literal segments beat params, left
        to right (``/v1/p/_bulk`` over ``/v1/p/{name}``). HEAD is served by
        GET routes.
        """
        raw_segments = path[1:].split("/") if path.startswith("/") else [path]
        fitting = [(r, p) for r in self._routes if (p := r.match_path(raw_segments)) is not None]
        if not fitting:
            raise ApiError(404, NOT_FOUND, f"no such path: {path}")
        methods = {r.method for r, _ in fitting}
        want = "GET" if method == "HEAD" and "HEAD" not in methods else method
        eligible = [(r, p) for r, p in fitting if r.method == want]
        if not eligible:
            allow = methods | ({"HEAD"} if "GET" in methods else set())
            raise ApiError(
                405,
                METHOD_NOT_ALLOWED,
                f"{method} is not allowed on {path}",
                {"allowed": sorted(allow)},
                headers={"allow": ", ".join(sorted(allow))},
            )
        route, raw = max(
            eligible, key=lambda rp: tuple(kind == "lit" for kind, _ in rp[0].segments)
        )
        params: dict[str, str] = {}
        for name, value in raw.items():
            decoded = unquote(value, errors="replace")
            if not _PARAM_RE.fullmatch(decoded):
                raise _bad_request("path", name, f"must match {PARAM_PATTERN}")
            if decoded in (".", ".."):
                raise _bad_request("path", name, "must not be . or ..")
            params[name] = decoded
        return route, params

    def openapi(self) -> dict[str, Any]:
        return openapi(self._routes, self.title, self.version, description=self.description)

    async def _serve_openapi(self, request: Request) -> Response:
        return Response(200, self.openapi())


# --------------------------------------------------------------------------
# Preparing and dispatching a request (sans I/O)


def header_dict(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def bearer_ok(headers: Mapping[str, str], token: str) -> bool:
    scheme, _, given = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # compare_digest: the time taken must not tell an attacker how much matched.
    return hmac.compare_digest(given.strip().encode("latin-1"), token.encode())


def prepare(
    router: Router,
    method: str,
    target: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    token: str | None = None,
    transport: str = "unix",
    max_body: int = MAX_BODY,
) -> tuple[Route, Request]:
    """Route, authenticate, parse and validate; any problem is an ApiError.

    ``headers`` are as from :func:`header_dict`. ``token`` is the bearer
    token this listener requires (None: none). An unauthenticated client
    gets 401 for every path that is not public, existing or not, so that it
    cannot map the API.
    """
    if not target.startswith("/"):
        raise ApiError(400, BAD_REQUEST, "the request target must be a path starting with /")
    path, _, query_string = target.partition("?")
    authorized = token is None or bearer_ok(headers, token)
    try:
        route, params = router.match(method, path)
    except ApiError:
        if not authorized:
            raise _unauthorized(headers) from None
        raise
    if not authorized and not route.public:
        raise _unauthorized(headers)
    query = _parse_query(route, query_string)
    if len(body) > max_body:
        raise ApiError(413, PAYLOAD_TOO_LARGE, f"request body over {max_body} bytes")
    parsed: Any = None
    if body:
        media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            raise ApiError(
                415,
                UNSUPPORTED_MEDIA_TYPE,
                "the request body must be application/json",
                {"content_type": media_type or None},
            )
        parsed = _parse_json(body)
    elif route.request_schema is not None:
        raise _bad_request("body", "", "a JSON request body is required")
    if route.request_schema is not None:
        validate(route.request_schema, parsed)
    request = Request(method, path, params, query, headers, parsed, transport)
    return route, request


def _unauthorized(headers: Mapping[str, str]) -> ApiError:
    if "authorization" in headers:
        challenge, message = 'Bearer realm="remusd", error="invalid_token"', "bad bearer token"
    else:
        challenge, message = 'Bearer realm="remusd"', "a bearer token is required"
    return ApiError(401, UNAUTHORIZED, message, headers={"www-authenticate": challenge})


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        problem = f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    except (ValueError, RecursionError) as exc:
        # Bad UTF-8, NaN, integers over Python's digit limit, absurd nesting.
        problem = f"is not valid JSON: {exc}"
    raise ApiError(
        400, BAD_REQUEST, f"request body {problem}", {"field": "", "in": "body", "problem": problem}
    )


def _parse_query(route: Route, query_string: str) -> dict[str, Any]:
    try:
        pairs = parse_qsl(query_string, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise _bad_request("query", "", f"more than {MAX_QUERY_FIELDS} fields") from None
    if route.query is None:
        return dict(pairs)
    out: dict[str, Any] = {}
    for name, text in pairs:
        schema = route.query.get(name)
        if schema is None:
            raise _bad_request("query", name, "is not a known parameter")
        value = _convert_query(schema.get("type", "string"), text)
        if value is None:
            raise _bad_request("query", name, f"must be {_article(schema['type'])}")
        validate(schema, value, where="query", prefix=name)
        out[name] = value
    return out


def _convert_query(type_name: str, text: str) -> Any:
    if type_name == "integer":
        return int(text) if re.fullmatch(r"-?[0-9]{1,18}", text) else None
    if type_name == "number":
        try:
            number = float(text)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    if type_name == "boolean":
        return {"true": True, "1": True, "false": False, "0": False}.get(text.lower())
    return text


async def dispatch(
    router: Router,
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    *,
    token: str | None = None,
    transport: str = "unix",
    max_body: int = MAX_BODY,
) -> Rendered | EventStream:
    """One request in, one answer out: every failure is already an error body.

    The only I/O is whatever the handler does; this is what the server calls
    and what a unit test can call without one.
    """
    hdrs = header_dict(headers)
    try:
        route, request = prepare(
            router,
            method,
            target,
            hdrs,
            body,
            token=token,
            transport=transport,
            max_body=max_body,
        )
    except ApiError as exc:
        return render_error(exc)
    try:
        result = await route.handler(request)
        if isinstance(result, EventStream):
            return result
        if not isinstance(result, Response):
            raise TypeError(f"handler returned {type(result).__name__}, not a Response")
        return result.render()
    except ApiError as exc:
        return render_error(exc)
    except Exception:
        return internal_error(f"{method} {route.template}")


def internal_error(what: str) -> Rendered:
    """A 500 whose incident id ties the client's report to the logged traceback."""
    incident = secrets.token_hex(6)
    logger.exception("%s failed (incident %s)", what, incident)
    return render_error(ApiError(500, INTERNAL, "internal server error", {"incident": incident}))


# --------------------------------------------------------------------------
# OpenAPI

_ERROR_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "details"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {"type": ["object", "null"]},
            },
        }
    },
}
_STATUS_TEXT: Final = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    408: "Request timeout",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Unprocessable",
    429: "Too many requests",
    500: "Internal error",
    503: "Unavailable",
}


def route_errors(route: Route) -> dict[int, list[str]]:
    """Declared errors plus the ones the framework may answer with for this route."""
    errors: dict[int, list[str]] = {}

    def add(status: int, code: str) -> None:
        codes = errors.setdefault(status, [])
        if code not in codes:
            codes.append(code)

    for status, code in route.errors:
        add(status, code)
    if route.request_schema is not None or route.param_names or route.query is not None:
        add(400, BAD_REQUEST)
    if route.request_schema is not None:
        add(413, PAYLOAD_TOO_LARGE)
        add(415, UNSUPPORTED_MEDIA_TYPE)
    if not route.public:
        add(401, UNAUTHORIZED)
    add(500, INTERNAL)
    return dict(sorted(errors.items()))


def openapi(
    routes: Iterable[Route], title: str, version: str, *, description: str = ""
) -> dict[str, Any]:
    """An OpenAPI 3.1 document for ``routes``. Schemas are JSON Schema
    2020-12 as 3.1 wants, so the route's own schemas go in unchanged."""
    paths: dict[str, dict[str, Any]] = {}
    op_ids: set[str] = set()
    all_codes: set[str] = set(FRAMEWORK_CODES)
    for route in routes:
        op_id = route.operation_id or str(getattr(route.handler, "__name__", "op"))
        base, n = op_id, 2
        while op_id in op_ids:
            op_id, n = f"{base}_{n}", n + 1
        op_ids.add(op_id)
        op: dict[str, Any] = {"operationId": op_id, "summary": route.summary or op_id}
        if route.description:
            op["description"] = route.description
        if route.tags:
            op["tags"] = list(route.tags)
        params: list[dict[str, Any]] = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": PARAM_PATTERN},
            }
            for name in route.param_names
        ]
        params += [
            {"name": name, "in": "query", "required": False, "schema": dict(schema)}
            for name, schema in (route.query or {}).items()
        ]
        if params:
            op["parameters"] = params
        if route.request_schema is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": dict(route.request_schema)}},
            }
        ok: dict[str, Any] = {"description": route.summary or "Success"}
        if route.status not in (204, 304):
            if route.content_type == "application/json":
                media: dict[str, Any] = {"schema": dict(route.response_schema or {})}
            elif route.content_type == "text/event-stream":
                media = {"schema": {"type": "string", "description": "Server-Sent Events"}}
                if route.response_schema is not None:
                    media["x-event-data-schema"] = dict(route.response_schema)
            else:
                media = {"schema": {"type": "string"}}
            ok["content"] = {route.content_type: media}
        responses: dict[str, Any] = {str(route.status): ok}
        for status, codes in route_errors(route).items():
            all_codes.update(codes)
            schema = json.loads(json.dumps(_ERROR_SCHEMA))
            schema["properties"]["error"]["properties"]["code"]["enum"] = codes
            responses[str(status)] = {
                "description": f"{_STATUS_TEXT.get(status, 'Error')}: {', '.join(codes)}",
                "content": {
                    "application/json": {
                        "schema": schema,
                        "examples": {
                            code: {
                                "value": {
                                    "error": {"code": code, "message": "...", "details": None}
                                }
                            }
                            for code in codes
                        },
                    }
                },
            }
        op["responses"] = responses
        if route.public:
            op["security"] = []
        paths.setdefault(route.template, {})[route.method.lower()] = op
    info: dict[str, Any] = {"title": title, "version": version}
    info["description"] = (description + "\n\n" if description else "") + (
        'Errors are JSON: {"error": {"code", "message", "details"}}. Any path may '
        "answer 404 NOT_FOUND or 405 METHOD_NOT_ALLOWED, and any request 400 BAD_REQUEST "
        "(malformed HTTP), 408 REQUEST_TIMEOUT or 413 PAYLOAD_TOO_LARGE. The bearer token "
        "is required on TCP listeners only; the unix socket's file mode is its access control."
    )
    return {
        "openapi": "3.1.0",
        "info": info,
        "paths": paths,
        "components": {
            "schemas": {
                "Error": _ERROR_SCHEMA,
                "ErrorCode": {"type": "string", "enum": sorted(all_codes)},
            },
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearerAuth": []}],
    }


# --------------------------------------------------------------------------
# The server (asyncio I/O adapter)


class _ClientGone(Exception):
    pass


class HttpServer:
    """Serves a :class:`Router` on unix sockets and TCP (optionally TLS).

    ``token``, if set, is required as a bearer token on TCP listeners only;
    the unix socket's mode (0600 by default) is its access control.
    ``request_timeout`` bounds reading one request once its first byte has
    arrived; ``idle_timeout`` bounds a kept-alive connection waiting for the
    next one. ``shutdown_grace`` is how long :meth:`close` lets handlers
    already running finish; idle connections and event streams are closed
    at once.
    """

    def __init__(
        self,
        router: Router,
        *,
        token: str | None = None,
        max_body: int = MAX_BODY,
        request_timeout: float = 10.0,
        idle_timeout: float = 60.0,
        write_timeout: float = 30.0,
        shutdown_grace: float = 5.0,
    ) -> None:
        if token is not None and not token:
            raise ValueError("an empty bearer token would accept anyone")
        self.router = router
        self.token = token
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.write_timeout = write_timeout
        self.shutdown_grace = shutdown_grace
        self.closing = False
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[tuple[str, int, int]] = []  # path, st_dev, st_ino
        self._connections: set[_Connection] = set()
        # event streams are held open for as long as a client likes: without a cap a
        # client that keeps opening them holds a task and an fd each, for ever
        self.max_connections = MAX_CONNECTIONS

    async def __aenter__(self) -> HttpServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start_unix(self, path: str | os.PathLike[str], mode: int = 0o600) -> None:
        """Listen on a unix socket at ``path`` with file mode ``mode``.

        A stale socket (nothing listening) is replaced; a live one is an
        error, so a second remusd cannot steal the first one's clients.
        """
        path = os.fspath(path)
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            # chmod before listen(): until then a connect is refused, so
            # there is no moment at which the umask's wider mode lets anyone in.
            os.chmod(path, mode)
            st = os.stat(path)
            server = await asyncio.start_unix_server(
                lambda r, w: self._accept(r, w, "unix", None), sock=sock
            )
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        self._servers.append(server)
        self._unix_paths.append((path, st.st_dev, st.st_ino))
        logger.info("listening on unix:%s (mode %04o)", path, mode)

    async def start_tcp(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None = None
    ) -> int:
        """Listen on TCP; returns the bound port (useful with port 0)."""
        if self.token is None:
            logger.warning("TCP listener on %s:%s without a bearer token", host, port)
        elif ssl_context is None:
            logger.warning("TCP listener on %s:%s sends its bearer token in clear", host, port)
        server = await asyncio.start_server(
            lambda r, w: self._accept(r, w, "tcp", self.token),
            host,
            port,
            ssl=ssl_context,
            ssl_handshake_timeout=self.request_timeout if ssl_context else None,
        )
        self._servers.append(server)
        bound = int(server.sockets[0].getsockname()[1])
        logger.info("listening on %s://%s:%d", "https" if ssl_context else "http", host, bound)
        return bound

    async def close(self) -> None:
        """Stop listening, end connections (busy ones get ``shutdown_grace``),
        remove the unix sockets this server created."""
        self.closing = True
        for server in self._servers:
            server.close()
        for conn in list(self._connections):
            if not conn.busy:
                conn.stop()
        busy = [c.task for c in self._connections if c.busy]
        if busy:
            await asyncio.wait(busy, timeout=self.shutdown_grace)
        for conn in list(self._connections):
            conn.stop()
        tasks = [c.task for c in self._connections]
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=5.0)
            if stuck:
                # Their sockets are aborted already; do not hang the shutdown on them.
                logger.warning("%d connections did not end on close", len(stuck))
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        for path, dev, ino in self._unix_paths:
            # Only our own socket: a successor may already have bound the path.
            with contextlib.suppress(OSError):
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == (dev, ino):
                    os.unlink(path)
        self._unix_paths.clear()

    async def _accept(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        transport: str,
        token: str | None,
    ) -> None:
        if self.closing or len(self._connections) >= self.max_connections:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        conn = _Connection(self, reader, writer, transport, token, task)
        self._connections.add(conn)
        try:
            await conn.run()
        except asyncio.CancelledError:
            # close() cancelled us, and this task is the connection's top level:
            # nobody awaits it but asyncio's streams, whose done-callback (3.11)
            # logs a cancelled task as an error. Ending normally is the truth.
            pass
        finally:
            self._connections.discard(conn)


MAX_CONNECTIONS = 256  # open API connections, event streams included


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Blocking, once, at start-up; a unix connect only waits when the
    # listener's backlog is full, and then it is certainly alive.
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


class _Connection:
    """One client connection: bytes between the socket and h11, requests to
    :func:`dispatch`, answers back."""

    def __init__(
        self,
        server: HttpServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        transport: str,
        token: str | None,
        task: asyncio.Task[Any],
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.transport = transport
        self.token = token
        self.task = task
        self.busy = False
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"

    def stop(self) -> None:
        """End the connection now. The abort comes first: it makes any read
        or write fail, so the connection ends even where a cancellation is
        lost (a library that swallows CancelledError, a handler that does)."""
        self.writer.transport.abort()
        self.task.cancel()

    async def run(self) -> None:
        try:
            while not self.server.closing:
                got = await self._read_request()
                if got is None:
                    break
                request, body = got
                if not await self._answer(request, body):
                    break
                if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                    self.h11.start_next_cycle()
                else:
                    break
            self.writer.close()
        except _ClientGone:
            self.writer.transport.abort()
        except (OSError, TimeoutError) as exc:
            # Resets, broken pipes, TLS failures, a client that stopped reading.
            logger.debug("connection from %s ended: %r", self.peer, exc)
            self.writer.transport.abort()
        except asyncio.CancelledError:
            self.writer.transport.abort()
            raise
        except Exception:
            logger.exception("connection from %s failed", self.peer)
            self.writer.transport.abort()

    async def _read_request(self) -> tuple[h11.Request, bytes] | None:
        """The next whole request, or None when the connection should end
        (already answered with an error if the client deserved one)."""
        loop = asyncio.get_running_loop()
        started = bool(self.h11.trailing_data[0])  # a pipelined request is waiting
        deadline = loop.time() + (
            self.server.request_timeout if started else self.server.idle_timeout
        )
        request: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                await self._fail(
                    ApiError(exc.error_status_hint, BAD_REQUEST, f"malformed HTTP request: {exc}")
                )
                return None
            if event is h11.NEED_DATA:
                if self.h11.they_are_waiting_for_100_continue:
                    await self._send(h11.InformationalResponse(status_code=100, headers=[]))
                try:
                    # asyncio.timeout, never wait_for: on 3.11, wait_for swallows a
                    # cancellation that arrives as the awaited thing completes,
                    # and close() would wait for this connection forever.
                    async with asyncio.timeout_at(deadline):
                        data = await self.reader.read(READ_SIZE)
                except TimeoutError:
                    if started:
                        await self._fail(
                            ApiError(408, REQUEST_TIMEOUT, "the request took too long to arrive")
                        )
                    return None
                if data and not started:
                    started = True
                    deadline = loop.time() + self.server.request_timeout
                self.h11.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
                length = _content_length(event)
                if length is not None and length > self.server.max_body:
                    await self._fail(_too_large(self.server.max_body))
                    return None
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.server.max_body:
                    await self._fail(_too_large(self.server.max_body))
                    return None
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, bytes(body)
            else:  # ConnectionClosed, or PAUSED (cannot happen: we start each cycle)
                return None

    async def _answer(self, request: h11.Request, body: bytes) -> bool:
        """Dispatch and send; False if the connection must end."""
        try:
            method = request.method.decode("ascii")
            target = request.target.decode("ascii")
        except UnicodeDecodeError:
            await self._fail(ApiError(400, BAD_REQUEST, "the request line must be ASCII"))
            return False
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.headers]
        self.busy = True
        try:
            result = await dispatch(
                self.server.router,
                method,
                target,
                headers,
                body,
                token=self.token,
                transport=self.transport,
                max_body=self.server.max_body,
            )
            logger.debug(
                "%s %s %s -> %s",
                self.peer,
                method,
                target,
                result.status if isinstance(result, Rendered) else "stream",
            )
            if isinstance(result, EventStream):
                self.busy = False
                await self._stream(result, head_only=method == "HEAD")
            else:
                await self._send_rendered(result, head_only=method == "HEAD")
        finally:
            self.busy = False
        return True

    async def _send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            self.writer.write(data)
            async with asyncio.timeout(self.server.write_timeout):
                await self.writer.drain()

    async def _send_rendered(self, rendered: Rendered, *, head_only: bool = False) -> None:
        headers = rendered.headers
        if self.server.closing:
            headers = [*headers, ("connection", "close")]
        await self._send(h11.Response(status_code=rendered.status, headers=_encode(headers)))
        if rendered.body and not head_only:
            await self._send(h11.Data(data=rendered.body))
        await self._send(h11.EndOfMessage())

    async def _fail(self, exc: ApiError) -> None:
        """Answer with an error and close: after a protocol error, a timeout or
        an unread body, the byte stream no longer tells where a next request
        would start."""
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(h11.LocalProtocolError):
                await self._send_rendered(render_error(exc, close=True))
        await self._linger()

    async def _linger(self) -> None:
        """Half-close, then read and drop what the client is still sending, for
        a moment: closing with unread data makes the kernel send a reset that
        can destroy our error response before the client reads it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        dropped = 0
        with contextlib.suppress(OSError, TimeoutError):
            if self.writer.can_write_eof():
                self.writer.write_eof()
            async with asyncio.timeout_at(deadline):
                while dropped < 16 * MAX_BODY:
                    data = await self.reader.read(READ_SIZE)
                    if not data:
                        break
                    dropped += len(data)

    async def _stream(self, stream: EventStream, *, head_only: bool) -> None:
        headers = stream.response_headers()
        if self.server.closing:
            headers.append(("connection", "close"))
        await self._send(h11.Response(status_code=200, headers=_encode(headers)))
        events = aiter(stream.events)
        if head_only:
            await _aclose(events)
            await self._send(h11.EndOfMessage())
            return
        gone = asyncio.create_task(self._watch_for_disconnect())
        pending: asyncio.Future[tuple[str, Any, str | None]] | None = None
        try:
            if stream.retry_ms is not None:
                await self._send(h11.Data(data=f"retry: {int(stream.retry_ms)}\n\n".encode()))
            while True:
                pending = asyncio.ensure_future(anext(events))
                while True:
                    done, _ = await asyncio.wait(
                        {pending, gone},
                        timeout=stream.ping_interval,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if gone in done:
                        raise _ClientGone
                    if pending in done:
                        break
                    await self._send(h11.Data(data=b": ping\n\n"))
                finished, pending = pending, None
                try:
                    name, data, event_id = finished.result()
                    chunk = encode_sse(name, data, event_id)
                except StopAsyncIteration:
                    break
                except Exception:
                    incident = secrets.token_hex(6)
                    logger.exception("event stream failed (incident %s)", incident)
                    error = ApiError(
                        500, INTERNAL, "the event stream failed", {"incident": incident}
                    )
                    await self._send(h11.Data(data=encode_sse("error", error.body())))
                    break
                await self._send(h11.Data(data=chunk))
            await self._send(h11.EndOfMessage())
        finally:
            # Wait for the watcher to be gone: a StreamReader allows one reader
            # at a time, and the next request is read from this one.
            gone.cancel()
            await asyncio.wait({gone})
            if pending is not None:
                # Cancel the waiting __anext__ first: an async generator cannot
                # be closed while it is running.
                pending.cancel()
                await asyncio.wait({pending})
            await _aclose(events)

    async def _watch_for_disconnect(self) -> None:
        """Returns when the client has gone. Bytes it sends meanwhile (a
        pipelined request) are kept for h11, up to a limit."""
        kept = 0
        try:
            while True:
                data = await self.reader.read(READ_SIZE)
                if not data:
                    return
                kept += len(data)
                if kept > self.server.max_body + MAX_HEADER_BYTES:
                    return
                self.h11.receive_data(data)
        except (OSError, h11.RemoteProtocolError):
            return


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            logger.exception("closing an event stream's iterator failed")


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)
    return None


def _too_large(limit: int) -> ApiError:
    return ApiError(413, PAYLOAD_TOO_LARGE, f"request body over {limit} bytes", {"limit": limit})


def _encode(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(n.encode("ascii"), v.encode("latin-1")) for n, v in headers]
