"""remusd's API fuzzed from its own OpenAPI document: no 500s, every error has a code.

Requests are generated per operation of the served schema (path parameters,
query parameters and bodies, both schema-shaped and arbitrary JSON) and
sent to a real remusd on its real unix socket.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from orchestrator.service.client import ApiClient, ApiClientError
from orchestrator.service.http import FRAMEWORK_CODES

from .test_remusd import Remusd

# odd text: any code point, lone surrogates included (they travel as JSON's \\u escapes),
# combining marks, right-to-left, NUL, and Unicode digits that Python's int() would take
ODD = st.text(st.characters(exclude_categories=()), max_size=20) | st.sampled_from(
    ["\u0301", "\u202e1", "\x00", "\ud800", "\udfff\ud800", "\U0001f600", "\uff11\uff12", "\ufeff"]
)
TEXT = st.text(max_size=20) | ODD
FLOATS = st.floats(allow_nan=False, allow_infinity=False)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | FLOATS | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=10,
)
# peers that answer at once: nothing here may wait on DNS (an ASCII name would), so
# arbitrary text only with a non-ASCII character in it, which no address has
NON_ASCII = st.characters(min_codepoint=0x80, exclude_categories=())
PEERS = st.sampled_from(
    ["127.0.0.1:1", "x:y", "", "[::1]:2", "127.0.0.1", "a" * 300, "h\u00f4te:1", "\u00e9" * 70]
) | st.builds(lambda a, c, b: a + c + b, TEXT, NON_ASCII, TEXT)


def from_schema(schema: dict[str, Any], valid: bool = False) -> st.SearchStrategy[Any]:
    """Values for ``schema``: with ``valid``, only what it takes (integers as integral
    floats too: JSON Schema 2020-12 has 5.0 an integer); without, anything near it."""
    t, junk = schema.get("type"), st.nothing() if valid else JSON
    lo = schema.get("minimum", schema.get("exclusiveMinimum"))
    hi = schema.get("maximum")
    if "enum" in schema:
        return st.sampled_from(schema["enum"]) | junk
    if t == "object":
        # the peer as PEERS says; the name mostly that of the one domain there is
        # (and ssh, the other way to the peer, as the peer)
        special = {
            "peer": PEERS,
            "ssh": PEERS,
            "name": st.just("vm1") | (st.nothing() if valid else TEXT),
        }
        props = {k: special.get(k, from_schema(v, valid)) for k, v in schema["properties"].items()}
        required = [k for k in schema.get("required", []) if k in props]
        optional = {k: v for k, v in props.items() if k not in required}
        needed = {k: props[k] for k in required}
        # the required alone too: past the schema more often, on to the checks behind it
        return st.fixed_dictionaries(needed) | st.fixed_dictionaries(needed, optional=optional)
    if t == "integer":
        first = -(2**40) if lo is None else lo + ("exclusiveMinimum" in schema)
        ints = st.integers(first, 2**40 if hi is None else hi)
        return ints | ints.map(float) | (st.nothing() if valid else FLOATS | JSON)
    if t == "number":
        exclude = "exclusiveMinimum" in schema
        numbers = st.floats(lo, hi, allow_nan=False, allow_infinity=False, exclude_min=exclude)
        return numbers | junk | (st.nothing() if valid else st.integers(-(2**70), 2**70))
    if t == "boolean":
        return st.booleans() | junk
    if t == "string":
        if "pattern" in schema:
            fits = st.from_regex(schema["pattern"], fullmatch=True)
            return fits.filter(lambda v: len(v) <= schema.get("maxLength", 70)) | junk
        lengths = {"min_size": schema.get("minLength", 0), "max_size": 70}
        return st.text(st.characters(), **lengths) | (st.nothing() if valid else TEXT)
    return JSON


def _segment(text: str) -> str:
    """A path segment as a client that sends raw UTF-8 (lone surrogates too) would."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


TOKEN = "fuzz-token"


@pytest.fixture(scope="module")
def remusd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remusd]:
    base = tmp_path_factory.mktemp("fuzz")
    d = Remusd(base / "a", 30000 + random.randrange(20000))
    (base / "token").write_text(TOKEN)
    d.start_extra = (
        *("--set", f"api.tcp=127.0.0.1:{d.port + 1}", "--set", f"api.token_file={base / 'token'}"),
    )
    d.start()
    d.hv.create_domain("vm1", memory_mib=16)  # for the checks past "no such domain"
    yield d
    d.stop()
    for dom in d.hv.list_domains():
        d.hv.destroy(dom.domid)


def tcp(d: Remusd, token: str | None = None) -> ApiClient:
    return ApiClient(base_url=f"http://127.0.0.1:{d.port + 1}", token=token, timeout=30)


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    ops = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method.upper() not in ("GET", "POST", "PUT", "DELETE", "PATCH"):
                continue
            content = op.get("responses", {}).get("200", {}).get("content", {})
            if "text/event-stream" in content:
                continue  # a stream stays open by design
            ops.append((method.upper(), path, op))
    return ops


