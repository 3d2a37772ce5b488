"""A synchronous client for remusd's HTTP API, for the CLI: httpx, and httpx-sse for events.

It talks over remusd's unix socket (httpx's ``uds`` transport) or, with ``base_url``,
over TCP with TLS and a bearer token. httpx is imported when a client is made, not
with this module: the CLI's in-process modes (``protect --foreground``, ``receive``)
run where it is not installed, as in the nested lab's dom0. Errors come in two
kinds, both :class:`ClientError`: :class:`ApiClientError` when remusd answered with
an error body (its code is stable, switch on it), :class:`ConnectionFailed` when
there was no usable answer at all (not running, refused, TLS, timeout).
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Final, NamedTuple

if TYPE_CHECKING:
    import httpx

DEFAULT_SOCKET: Final = "/run/remus/remusd.sock"
# methods safe to resend when a kept-alive connection turns out to have been closed
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


class ApiClient:
    """Talks to remusd over its unix socket (default) or ``base_url``.

    Connections are kept alive across :meth:`request` calls; each :meth:`events`
    stream holds one of its own, so requests can be made while a stream is read.
    Use as a context manager, or call :meth:`close`.
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
        try:
            import httpx
            import httpx_sse  # noqa: F401 (for events(), found missing now rather than then)
        except ImportError as exc:
            raise ConnectionFailed(f"remusctl's client needs httpx and httpx-sse: {exc}") from None
        self.timeout = timeout
        self.unix = base_url is None
        if base_url is None:
            self.where = os.fspath(unix_path if unix_path is not None else DEFAULT_SOCKET)
            transport = httpx.HTTPTransport(uds=self.where)
            base_url = "http://localhost"
        else:
            url = httpx.URL(base_url)
            if url.scheme not in ("http", "https") or not url.host:
                raise ValueError(f"base_url {base_url!r} is not http(s)://host[:port]")
            self.where = base_url
            transport = httpx.HTTPTransport(verify=ssl_context or ssl.create_default_context())
        headers = {"Accept": "application/json", "User-Agent": "remusctl"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        # trust_env=False: no proxy from the environment between remusctl and remusd
        self._http = httpx.Client(
            base_url=base_url, transport=transport, headers=headers, timeout=timeout,
            trust_env=False,
        )  # fmt: skip

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, json: Any = None) -> Any:
        """``method`` on ``path`` (which may carry a query string), with ``json`` as
        the body unless None. Returns the parsed JSON answer (None for an empty one;
        str for text, bytes for anything else)."""
        import httpx

        method = method.upper()
        body = None if json is None else _json_dumps(json)
        headers = {} if body is None else {"Content-Type": "application/json"}
        for attempt in (1, 2):
            try:
                response = self._http.request(method, path, content=body, headers=headers)
            except httpx.RemoteProtocolError as exc:
                if attempt == 1 and method in _IDEMPOTENT:
                    continue  # the server had closed the idle connection
                raise self._failed(exc) from exc
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise self._failed(exc) from exc
            return _decode(response)
        raise AssertionError("unreachable")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, json: Any = None) -> Any:
        return self.request("POST", path, json)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def events(
        self, path: str, *, timeout: float | None = None, last_event_id: str | None = None
    ) -> Generator[ServerSentEvent, None, None]:
        """Open a Server-Sent Events stream and return an iterator over it.

        Connecting and the response status are checked here, so errors come at the
        call; the iterator ends when remusd ends the stream. Without a ``timeout`` a
        read waits forever (remusd sends a comment every 15 s, so a timeout a little
        above that detects a dead server). Closing the iterator (``break`` in a for
        loop, or ``.close()``) closes the connection.
        """
        import httpx

        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        when = httpx.Timeout(timeout, connect=self.timeout)
        try:
            request = self._http.build_request("GET", path, headers=headers, timeout=when)
            response = self._http.send(request, stream=True)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise self._failed(exc) from exc
        if response.status_code != 200:
            try:
                response.read()
            except httpx.HTTPError as exc:
                raise self._failed(exc) from exc
            finally:
                response.close()
            _decode(response)  # raises ApiClientError for an error status
        ctype = response.headers.get("Content-Type", "").partition(";")[0].strip()
        if ctype != "text/event-stream":
            response.close()
            raise ApiClientError(
                response.status_code, "BAD_RESPONSE", f"{path} is not an event stream ({ctype})"
            )
        return self._read_events(response)

    def _read_events(self, response: httpx.Response) -> Generator[ServerSentEvent, None, None]:
        import httpx
        from httpx_sse import EventSource

        try:
            for sse in EventSource(response).iter_sse():
                try:
                    data: Any = json.loads(sse.data)
                except ValueError:
                    data = sse.data
                yield ServerSentEvent(sse.event, data, sse.id or None)
        except httpx.HTTPError as exc:
            raise ConnectionFailed(
                f"the event stream from remusd at {self.where} broke: {exc!r}"
            ) from exc
        finally:
            response.close()

    def _failed(self, exc: Exception) -> ConnectionFailed:
        import httpx

        where = self.where
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if self.unix and isinstance(cause, FileNotFoundError):
            return ConnectionFailed(f"remusd is not running (no socket at {where})")
        if self.unix and isinstance(cause, ConnectionRefusedError):
            return ConnectionFailed(f"remusd is not running (nothing listening on {where})")
        if self.unix and isinstance(cause, PermissionError):
            return ConnectionFailed(
                f"permission denied on {where}: the socket is for its owner only "
                "(run as the user remusd runs as, or root)"
            )
        if isinstance(cause, ssl.SSLError):
            return ConnectionFailed(f"TLS with remusd at {where} failed: {cause}")
        if isinstance(exc, httpx.TimeoutException):
            return ConnectionFailed(f"remusd at {where} did not answer within {self.timeout} s")
        if isinstance(cause, ConnectionRefusedError):
            return ConnectionFailed(f"cannot connect to remusd at {where}: connection refused")
        if isinstance(exc, httpx.RemoteProtocolError):
            return ConnectionFailed(f"remusd at {where} closed the connection without answering")
        if cause is not None:
            return ConnectionFailed(f"cannot talk to remusd at {where}: {cause.strerror or cause}")
        return ConnectionFailed(f"bad answer from remusd at {where}: {exc!r}")


def _json_dumps(value: Any) -> bytes:
    # ASCII: a lone surrogate travels as its \\u escape, for remusd to judge
    return json.dumps(value, allow_nan=False, separators=(",", ":")).encode()


def _decode(response: httpx.Response) -> Any:
    ctype = response.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    data, status = response.content, response.status_code
    parsed: Any = None
    if ctype == "application/json" and data:
        try:
            parsed = json.loads(data)
        except ValueError:
            if 200 <= status < 300:
                raise ApiClientError(status, "BAD_RESPONSE", "remusd sent invalid JSON") from None
    if 200 <= status < 300:
        if ctype == "application/json" or not data:
            return parsed
        return response.text if ctype.startswith("text/") else data
    headers = {k.lower(): v for k, v in response.headers.items()}
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        details = error.get("details")
        raise ApiClientError(
            status,
            error["code"],
            str(error.get("message", "")),
            details if isinstance(details, dict) else None,
            headers=headers,
        )
    # not remusd's error shape (a proxy in between, say): keep what there is
    snippet = data[:200].decode("utf-8", errors="replace").strip()
    reason = response.reason_phrase
    message = f"{reason}: {snippet}" if snippet else reason
    raise ApiClientError(status, f"HTTP_{status}", message, headers=headers)
