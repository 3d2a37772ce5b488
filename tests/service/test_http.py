"""remusd's API as a client meets it: routing errors, validation, limits, TLS and the token,
the unix socket, event streams and the OpenAPI document of each listener.

Most tests talk to a real remusd (its unix socket, and TCP with TLS and a bearer
token) with the real client, with httpx for requests the client would not make and
with raw sockets for what no HTTP client sends. What needs a handler remusd does not
have (one that fails, a stream that never ends) or limits too long to wait for runs
on :class:`ApiServer` in a loop thread of the test process.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import logging
import os
import random
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from orchestrator.service import http as api_http
from orchestrator.service.client import ApiClient, ApiClientError, ConnectionFailed
from orchestrator.service.http import BODY, ApiServer, Route, event_stream, json_response

from .test_remusd import ROOT, Remusd

T = TypeVar("T")
TOKEN = "s3cret-token"


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


class Served(Remusd):
    """A remusd with TCP, TLS and a token besides its unix socket."""

    tcp_port: int = 0
    cert: Path = Path()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.tcp_port}"

    def tls(self, token: str | None = TOKEN, *, trust: bool = True) -> ApiClient:
        ctx = ssl.create_default_context(cafile=str(self.cert)) if trust else None
        return ApiClient(base_url=self.url, ssl_context=ctx, token=token, timeout=10)


@pytest.fixture(scope="module")
def remusd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("api")
    d = Served(base / "a", 30000 + random.randrange(20000))
    d.tcp_port = d.port + 1
    d.cert, key = make_cert(base)
    (base / "token").write_text(TOKEN + "\n")
    d.start_extra = (
        *("--set", f"api.tcp=127.0.0.1:{d.tcp_port}", "--set", f"api.token_file={base / 'token'}"),
        *("--set", f"api.tls_cert={d.cert}", "--set", f"api.tls_key={key}"),
    )
    d.start()
    yield d
    d.stop()


@pytest.fixture
def client(remusd: Served) -> Iterator[ApiClient]:
    with remusd.api() as c:
        yield c


def api_error(call: Any, *args: Any) -> ApiClientError:
    with pytest.raises(ApiClientError) as info:
        call(*args)
    return info.value


def raw(sock: Path, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes, read one Content-Length-framed answer and make sure the server then
    closes the connection."""
    with socket.socket(socket.AF_UNIX) as s, s.makefile("rb") as f:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(data)
        status_line = f.readline()
        assert status_line.startswith(b"HTTP/1."), status_line
        headers: dict[str, str] = {}
        while (line := f.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = f.read(int(headers.get("content-length", "0")))
        assert f.read() == b""  # closed
    return int(status_line.split()[1]), headers, body


# --------------------------------------------------------------------------
# Routing, validation and limits


def test_routing_errors_have_the_error_shape(client: ApiClient) -> None:
    err = api_error(client.get, "/v1/nothing/here")
    assert (err.status, err.code) == (404, "NOT_FOUND")
    assert err.message == "no such path: /v1/nothing/here"
    assert api_error(client.get, "/v1/protections/").status == 404  # an empty param does not match
    err = api_error(client.request, "PATCH", "/v1/protections/x")
    assert (err.status, err.code) == (405, "METHOD_NOT_ALLOWED")
    assert err.headers["allow"] == "DELETE, GET, HEAD"
    assert err.details == {"allowed": ["DELETE", "GET", "HEAD"]}
    for name in ("bad%20name", "a%2Fb", "h%C3%B4te"):
        err = api_error(client.get, f"/v1/protections/{name}")
        assert (err.status, err.code) == (400, "BAD_REQUEST")
        problem = "must match ^[A-Za-z0-9_.-]+$"
        assert err.details == {"field": "name", "in": "path", "problem": problem}
    err = api_error(client.get, "/v1/protections/x%2Dy")  # URL-decoded before it is checked
    assert err.message == "no protection of 'x-y' on this host"


def test_head_is_get_without_a_body(remusd: Served) -> None:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(remusd.socket))) as h:
        got = h.head("http://localhost/v1/host")
        assert got.status_code == 200 and got.content == b""
        assert int(got.headers["content-length"]) == len(h.get("http://localhost/v1/host").content)
        assert got.headers["x-content-type-options"] == "nosniff"
        assert got.headers["cache-control"] == "no-store"


