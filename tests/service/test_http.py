"""remusd's HTTP framework and client, against a real server.

The server runs on an asyncio loop in a background thread of the test
process, listening on a unix socket in a temporary directory and on TCP
loopback with TLS and a bearer token; the tests talk to it with the real
synchronous client (and with raw sockets for what a client would not send).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import os
import socket
import ssl
import stat
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.service.client import (
    ApiClient,
    ApiClientError,
    ConnectionFailed,
    ServerSentEvent,
    SseParser,
    UnixHTTPConnection,
)
from orchestrator.service.http import (
    FRAMEWORK_CODES,
    ApiError,
    EventStream,
    HttpServer,
    Rendered,
    Request,
    Response,
    Route,
    Router,
    check_schema,
    dispatch,
    encode_sse,
    openapi,
    validate,
)

T = TypeVar("T")
TOKEN = "s3cret-token"

THING = {
    "type": "object",
    "required": ["name", "settings"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z][a-z0-9-]*$", "maxLength": 32},
        "mode": {"type": "string", "enum": ["remus", "colo"]},
        "settings": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "interval_ms": {"type": "integer", "minimum": 10, "maximum": 60000},
                "compress": {"type": "boolean"},
            },
        },
        "disks": {
            "type": "array",
            "maxItems": 4,
            "items": {
                "type": "object",
                "required": ["path"],
                "properties": {"path": {"type": "string", "minLength": 1}},
            },
        },
    },
}
SETTINGS = THING["properties"]["settings"]  # type: ignore[index]


# --------------------------------------------------------------------------
# The application under test


class App:
    """A toy application on the framework; threading.Events let the test
    thread see what happened on the server's loop."""

    def __init__(self) -> None:
        self.stream_closed = threading.Event()
        self.router = Router(title="test", version="0.1")
        r = self.router
        r.add(Route("GET", "/v1/health", self.health, summary="Liveness", public=True))
        r.add(
            Route(
                "GET",
                "/v1/things",
                self.list_things,
                summary="List",
                query={
                    "limit": {"type": "integer", "minimum": 1, "maximum": 100},
                    "verbose": {"type": "boolean"},
                },
            )
        )
        r.add(
            Route(
                "POST",
                "/v1/things",
                self.create_thing,
                summary="Create",
                request_schema=THING,
                response_schema=THING,
                status=201,
                errors=[(409, "CONFLICT")],
                tags=["things"],
            )
        )
        r.add(Route("GET", "/v1/things/_count", self.count, summary="Count"))
        r.add(
            Route(
                "GET",
                "/v1/things/{name}",
                self.get_thing,
                errors=[(404, "NOT_FOUND"), (409, "CONFLICT"), (409, "BUSY")],
            )
        )
        r.add(Route("DELETE", "/v1/things/{name}", self.delete_thing, status=204))
        r.add(
            Route(
                "PUT",
                "/v1/things/{name}/settings",
                self.put_settings,
                request_schema=SETTINGS,
                errors=[(404, "NOT_FOUND")],
            )
        )
        r.add(Route("GET", "/v1/boom", self.boom))
        r.add(Route("GET", "/v1/events", self.events, content_type="text/event-stream"))
        r.add(Route("GET", "/v1/events/forever", self.forever, content_type="text/event-stream"))
        r.add(Route("GET", "/metrics", self.metrics, content_type="text/plain"))

    async def health(self, req: Request) -> Response:
        return Response(200, {"ok": True, "transport": req.transport})

    async def list_things(self, req: Request) -> Response:
        return Response(200, {"query": req.query})

    async def create_thing(self, req: Request) -> Response:
        if req.body["name"] == "taken":
            raise ApiError(409, "CONFLICT", "thing exists", {"name": "taken"})
        return Response(201, req.body, headers={"Location": f"/v1/things/{req.body['name']}"})

    async def count(self, req: Request) -> Response:
        return Response(200, {"count": 3})

    async def get_thing(self, req: Request) -> Response:
        if req.params["name"] == "missing":
            raise ApiError(404, "NOT_FOUND", "no such thing")
        return Response(200, {"name": req.params["name"]})

    async def delete_thing(self, req: Request) -> Response:
        return Response(204)

    async def put_settings(self, req: Request) -> Response:
        return Response(200, {"name": req.params["name"], "settings": req.body})

    async def boom(self, req: Request) -> Response:
        raise RuntimeError("secret-internal-detail")

    async def events(self, req: Request) -> EventStream:
        async def gen() -> AsyncIterator[tuple[str, Any, str | None]]:
            for i in range(3):
                yield ("tick", {"i": i}, str(i))
            yield ("done", None, None)

        return EventStream(gen())

    async def forever(self, req: Request) -> EventStream:
        async def gen() -> AsyncIterator[tuple[str, Any, str | None]]:
            try:
                i = 0
                while True:
                    yield ("tick", {"i": i}, str(i))
                    i += 1
                    await asyncio.sleep(0.01)
            finally:
                self.stream_closed.set()

        return EventStream(gen(), ping_interval=0.05)

    async def metrics(self, req: Request) -> Response:
        return Response(raw=b"remus_up 1\n", content_type="text/plain; version=0.0.4")