def test_every_operation_of_the_schema_answers_without_a_500(remusd: Remusd) -> None:
    with remusd.api() as c:
        doc = c.get("/v1/openapi.json")
    ops = operations(doc)
    assert {p for _, p, _ in ops} >= {"/v1/protections", "/v1/protections/{name}", "/v1/host"}
    declared: dict[tuple[str, str], set[str]] = {}
    for method, path, op in ops:
        codes: set[str] = set(FRAMEWORK_CODES)
        for resp in op.get("responses", {}).values():
            for media in resp.get("content", {}).values():
                codes |= set(_codes_in(media.get("schema", {})))
        declared[(method, path)] = codes

    @st.composite
    def requests(draw: st.DrawFn) -> tuple[str, str, Any, dict[str, Any]]:
        with_body = [o for o in ops if "requestBody" in o[2]]
        method, template, op = draw(st.sampled_from(ops) | st.sampled_from(with_body))
        path = template
        for p in op.get("parameters", []):
            if p["in"] == "path":
                value = draw(st.text(min_size=1, max_size=20) | ODD.filter(bool) | st.just("vm1"))
                path = path.replace("{" + p["name"] + "}", _segment(value))
        query = {}
        for p in op.get("parameters", []):
            if p["in"] == "query" and draw(st.booleans()):
                values = TEXT | st.integers(-5, 5000).map(str) | st.floats().map(str)
                if p["name"] == "wait":
                    # a long poll legally lasts up to its maximum (60 s), past the client's
                    # timeout: in range, only waits short enough to answer in time
                    values = values.filter(_short_wait)
                query[p["name"]] = draw(values).encode("utf-8", "surrogatepass")
        if query:
            path += "?" + urlencode(query)
        body = None
        rb = op.get("requestBody", {}).get("content", {}).get("application/json")
        if rb is not None:
            body = draw(from_schema(rb["schema"], valid=True) | from_schema(rb["schema"]) | JSON)
        elif method in ("POST", "PUT") and draw(st.booleans()):
            body = draw(JSON)
        return method, path, body, op

    seen: set[str] = set()

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(requests())
    def check(req: tuple[str, str, Any, dict[str, Any]]) -> None:
        method, path, body, op = req
        with remusd.api() as c:
            try:
                got = c.request(method, path, body)
            except ApiClientError as exc:
                assert exc.status != 500, (method, path, body, exc.message)
                assert exc.status != 401, (method, path)  # the unix socket asks for no token
                codes = declared[(method, _template(op, doc))]
                assert exc.code in codes, (method, path, exc.code, sorted(codes))
                # a body the document's schema takes is not refused as a bad body
                where = (exc.details or {}).get("in")
                refused = exc.code == "BAD_REQUEST" and where == "body"
                assert not (refused and _valid(op, body)), (method, path, body, exc)
                seen.add(exc.code)
                return
        # what succeeded is what the document says it is
        for status, resp in op["responses"].items():
            schema = resp.get("content", {}).get("application/json", {}).get("schema")
            if status.startswith("2") and schema is not None and got is not None:
                Draft202012Validator(schema).validate(got)

    check()
    assert {"BAD_REQUEST", "PROTECTION_NOT_FOUND", "NOT_PROTECTABLE"} <= seen, seen


def _valid(op: dict[str, Any], body: Any) -> bool:
    """Whether ``body`` is what the operation's request schema (Draft 2020-12) takes, as
    I-JSON (RFC 7493: no lone surrogates, which remusd refuses as not JSON)."""
    rb = op.get("requestBody", {}).get("content", {}).get("application/json")
    if rb is None or body is None:
        return False
    try:
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return Draft202012Validator(rb["schema"]).is_valid(body)


def _template(op: dict[str, Any], doc: dict[str, Any]) -> str:
    return next(p for p, item in doc["paths"].items() if op in item.values())


def test_each_listeners_document_says_which_operations_need_the_token(remusd: Remusd) -> None:
    """An operation the served document lets anyone call answers an anonymous request
    with something other than 401, and one it says needs the token answers 401; on
    the unix socket and on TCP alike, from the document that listener serves."""
    with remusd.api() as c:
        local = c.get("/v1/openapi.json")
    with tcp(remusd, TOKEN) as c:
        remote = c.get("/v1/openapi.json")
    checked = 0
    for doc, client in ((local, remusd.api()), (remote, tcp(remusd))):
        with client:
            for path, item in doc["paths"].items():
                for method, op in item.items():
                    anyone = any(req == {} for req in op.get("security", doc["security"])) or (
                        op.get("security", doc["security"]) == []
                    )
                    target = path.replace("{name}", "vm1")
                    if "text/event-stream" in str(op["responses"].get("200", {})):
                        target += "?after=x"  # answered at once, with a 400, if not a 401
                    try:
                        client.request(method.upper(), target)
                        status = 200
                    except ApiClientError as exc:
                        status = exc.status
                    assert (status == 401) != anyone, (client.where, method, path, status)
                    assert ("401" in op["responses"]) != anyone, (client.where, method, path)
                    checked += 1
    assert checked == 2 * sum(len(item) for item in local["paths"].values())
    assert local["security"] == [] and remote["security"] == [{"bearerAuth": []}]


def _short_wait(text: str) -> bool:
    try:
        return not 2 < float(text) <= 60
    except ValueError:
        return True


def _codes_in(schema: Any) -> Iterator[str]:
    """Error codes an OpenAPI response schema lists."""
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in ("enum", "examples") and isinstance(value, list):
                yield from (v for v in value if isinstance(v, str))
            elif key == "example" and isinstance(value, str):
                yield value
            else:
                yield from _codes_in(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from _codes_in(item)


def test_the_packaged_configuration_loads() -> None:
    from orchestrator.service import config

    cfg = config.load(Path(__file__).resolve().parents[2] / "packaging" / "remusd.toml")
    assert cfg.api.socket == "/run/remus/remusd.sock" and cfg.replication.interval_ms == 200