def test_query_parameters_are_converted_and_checked(client: ApiClient) -> None:
    assert client.get("/v1/events?limit=1&after=0")[0]["kind"] == "started"
    for query, problem in [
        ("limit=0", "must be >= 1"),
        ("limit=abc", "must be an integer"),
        ("wait=nan", "must be a number"),
        ("wait=61", "must be <= 60"),
        ("color=red", "is not a known parameter"),
    ]:
        err = api_error(client.get, f"/v1/events?{query}")
        assert err.code == "BAD_REQUEST", err
        assert err.details == {"in": "query", "field": query.partition("=")[0], "problem": problem}
    err = api_error(client.get, "/v1/events?" + "&".join(f"a{i}=1" for i in range(65)))
    assert err.details == {"in": "query", "field": "", "problem": "more than 64 fields"}


@pytest.mark.parametrize(
    ("body", "ctype", "status", "problem"),
    [
        (b"name=vm1", "application/x-www-form-urlencoded", 415, None),
        (b"{}", None, 415, None),
        (b'{"name": ', "application/json", 400, "is not valid JSON: Expecting value at line 1 "
         "column 10"),
        (b'{"name": "vm1", "peer": "b", "interval_ms": NaN}', "application/json", 400,
         "is not valid JSON: NaN is not JSON"),
        (b'{"name": "vm1", "peer": "b", "interval_ms": 1e400}', "application/json", 400,
         "is not valid JSON: 1e400 is out of range"),
        (b"[" * 100_000, "application/json", 400, None),
        (b'{"name": "vm1", "peer": "\\ud800"}', "application/json", 400, None),
        (b"\xff", "application/json", 400, None),
        (b"", None, 400, "a JSON request body is required"),
    ],
)  # fmt: skip
def test_a_body_is_json(
    remusd: Served, body: bytes, ctype: str | None, status: int, problem: str | None
) -> None:
    headers = {"Content-Type": ctype} if ctype else {}
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(remusd.socket))) as h:
        got = h.post("http://localhost/v1/protections", content=body, headers=headers)
    error = got.json()["error"]
    assert got.status_code == status, error
    assert error["code"] == ("UNSUPPORTED_MEDIA_TYPE" if status == 415 else "BAD_REQUEST")
    if problem is not None:
        assert error["details"]["problem"] == problem
    if status == 400:
        assert error["details"]["in"] == "body" and error["details"]["field"] == ""


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        ({"peer": "b"}, "name", "is required"),
        ({"name": 5, "peer": "b"}, "name", "must be a string, not an integer"),
        ({"name": "vm 1", "peer": "b"}, "name", "must match the pattern ^[A-Za-z0-9_.-]+$"),
        ({"name": "a" * 65, "peer": "b"}, "name", "must be at most 64 characters long"),
        ({"name": "vm1", "peer": ""}, "peer", "must be at least 1 characters long"),
        ({"name": "vm1", "peer": "b", "interval_ms": 60001}, "interval_ms", "must be <= 60000"),
        ({"name": "vm1", "peer": "b", "interval_ms": True}, "interval_ms",
         "must be an integer, not a boolean"),
        ({"name": "vm1", "peer": "b", "interval_ms": 59999.5}, "interval_ms",
         "must be an integer, not a number"),
        ({"name": "vm1", "peer": "b", "colour": 1}, "colour", "is not an allowed field"),
        ([1, 2], "", "must be an object, not an array"),
    ],
)  # fmt: skip
def test_validation_errors_name_the_field(
    client: ApiClient, body: Any, field: str, problem: str
) -> None:
    err = api_error(client.post, "/v1/protections", body)
    assert (err.status, err.code) == (400, "BAD_REQUEST")
    assert err.details == {"field": field, "in": "body", "problem": problem}
    assert problem in err.message