# --------------------------------------------------------------------------
# Fixtures: a loop thread, a server, certificates


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def make_cert(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "remusd-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass
class Served:
    app: App
    server: HttpServer
    sock: Path
    port: int
    client_ssl: ssl.SSLContext
    lt: LoopThread


@pytest.fixture(scope="module")
def lt() -> Iterator[LoopThread]:
    loop_thread = LoopThread()
    yield loop_thread
    loop_thread.stop()


@pytest.fixture(scope="module")
def served(lt: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("srv")
    cert, key = make_cert(directory)
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(cert, key)
    client_ssl = ssl.create_default_context(cafile=str(cert))
    app = App()
    server = HttpServer(app.router, token=TOKEN, request_timeout=5.0)
    sock = directory / "remusd.sock"
    lt.run(server.start_unix(sock))
    port = lt.run(server.start_tcp("127.0.0.1", 0, ssl_context=server_ssl))
    yield Served(app, server, sock, port, client_ssl, lt)
    lt.run(server.close())


@pytest.fixture(scope="module")
def client(served: Served) -> Iterator[ApiClient]:
    with ApiClient(served.sock, timeout=10) as c:
        yield c


def api_error(call: Any, *args: Any) -> ApiClientError:
    with pytest.raises(ApiClientError) as info:
        call(*args)
    return info.value


# Raw HTTP, for what the client would never send.


def raw_connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s


def read_response(f: Any) -> tuple[int, dict[str, str], bytes]:
    """One Content-Length-framed response from a socket file."""
    status_line = f.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = f.read(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


# --------------------------------------------------------------------------
# Routing


def test_routes_params_and_literals(client: ApiClient) -> None:
    assert client.get("/v1/things/web-1.a_b") == {"name": "web-1.a_b"}
    assert client.get("/v1/things/x%2Dy") == {"name": "x-y"}  # URL-decoded
    assert client.get("/v1/things/_count") == {"count": 3}  # the literal beats {name}
    assert client.post("/v1/things", {"name": "a", "settings": {}}) == {
        "name": "a",
        "settings": {},
    }
    assert client.delete("/v1/things/a") is None
    assert client.get("/metrics") == "remus_up 1\n"
    err = api_error(client.get, "/v1/things/bad%20name")
    assert (err.status, err.code) == (400, "BAD_REQUEST")
    assert err.details == {"field": "name", "in": "path", "problem": "must match ^[A-Za-z0-9_.-]+$"}
    err = api_error(client.get, "/v1/things/missing")
    assert (err.status, err.code, err.message) == (404, "NOT_FOUND", "no such thing")


def test_404_and_405(client: ApiClient) -> None:
    err = api_error(client.get, "/v1/nothing/here")
    assert (err.status, err.code) == (404, "NOT_FOUND")
    err = api_error(client.get, "/v1/things/")  # an empty param does not match
    assert err.status == 404
    err = api_error(client.request, "PATCH", "/v1/things/x")
    assert (err.status, err.code) == (405, "METHOD_NOT_ALLOWED")
    assert err.headers["allow"] == "DELETE, GET, HEAD"
    assert err.details == {"allowed": ["DELETE", "GET", "HEAD"]}


def test_head_is_get_without_a_body(served: Served) -> None:
    conn = UnixHTTPConnection(str(served.sock), timeout=5)
    conn.request("HEAD", "/v1/things/abc")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("content-length") == str(len(b'{"name":"abc"}'))
    assert resp.read() == b""
    conn.close()


def test_query_params_are_converted_and_checked(client: ApiClient) -> None:
    assert client.get("/v1/things?limit=5&verbose=true") == {"query": {"limit": 5, "verbose": True}}
    for query, problem in [
        ("limit=0", "must be >= 1"),
        ("limit=abc", "must be an integer"),
        ("verbose=maybe", "must be a boolean"),
        ("color=red", "is not a known parameter"),
    ]:
        err = api_error(client.get, f"/v1/things?{query}")
        assert err.code == "BAD_REQUEST"
        assert err.details is not None
        assert err.details["in"] == "query"
        assert err.details["field"] == query.partition("=")[0]
        assert err.details["problem"] == problem


# --------------------------------------------------------------------------
# Request bodies


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        ({"settings": {}}, "name", "is required"),
        ({"name": 5, "settings": {}}, "name", "must be a string, not an integer"),
        ({"name": "Web", "settings": {}}, "name", "must match the pattern ^[a-z][a-z0-9-]*$"),
        ({"name": "a" * 33, "settings": {}}, "name", "must be at most 32 characters long"),
        ({"name": "a", "settings": {}, "mode": "x"}, "mode", 'must be one of "remus", "colo"'),
        (
            {"name": "a", "settings": {"interval_ms": 60001}},
            "settings.interval_ms",
            "must be <= 60000",
        ),
        (
            {"name": "a", "settings": {"interval_ms": True}},
            "settings.interval_ms",
            "must be an integer, not a boolean",
        ),
        ({"name": "a", "settings": {"colour": 1}}, "settings.colour", "is not an allowed field"),
        (
            {"name": "a", "settings": {}, "disks": [{"path": "/x"}, {}]},
            "disks[1].path",
            "is required",
        ),
        ([1, 2], "", "must be an object, not an array"),
    ],
)
def test_validation_errors_name_the_field(
    client: ApiClient, body: Any, field: str, problem: str
) -> None:
    err = api_error(client.post, "/v1/things", body)
    assert (err.status, err.code) == (400, "BAD_REQUEST")
    assert err.details == {"field": field, "in": "body", "problem": problem}
    assert problem in err.message


def test_body_must_be_json(served: Served) -> None:
    conn = UnixHTTPConnection(str(served.sock), timeout=5)

    def post(body: bytes, ctype: str | None) -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": ctype} if ctype else {}
        conn.request("PUT", "/v1/things/a/settings", body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())

    status, body = post(b"interval_ms=5", "application/x-www-form-urlencoded")
    assert (status, body["error"]["code"]) == (415, "UNSUPPORTED_MEDIA_TYPE")
    status, body = post(b"{}", None)
    assert (status, body["error"]["code"]) == (415, "UNSUPPORTED_MEDIA_TYPE")
    status, body = post(b'{"interval_ms": ', "application/json")
    assert (status, body["error"]["code"]) == (400, "BAD_REQUEST")
    assert "not valid JSON" in body["error"]["message"]
    status, body = post(b'{"interval_ms": NaN}', "application/json; charset=utf-8")
    assert (status, body["error"]["code"]) == (400, "BAD_REQUEST")
    status, body = post(b"[" * 100_000, "application/json")
    assert (status, body["error"]["code"]) == (400, "BAD_REQUEST")
    status, body = post(b"", None)
    assert (status, body["error"]["details"]["problem"]) == (
        400,
        "a JSON request body is required",
    )
    status, body = post(b'{"interval_ms": 100}', "application/json; charset=utf-8")
    assert (status, body) == (200, {"name": "a", "settings": {"interval_ms": 100}})
    conn.close()


def test_payload_too_large(served: Served, client: ApiClient) -> None:
    err = api_error(client.post, "/v1/things", {"name": "x" * (2 << 20), "settings": {}})
    assert (err.status, err.code) == (413, "PAYLOAD_TOO_LARGE")
    # Chunked, so the server only finds out while reading.
    with raw_connect(served.sock) as s, s.makefile("rb") as f:
        s.sendall(
            b"POST /v1/things HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n%s\r\n" % (256 * 1024, b" " * 256 * 1024)
        for _ in range(5):
            s.sendall(chunk)
        status, headers, body = read_response(f)
        assert status == 413
        assert headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "PAYLOAD_TOO_LARGE"
        assert f.read() == b""
    assert client.get("/v1/health")["ok"] is True


# --------------------------------------------------------------------------
# The connection


def test_malformed_http_is_400_and_closes(served: Served) -> None:
    for garbage in [
        b"\x00\x01\x02 garbage\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\nbad header\r\n\r\n",
    ]:
        with raw_connect(served.sock) as s, s.makefile("rb") as f:
            s.sendall(garbage)
            status, headers, body = read_response(f)
            assert status == 400
            assert headers["connection"] == "close"
            assert headers["content-type"] == "application/json"
            assert json.loads(body)["error"]["code"] == "BAD_REQUEST"
            assert f.read() == b""  # closed


def test_request_timeout_is_408(lt: LoopThread, tmp_path: Path) -> None:
    server = HttpServer(App().router, request_timeout=0.3, idle_timeout=0.5)
    lt.run(server.start_unix(tmp_path / "t.sock"))
    try:
        with raw_connect(tmp_path / "t.sock") as s, s.makefile("rb") as f:
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")  # and then nothing
            status, _, body = read_response(f)
            assert status == 408
            assert json.loads(body)["error"]["code"] == "REQUEST_TIMEOUT"
            assert f.read() == b""
        with raw_connect(tmp_path / "t.sock") as s:
            assert s.recv(100) == b""  # an idle connection is closed quietly
    finally:
        lt.run(server.close())


def test_handler_exception_is_500_without_traceback(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="orchestrator.service.http"):
        conn = UnixHTTPConnection(str(served.sock), timeout=5)
        conn.request("GET", "/v1/boom")
        resp = conn.getresponse()
        raw = resp.read()
        assert resp.status == 500
        error = json.loads(raw)["error"]
        assert error["code"] == "INTERNAL"
        assert b"secret-internal-detail" not in raw
        assert b"Traceback" not in raw
        # The connection is still good: the request had been read whole.
        conn.request("GET", "/v1/health")
        assert conn.getresponse().status == 200
        conn.close()
    (record,) = [r for r in caplog.records if error["details"]["incident"] in r.getMessage()]
    assert record.exc_info is not None
    assert "secret-internal-detail" in str(record.exc_info[1])


def test_keep_alive_and_pipelining(served: Served) -> None:
    with raw_connect(served.sock) as s, s.makefile("rb") as f:
        # Three requests in one write; the answers come in order.
        s.sendall(
            b"GET /v1/things/one HTTP/1.1\r\nHost: x\r\n\r\n"
            b"PUT /v1/things/two/settings HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
            b"GET /v1/things/three HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        bodies = [json.loads(read_response(f)[2]) for _ in range(3)]
        assert [b["name"] for b in bodies] == ["one", "two", "three"]
        # And more on the same connection afterwards.
        s.sendall(b"GET /v1/things/four HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, body = read_response(f)
        assert (status, json.loads(body)) == (200, {"name": "four"})
        assert headers["connection"] == "close"
        assert f.read() == b""
    conn = UnixHTTPConnection(str(served.sock), timeout=5)
    socks = []
    for i in range(3):
        conn.request("GET", f"/v1/things/n{i}")
        assert json.loads(conn.getresponse().read()) == {"name": f"n{i}"}
        socks.append(conn.sock)
    assert socks[0] is not None
    assert all(s is socks[0] for s in socks)
    conn.close()


def test_unix_socket_mode_is_0600(served: Served) -> None:
    st_mode = os.stat(served.sock).st_mode
    assert stat.S_ISSOCK(st_mode)
    assert stat.S_IMODE(st_mode) == 0o600


def test_a_live_socket_is_not_taken_over(lt: LoopThread, served: Served) -> None:
    other = HttpServer(App().router)
    with pytest.raises(OSError, match="already listening"):
        lt.run(other.start_unix(served.sock))


def test_client_when_remusd_is_not_running(tmp_path: Path) -> None:
    path = tmp_path / "remusd.sock"
    with pytest.raises(ConnectionFailed, match=rf"remusd is not running \(no socket at {path}\)"):
        ApiClient(path).get("/v1/health")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))  # bound, not listening: a crashed remusd's leftover
    with pytest.raises(ConnectionFailed, match="remusd is not running"):
        ApiClient(path).get("/v1/health")
    s.close()


# --------------------------------------------------------------------------
# Server-Sent Events


def test_sse_delivers_events(client: ApiClient) -> None:
    assert list(client.events("/v1/events")) == [
        ServerSentEvent("tick", {"i": 0}, "0"),
        ServerSentEvent("tick", {"i": 1}, "1"),
        ServerSentEvent("tick", {"i": 2}, "2"),
        ServerSentEvent("done", None, "2"),  # the last event ID persists, as in browsers
    ]


def test_sse_client_disconnect_mid_stream(served: Served, client: ApiClient) -> None:
    for _ in range(2):  # twice: the first disconnect must not have hurt anything
        served.app.stream_closed.clear()
        stream = client.events("/v1/events/forever", timeout=5)
        got = [next(stream) for _ in range(3)]
        assert [e.data["i"] for e in got] == [0, 1, 2]
        stream.close()
        assert served.app.stream_closed.wait(5), "the stream's generator was not closed"
        assert client.get("/v1/health")["ok"] is True


def test_close_ends_streams_and_removes_the_socket(lt: LoopThread, tmp_path: Path) -> None:
    app = App()
    server = HttpServer(app.router)
    path = tmp_path / "c.sock"
    lt.run(server.start_unix(path))
    stream = ApiClient(path).events("/v1/events/forever", timeout=5)
    next(stream)
    # the client never lets go of its stream: a close() that waited for it would
    # never return (lt.run gives up after its timeout)
    lt.run(server.close())
    assert app.stream_closed.is_set()
    assert not path.exists()
    with pytest.raises(ConnectionFailed):
        for _ in stream:
            pass


def test_sse_codec_round_trip() -> None:
    parser = SseParser()
    text = encode_sse("status", {"a": "line1\nline2"}, "7").decode() + ": ping\n\n"
    events = [e for line in text.splitlines(keepends=True) if (e := parser.feed_line(line))]
    assert events == [ServerSentEvent("status", {"a": "line1\nline2"}, "7")]
    with pytest.raises(ValueError):
        encode_sse("bad\nname", {})


# --------------------------------------------------------------------------
# TLS and the bearer token


def test_tls_and_bearer_token(served: Served) -> None:
    url = f"https://127.0.0.1:{served.port}"
    anonymous = ApiClient(base_url=url, ssl_context=served.client_ssl)
    for path in ("/v1/things/x", "/v1/no/such/path"):  # no way to map the API without it
        err = api_error(anonymous.get, path)
        assert (err.status, err.code) == (401, "UNAUTHORIZED")
        assert err.headers["www-authenticate"].startswith("Bearer")
    assert anonymous.get("/v1/health") == {"ok": True, "transport": "tcp"}  # public
    wrong = ApiClient(base_url=url, ssl_context=served.client_ssl, token="guess")
    err = api_error(wrong.get, "/v1/things/x")
    assert err.status == 401
    assert 'error="invalid_token"' in err.headers["www-authenticate"]
    with ApiClient(base_url=url, ssl_context=served.client_ssl, token=TOKEN) as good:
        assert good.get("/v1/things/x") == {"name": "x"}
        assert good.post("/v1/things", {"name": "b", "settings": {}})["name"] == "b"
        assert len(list(good.events("/v1/events"))) == 4
    # The unix socket needs no token: its mode is the access control.
    with ApiClient(served.sock) as local:
        assert local.get("/v1/things/x") == {"name": "x"}
    # A client that does not trust the certificate fails clearly.
    untrusting = ApiClient(base_url=url, token=TOKEN)
    with pytest.raises(ConnectionFailed, match="TLS"):
        untrusting.get("/v1/health")


# --------------------------------------------------------------------------
# OpenAPI


def test_openapi_document(served: Served, client: ApiClient) -> None:
    doc = client.get("/v1/openapi.json")
    assert doc["openapi"] == "3.1.0"
    assert doc["info"] == {**doc["info"], "title": "test", "version": "0.1"}
    assert doc == json.loads(json.dumps(served.app.router.openapi()))
    op_ids = set()
    for route in served.app.router.routes:
        op = doc["paths"][route.template][route.method.lower()]
        op_ids.add(op["operationId"])
        for status, code in [*route.errors, (500, "INTERNAL")]:
            media = op["responses"][str(status)]["content"]["application/json"]
            assert code in media["schema"]["properties"]["error"]["properties"]["code"]["enum"]
            assert code in media["examples"]
        names = [p["name"] for p in op.get("parameters", []) if p["in"] == "path"]
        assert names == route.param_names
        assert ("requestBody" in op) == (route.request_schema is not None)
        assert ("401" in op["responses"]) == (not route.public)
    assert len(op_ids) == len(served.app.router.routes)
    conflict = doc["paths"]["/v1/things/{name}"]["get"]["responses"]["409"]
    assert conflict["content"]["application/json"]["schema"]["properties"]["error"]["properties"][
        "code"
    ]["enum"] == ["CONFLICT", "BUSY"]
    post = doc["paths"]["/v1/things"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == THING
    assert set(post["responses"]) == {"201", "400", "401", "409", "413", "415", "500"}
    assert set(FRAMEWORK_CODES) <= set(doc["components"]["schemas"]["ErrorCode"]["enum"])
    assert doc["paths"]["/v1/health"]["get"]["security"] == []


# --------------------------------------------------------------------------
# Sans-I/O pieces on their own


def test_dispatch_without_a_server() -> None:
    app = App()
    result = asyncio.run(
        dispatch(
            app.router, "GET", "/v1/things/zz", [("Authorization", "Bearer t")], b"", token="t"
        )
    )
    assert isinstance(result, Rendered)
    assert (result.status, json.loads(result.body)) == (200, {"name": "zz"})
    result = asyncio.run(dispatch(app.router, "GET", "/v1/things/zz", [], b"", token="t"))
    assert isinstance(result, Rendered)
    assert result.status == 401


def test_declaration_mistakes_fail_early() -> None:
    async def h(req: Request) -> Response:
        return Response()

    router = Router(openapi_path=None)
    router.add(Route("GET", "/v1/a/{x}", h))
    with pytest.raises(ValueError, match="clashes"):
        router.add(Route("GET", "/v1/a/{y}", h))
    with pytest.raises(ValueError, match="names its params"):
        router.add(Route("POST", "/v1/a/{y}", h))  # OpenAPI would see one path
    router.add(Route("POST", "/v1/a/{x}", h))
    with pytest.raises(ValueError, match="unsupported schema keywords"):
        Route("POST", "/v1/b", h, request_schema={"oneOf": []})
    with pytest.raises(ValueError, match="whole segment"):
        Route("GET", "/v1/b/x{y}", h)
    with pytest.raises(ValueError):
        check_schema({"type": "strin"})
    assert set(openapi(router.routes, "t", "1")["paths"]) == {"/v1/a/{x}"}


def test_validate_edge_cases() -> None:
    validate({"type": "number"}, 1)
    validate({"type": ["string", "null"]}, None)
    validate({"enum": [1]}, 1)
    with pytest.raises(ApiError):
        validate({"enum": [1]}, True)  # JSON's true is not 1
    validate({"type": "integer"}, 1.0)  # JSON Schema 2020-12: a zero fraction is an integer
    with pytest.raises(ApiError):
        validate({"type": "integer"}, 1.5)
    with pytest.raises(ApiError):
        validate({"type": "integer"}, float("inf"))
    with pytest.raises(ApiError) as info:
        validate({"type": "object", "additionalProperties": {"type": "integer"}}, {"a": "x"})
    assert info.value.details == {
        "field": "a",
        "in": "body",
        "problem": "must be an integer, not a string",
    }


# --------------------------------------------------------------------------
# Anything thrown at it: never a 500, always a code

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
thing_like = st.fixed_dictionaries(
    {"name": st.text(max_size=40), "settings": json_values},
    optional={
        "mode": st.sampled_from(["remus", "colo", "other"]),
        "disks": st.lists(st.dictionaries(st.sampled_from(["path", "x"]), json_values)),
    },
)
KNOWN_CODES = set(FRAMEWORK_CODES) | {"CONFLICT"}


def check_answer(call: Any, *args: Any) -> None:
    try:
        call(*args)
    except ApiClientError as err:
        assert err.status != 500, err
        assert err.code in KNOWN_CODES, err
        assert err.message


@settings(max_examples=150, deadline=None)
@given(body=json_values | thing_like)
def test_fuzz_bodies(client: ApiClient, body: Any) -> None:
    check_answer(client.post, "/v1/things", body)


@settings(max_examples=150, deadline=None)
@given(
    segment=st.text(max_size=20),
    raw=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30),
    body=json_values,
)
def test_fuzz_paths(client: ApiClient, segment: str, raw: str, body: Any) -> None:
    check_answer(client.put, f"/v1/things/{quote(segment, safe='')}/settings", body)
    check_answer(client.get, "/v1/things/" + raw)
    check_answer(client.request, "DELETE", "/" + raw, None)
