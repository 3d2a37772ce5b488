"""remusd's API fuzzed from its own OpenAPI document: no 500s, every error has a code.

Requests are generated per operation of the served schema (path parameters,
query parameters and bodies, both schema-shaped and arbitrary JSON) and
sent to a real remusd on its real unix socket.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.service.client import ApiClientError
from orchestrator.service.http import FRAMEWORK_CODES

from .test_remusd import Remusd

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
# peers that answer at once: nothing here may wait on DNS (nor may a non-ASCII name,
# which the resolver's IDNA step would refuse with UnicodeError, not OSError)
PEERS = st.sampled_from(
    ["127.0.0.1:1", "x:y", "", "[::1]:2", "127.0.0.1", "a" * 300, "hôte:1", "\u00e9" * 70]
)


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    t = schema.get("type")
    if "enum" in schema:
        return st.sampled_from(schema["enum"]) | JSON
    if t == "object":
        props = {
            k: (PEERS if k == "peer" else from_schema(v))
            for k, v in schema.get("properties", {}).items()
        }
        required = [k for k in schema.get("required", []) if k in props]
        optional = {k: v for k, v in props.items() if k not in required}
        return st.fixed_dictionaries({k: props[k] for k in required}, optional=optional)
    if t == "integer":
        return st.integers(-(2**40), 2**40)
    if t == "boolean":
        return st.booleans() | JSON
    if t == "string":
        return st.text(max_size=70) | st.from_regex(r"[A-Za-z0-9_.-]{1,10}", fullmatch=True)
    return JSON


@pytest.fixture(scope="module")
def remusd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remusd]:
    d = Remusd(tmp_path_factory.mktemp("fuzz") / "a", 30000 + random.randrange(20000))
    d.start()
    yield d
    d.stop()


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
                schema = media.get("schema", {})
                codes |= set(_codes_in(schema))
        declared[(method, path)] = codes

    @st.composite
    def requests(draw: st.DrawFn) -> tuple[str, str, Any, set[str]]:
        method, template, op = draw(st.sampled_from(ops))
        path = template
        for p in op.get("parameters", []):
            if p["in"] == "path":
                value = draw(st.text(min_size=1, max_size=20) | st.just("vm1"))
                path = path.replace("{" + p["name"] + "}", quote(value, safe=""))
        query = {}
        for p in op.get("parameters", []):
            if p["in"] == "query" and draw(st.booleans()):
                values = st.text(max_size=8) | st.integers(-5, 5000).map(str)
                if p["name"] == "wait":
                    # a long poll legally lasts up to its maximum (60 s), past the client's
                    # timeout: in range, only waits short enough to answer in time
                    values = values.filter(_short_wait)
                query[p["name"]] = draw(values)
        if query:
            path += "?" + urlencode(query)
        body = None
        rb = op.get("requestBody", {}).get("content", {}).get("application/json")
        if rb is not None:
            body = draw(from_schema(rb["schema"]) | JSON)
        elif method in ("POST", "PUT") and draw(st.booleans()):
            body = draw(JSON)
        return method, path, body, declared[(method, template)]

    seen: set[str] = set()

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(requests())
    def check(req: tuple[str, str, Any, set[str]]) -> None:
        method, path, body, codes = req
        with remusd.api() as c:
            try:
                c.request(method, path, body)
            except ApiClientError as exc:
                assert exc.status != 500, (method, path, body, exc.message)
                assert exc.code in codes, (method, path, exc.code, sorted(codes))
                seen.add(exc.code)

    check()
    assert {"BAD_REQUEST", "PROTECTION_NOT_FOUND"} <= seen, seen


def _short_wait(text: str) -> bool:
    try:
        return not 2 < float(text) <= 60
    except ValueError:
        return True


def _codes_in(schema: Any) -> Iterator[str]:
    """Error codes an OpenAPI response schema lists (enum or example)."""
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