def test_an_integral_float_is_an_integer(client: ApiClient) -> None:
    """JSON Schema 2020-12 (OpenAPI 3.1): 59999.0 is an integer, past the schema to the
    pre-flight, which finds no domain."""
    body = {"name": "nope", "peer": "127.0.0.1:1", "interval_ms": 59999.0}
    assert api_error(client.post, "/v1/protections", body).code == "DOMAIN_NOT_FOUND"


def test_payload_too_large(remusd: Served, client: ApiClient) -> None:
    err = api_error(client.post, "/v1/protections", {"name": "x" * (2 << 20), "peer": "b"})
    assert (err.status, err.code, err.details) == (413, "PAYLOAD_TOO_LARGE", {"limit": 1 << 20})
    chunk = b"%x\r\n%s\r\n" % (256 * 1024, b" " * 256 * 1024)
    head = (b"POST /v1/protections HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    # chunked, so the server only finds out while reading; then it closes the connection
    status, headers, body = raw(remusd.socket, head + chunk * 5)
    assert (status, headers["connection"]) == (413, "close")
    assert json.loads(body)["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert client.get("/v1/health")["status"] == "ok"


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x01\x02 garbage\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\nbad header\r\n\r\n",
        b"GET /v1/protections/h\xc3\xb4te HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\n" + b"X-A: 1\r\n" * 40 + b"\r\n",
    ],
)
def test_malformed_http_is_a_json_400_and_closes(remusd: Served, garbage: bytes) -> None:
    status, headers, body = raw(remusd.socket, garbage)
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "BAD_REQUEST"


# --------------------------------------------------------------------------
# Listeners: the unix socket, TLS and the token


def test_the_unix_socket_is_0600_and_not_taken_over(remusd: Served, tmp_path: Path) -> None:
    st_mode = os.stat(remusd.socket).st_mode
    assert stat.S_ISSOCK(st_mode) and stat.S_IMODE(st_mode) == 0o600
    with pytest.raises(OSError, match="already listening"):
        asyncio.run(ApiServer([]).start_unix(remusd.socket))
    path = tmp_path / "remusd.sock"
    with pytest.raises(ConnectionFailed, match=rf"remusd is not running \(no socket at {path}\)"):
        ApiClient(path).get("/v1/health")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # bound, not listening: a crashed remusd's leftover
        with pytest.raises(ConnectionFailed, match="nothing listening"):
            ApiClient(path).get("/v1/health")


def test_the_cli_runs_without_the_api_libraries(tmp_path: Path) -> None:
    """The nested lab's dom0 has Debian's python3 without httpx, httpx-sse, aiohttp or
    jsonschema: the CLI's in-process modes and the worker import without them, and an
    API verb says what is missing."""
    code = (
        "import sys\n"
        "for m in ('httpx', 'httpx_sse', 'aiohttp', 'jsonschema'):\n"
        "    sys.modules[m] = None\n"  # an import of it now fails, as where it is missing
        "import orchestrator.cli, orchestrator.protection.worker\n"
        "sys.exit(orchestrator.cli.main(['status', '--socket', sys.argv[1]]))\n"
    )
    argv = [sys.executable, "-c", code, str(tmp_path / "none.sock")]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "needs httpx and httpx-sse" in r.stderr, r.stderr


