"""A small synchronous client for remusd's HTTP API, for the CLI.

Built on http.client so that remusctl starts fast and needs nothing beyond
the standard library: :class:`UnixHTTPConnection` is an HTTPConnection whose
socket is AF_UNIX. Errors come in two kinds, both :class:`ClientError`:
:class:`ApiClientError` when remusd answered with an error body (its code is
stable, switch on it), :class:`ConnectionFailed` when there was no usable
answer at all (not running, refused, TLS, timeout).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
from collections.abc import Generator
from typing import Any, Final, NamedTuple
from urllib.parse import urlsplit

DEFAULT_SOCKET: Final = "/run/remus/remusd.sock"
# Methods safe to resend when a kept-alive connection turns out to have been
# closed by the server while idle.
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


class ClientError(Exception):
    """Base of everything this client raises."""


class ApiClientError(ClientError):
    """remusd answered with an error: ``code`` is the stable part."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{message} ({code}, HTTP {status})")
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}


class ConnectionFailed(ClientError):
    """No answer from remusd; the message says why in an operator's terms."""


class ServerSentEvent(NamedTuple):
    event: str
    data: Any  # parsed JSON; the raw text if it was not JSON
    id: str | None


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket. The Host header says "localhost"."""

    def __init__(self, path: str, timeout: float | None = None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ApiClient:
    """Talks to remusd over its unix socket (default) or ``base_url``.

    One connection is kept alive across :meth:`request` calls; each
    :meth:`events` stream has its own, so requests can be made while a
    stream is being read. Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        unix_path: str | os.PathLike[str] | None = None,
        *,
        base_url: str | None = None,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
    ) -> None:
        if unix_path is not None and base_url is not None:
            raise ValueError("give unix_path or base_url, not both")
        self.timeout = timeout
        self.token = token
        self._unix_path: str | None = None
        self._prefix = ""
        if base_url is None:
            self._unix_path = os.fspath(unix_path if unix_path is not None else DEFAULT_SOCKET)
            self.where = self._unix_path
        else:
            url = urlsplit(base_url)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ValueError(f"base_url {base_url!r} is not http(s)://host[:port]")
            self._scheme = url.scheme
            self._host = url.hostname
            self._port = url.port or (443 if url.scheme == "https" else 80)
            self._prefix = url.path.rstrip("/")
            self._ssl_context = ssl_context
            self.where = base_url
        self._conn: http.client.HTTPConnection | None = None

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ------------------------------------------------------------------

    def request(self, method: str, path: str, json: Any = None) -> Any:
        """``method`` on ``path`` (which may carry a query string), with
        ``json`` as the body unless None. Returns the parsed JSON answer (None
        for an empty one; str for text, bytes for anything else)."""
        method = method.upper()
        headers = self._headers("application/json")
        body: bytes | None = None
        if json is not None:
            body = _json_dumps(json)
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = self._new_connection(self.timeout)
            conn = self._conn
            reused = conn.sock is not None
            try:
                conn.request(method, self._prefix + path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self.close()
                if reused and attempt == 1 and method in _IDEMPOTENT:
                    continue  # the server had closed the idle connection
                raise self._failed(exc) from exc
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise self._failed(exc) from exc
            return _decode(response, data)
        raise AssertionError("unreachable")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, json: Any = None) -> Any:
        return self.request("POST", path, json)

    def put(self, path: str, json: Any = None) -> Any:
        return self.request("PUT", path, json)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def events(
        self, path: str, *, timeout: float | None = None, last_event_id: str | None = None
    ) -> Generator[ServerSentEvent, None, None]:
        """Open a Server-Sent Events stream and return an iterator over it.

        Connecting and the response status are checked here, so errors come
        at the call; the iterator ends when remusd ends the stream. Without
        a ``timeout`` a read waits forever (remusd sends a comment every
        15 s, so a timeout a little above that detects a dead server).
        Closing the iterator (``break`` in a for loop, or ``.close()``)
        closes the connection.
        """
        conn = self._new_connection(timeout)
        headers = self._headers("text/event-stream")
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        try:
            conn.request("GET", self._prefix + path, headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise self._failed(exc) from exc
        if response.status != 200:
            try:
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                raise self._failed(exc) from exc
            finally:
                conn.close()
            _decode(response, data)  # raises ApiClientError for an error status
        ctype = (response.getheader("Content-Type") or "").partition(";")[0].strip()
        if ctype != "text/event-stream":
            conn.close()
            raise ApiClientError(
                response.status, "BAD_RESPONSE", f"{path} is not an event stream ({ctype})"
            )
        return self._read_events(conn, response)

    def _read_events(
        self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse
    ) -> Generator[ServerSentEvent, None, None]:
        # read1, not readline: http.client's readline says b"" both at the
        # terminal chunk and when the connection broke mid-stream, read1
        # raises IncompleteRead for the second.
        parser = SseParser()
        buffer = b""
        try:
            while True:
                try:
                    data = response.read1(65536)
                except (OSError, http.client.HTTPException) as exc:
                    raise ConnectionFailed(
                        f"the event stream from remusd at {self.where} broke: {exc!r}"
                    ) from exc
                if not data:
                    return
                *lines, buffer = (buffer + data).split(b"\n")
                for line in lines:
                    event = parser.feed_line(line.decode("utf-8", errors="replace"))
                    if event is not None:
                        yield event
        finally:
            conn.close()

    # ------------------------------------------------------------------

    def _headers(self, accept: str) -> dict[str, str]:
        headers = {"Accept": accept, "User-Agent": "remusctl"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _new_connection(self, timeout: float | None) -> http.client.HTTPConnection:
        if self._unix_path is not None:
            return UnixHTTPConnection(self._unix_path, timeout=timeout)
        if self._scheme == "https":
            context = self._ssl_context or ssl.create_default_context()
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=context
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _failed(self, exc: BaseException) -> ConnectionFailed:
        where = self.where
        if self._unix_path is not None:
            if isinstance(exc, FileNotFoundError):
                return ConnectionFailed(f"remusd is not running (no socket at {where})")
            if isinstance(exc, ConnectionRefusedError):
                return ConnectionFailed(f"remusd is not running (nothing listening on {where})")
            if isinstance(exc, PermissionError):
                return ConnectionFailed(
                    f"permission denied on {where}: the socket is for its owner only "
                    "(run as the user remusd runs as, or root)"
                )
        if isinstance(exc, ssl.SSLError):
            return ConnectionFailed(f"TLS with remusd at {where} failed: {exc}")
        if isinstance(exc, TimeoutError):
            return ConnectionFailed(f"remusd at {where} did not answer within {self.timeout} s")
        if isinstance(exc, ConnectionRefusedError):
            return ConnectionFailed(f"cannot connect to remusd at {where}: connection refused")
        if isinstance(exc, http.client.RemoteDisconnected):
            return ConnectionFailed(f"remusd at {where} closed the connection without answering")
        if isinstance(exc, OSError):
            return ConnectionFailed(f"cannot talk to remusd at {where}: {exc.strerror or exc}")
        return ConnectionFailed(f"bad answer from remusd at {where}: {exc!r}")


class SseParser:
    """text/event-stream, line by line (sans I/O), as the WHATWG spec reads it.

    ``id`` persists from event to event, as the spec's last event ID does:
    it is what a reconnecting client sends back as Last-Event-ID.
    """

    def __init__(self) -> None:
        self.last_id: str | None = None
        self._event = ""
        self._data: list[str] = []

    def feed_line(self, line: str) -> ServerSentEvent | None:
        """One line, with or without its LF or CRLF (a lone CR as a line end,
        which the spec also allows, is not split on)."""
        line = line.rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_id = value
        return None  # "retry" and unknown fields: nothing for a CLI to do

    def _dispatch(self) -> ServerSentEvent | None:
        event, self._event = self._event or "message", ""
        if not self._data:
            return None
        text, self._data = "\n".join(self._data), []
        try:
            data: Any = json.loads(text)
        except ValueError:
            data = text
        return ServerSentEvent(event, data, self.last_id)


def _json_dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=False, separators=(",", ":")).encode()


def _decode(response: http.client.HTTPResponse, data: bytes) -> Any:
    ctype = (response.getheader("Content-Type") or "").partition(";")[0].strip().lower()
    parsed: Any = None
    if ctype == "application/json" and data:
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = None
            if 200 <= response.status < 300:
                raise ApiClientError(
                    response.status, "BAD_RESPONSE", "remusd sent invalid JSON"
                ) from None
    if 200 <= response.status < 300:
        if ctype == "application/json" or not data:
            return parsed
        return data.decode("utf-8", errors="replace") if ctype.startswith("text/") else data
    headers = {k.lower(): v for k, v in response.getheaders()}
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        details = error.get("details")
        raise ApiClientError(
            response.status,
            error["code"],
            str(error.get("message", "")),
            details if isinstance(details, dict) else None,
            headers=headers,
        )
    # Not remusd's error shape (a proxy in between, say): keep what there is.
    snippet = data[:200].decode("utf-8", errors="replace").strip()
    message = f"{response.reason}: {snippet}" if snippet else response.reason
    raise ApiClientError(response.status, f"HTTP_{response.status}", message, headers=headers)