def test_tls_and_the_bearer_token(remusd: Served) -> None:
    anonymous = remusd.tls(None)
    for path in ("/v1/protections", "/v1/openapi.json", "/v1/no/such/path"):  # no mapping it
        err = api_error(anonymous.get, path)
        assert (err.status, err.code) == (401, "UNAUTHORIZED")
        assert err.headers["www-authenticate"] == 'Bearer realm="remusd"'
    assert anonymous.get("/v1/health")["status"] == "ok"  # public
    err = api_error(remusd.tls("guess").get, "/v1/protections")
    assert err.status == 401 and 'error="invalid_token"' in err.headers["www-authenticate"]
    with remusd.tls() as good:
        assert good.get("/v1/protections") == []
        err = api_error(good.post, "/v1/protections/vm1/failover", {"force": True})
        assert err.code == "PROTECTION_NOT_FOUND"
    with remusd.tls() as good:
        stream = good.events("/v1/events/stream?after=0", timeout=10)
        assert next(stream).event == "started"
        stream.close()
    with pytest.raises(ConnectionFailed, match="TLS"):
        remusd.tls(trust=False).get("/v1/health")


def test_the_openapi_document_of_each_listener_says_what_it_enforces(remusd: Served) -> None:
    """The unix socket asks for no token and its document requires none; the TCP
    listener's requires the bearer token on every operation but the public one."""
    with remusd.api() as c:
        local = c.get("/v1/openapi.json")
    with remusd.tls() as c:
        tcp = c.get("/v1/openapi.json")
    assert local["openapi"] == tcp["openapi"] == "3.1.0"
    assert local["paths"].keys() == tcp["paths"].keys()
    assert local["security"] == [] and tcp["security"] == [{"bearerAuth": []}]
    for path, item in tcp["paths"].items():
        for method, op in item.items():
            public = path == "/v1/health"
            assert op.get("security", tcp["security"]) == ([] if public else [{"bearerAuth": []}])
            assert ("401" in op["responses"]) != public, (method, path)
            local_op = local["paths"][path][method]
            assert local_op.get("security", local["security"]) == []
            assert "401" not in local_op["responses"]
            for status, resp in op["responses"].items():
                if int(status) >= 400:
                    codes = resp["content"]["application/json"]["schema"]["properties"]["error"]
                    assert codes["properties"]["code"]["enum"], (method, path, status)
    post = local["paths"]["/v1/protections"]["post"]
    assert set(post["responses"]) == {"201", "400", "404", "409", "413", "415", "422", "500", "502"}
    param = local["paths"]["/v1/protections/{name}"]["get"]["parameters"][0]
    assert param["schema"]["pattern"] == "^[A-Za-z0-9_.-]+$"


def test_event_streams_resume_and_survive_a_client_that_goes(client: ApiClient) -> None:
    for _ in range(2):  # twice: the first client that went must not have hurt anything
        stream = client.events("/v1/events/stream?after=0", timeout=10)
        first = next(stream)
        assert (first.event, first.id) == ("started", "1") and first.data["kind"] == "started"
        stream.close()
        assert client.get("/v1/health")["status"] == "ok"
    err = api_error(client.events, "/v1/events/stream?after=x")
    assert err.details == {"in": "query", "field": "after", "problem": "must be an integer"}


# --------------------------------------------------------------------------
# What remusd has no handler for: a failure, a stream without end, short limits


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


class App:
    def __init__(self) -> None:
        self.stream_closed = threading.Event()
        self.routes = [
            Route("GET", "/v1/boom", self.boom),
            Route("POST", "/v1/echo", self.echo, request_schema={"type": "object"}),
            Route("GET", "/v1/forever", self.forever, content_type="text/event-stream"),
        ]

    async def boom(self, req: web.Request) -> web.Response:
        raise RuntimeError("secret-internal-detail")

    async def echo(self, req: web.Request) -> web.Response:
        return json_response(req[BODY])

    async def forever(self, req: web.Request) -> web.StreamResponse:
        async def gen() -> AsyncIterator[tuple[str, Any, str | None]]:
            try:
                i = 0
                while True:
                    yield ("tick", {"i": i}, str(i))
                    i += 1
                    await asyncio.sleep(0.01)
            finally:
                self.stream_closed.set()

        return await event_stream(req, gen(), ping_interval=0.05)


@pytest.fixture
def lt() -> Iterator[LoopThread]:
    loop_thread = LoopThread()
    yield loop_thread
    loop_thread.stop()


@pytest.fixture
def app(lt: LoopThread, tmp_path: Path) -> Iterator[tuple[App, ApiServer, Path]]:
    app = App()
    server = ApiServer(app.routes, title="test")
    lt.run(server.start_unix(tmp_path / "t.sock"))
    yield app, server, tmp_path / "t.sock"
    lt.run(server.close())


def test_a_handler_that_fails_is_a_500_without_its_traceback(
    app: tuple[App, ApiServer, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="orchestrator.service.http"), ApiClient(app[2]) as c:
        err = api_error(c.get, "/v1/boom")
        assert (err.status, err.code) == (500, "INTERNAL")
        assert "secret" not in err.message and "Traceback" not in err.message
        assert c.post("/v1/echo", {"a": 1}) == {"a": 1}  # the connection is still good
    assert err.details is not None
    (record,) = [r for r in caplog.records if err.details["incident"] in r.getMessage()]
    assert record.exc_info is not None and "secret-internal-detail" in str(record.exc_info[1])


def test_slow_and_idle_clients_are_cut_off(
    app: tuple[App, ApiServer, Path], monkeypatch: pytest.MonkeyPatch, lt: LoopThread
) -> None:
    monkeypatch.setattr(api_http, "REQUEST_TIMEOUT", 0.3)
    head = b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    status, headers, body = raw(app[2], head + b"Content-Length: 10\r\n\r\n{")  # then nothing
    assert (status, headers["connection"]) == (408, "close")
    assert json.loads(body)["error"]["code"] == "REQUEST_TIMEOUT"
    monkeypatch.setitem(api_http.HANDLER_ARGS, "keepalive_timeout", 0.3)
    server = ApiServer([])
    lt.run(server.start_unix(app[2].with_name("idle.sock")))
    try:
        for sent in (b"", b"GET /v1/openapi.json HTTP/1.1\r\n"):  # nothing, or never all
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(str(app[2].with_name("idle.sock")))
                s.sendall(sent)
                assert s.recv(100) == b""  # closed
    finally:
        lt.run(server.close())


def test_connections_are_capped(
    app: tuple[App, ApiServer, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api_http, "MAX_CONNECTIONS", 2)
    streams = [ApiClient(app[2]).events("/v1/forever", timeout=5) for _ in range(2)]
    assert [next(s).data for s in streams] == [{"i": 0}, {"i": 0}]
    with pytest.raises(ConnectionFailed):
        ApiClient(app[2]).get("/v1/openapi.json")
    streams[0].close()
    assert app[0].stream_closed.wait(5)
    ok = False
    for _ in range(50):  # the server notices the closed one at its next write
        try:
            ok = ApiClient(app[2]).get("/v1/openapi.json")["openapi"] == "3.1.0"
            break
        except ConnectionFailed:
            threading.Event().wait(0.05)
    assert ok
    streams[1].close()


def test_close_ends_streams_at_once_and_removes_the_socket(
    lt: LoopThread, tmp_path: Path
) -> None:
    app = App()
    server = ApiServer(app.routes)
    path = tmp_path / "c.sock"
    lt.run(server.start_unix(path))
    stream = ApiClient(path).events("/v1/forever", timeout=5)
    next(stream)
    # the client never lets go of its stream: a close() that waited for it would not
    # return before lt.run gives up
    lt.run(server.close(), timeout=4)
    assert app.stream_closed.is_set()
    assert not path.exists()
    with contextlib.suppress(ConnectionFailed):  # or it ended: either way, it ends
        for _ in stream:
            pass
