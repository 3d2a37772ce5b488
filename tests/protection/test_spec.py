"""ProtectionSpec's forms agree: the CLI's options, remusd's API schema and config, the
registry's and the worker's JSON are all one table (``FIELDS``), with one set of defaults.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cli import build_parser
from orchestrator.protection.host import check_peer
from orchestrator.protection.spec import FIELDS, Field, ProtectionSpec, SpecError, api_schema
from orchestrator.service.client import ApiClientError
from orchestrator.service.config import Config
from orchestrator.service.http import ApiError, validate

from ..service.test_remusd import ROOT, Remusd

SCHEMA = api_schema()
BOUNDED = [f for f in FIELDS if f.minimum is not None or f.maximum is not None]


def _protect_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = sub.choices["protect"]
    return parser


def _protect(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["protect", *argv])


def _default(f: Field) -> Any:
    d = getattr(ProtectionSpec(name="vm"), f.name)
    return d.value if isinstance(d, Enum) else d


def _a_value(f: Field) -> Any:
    """A value of the field's kind other than its default (to see it travel)."""
    d = getattr(ProtectionSpec(name="vm"), f.name)
    if f.kind is bool:
        return not d
    if f.kind in (int, float):
        return f.kind(f.maximum if f.maximum is not None else d + 1)
    if f.kind is str:
        # the one free-text field with a form of its own: a witness URL
        return "etcd3+http://witness.test:2379" if f.name == "witness" else "other"
    return next(m for m in f.kind if m is not d)  # type: ignore[attr-defined]


@pytest.mark.parametrize("f", FIELDS, ids=lambda f: f.name)
def test_every_field_reaches_the_cli_the_schema_and_the_json(f: Field) -> None:
    dests = {a.dest: a for a in _protect_parser()._actions}
    assert f.name in dests, f"{f.name} has no `remusctl protect` option"
    if f.flags:
        assert set(f.flags) <= set(dests[f.name].option_strings)
    assert (f.name in SCHEMA["properties"]) == f.api
    value = _a_value(f)
    spec = ProtectionSpec(name="vm").with_(**{f.name: value})
    assert ProtectionSpec.from_json(spec.to_json()) == spec
    assert ProtectionSpec.from_dict(spec.to_dict()) == spec
    if f.api:  # the API form takes it too, over any defaults
        # ssh reaches the peer instead of peer: one or the other
        peer = {} if f.name == "ssh" else {"peer": "b"}
        body = {"name": "vm", **peer, f.name: spec.to_dict()[f.name]}
        validate(SCHEMA, body)
        assert getattr(ProtectionSpec.from_api(body, ProtectionSpec("x")), f.name) == value


def test_the_defaults_are_the_same_in_every_form() -> None:
    spec = ProtectionSpec.from_args(_protect("vm", "--to", "b"))
    assert spec == ProtectionSpec("vm", "b")
    assert ProtectionSpec.from_json(spec.to_json()) == spec
    for f in FIELDS:
        if f.api and f.name not in ("name", "peer", "ssh"):  # no default: required, or not
            assert SCHEMA["properties"][f.name]["default"] == _default(f), f.name
    # remusd's configured defaults, unconfigured, are the spec's own
    assert Config().spec_defaults("vm").with_(peer="b") == spec
    assert ProtectionSpec.from_api({"name": "vm", "peer": "b"}, Config().spec_defaults()) == spec


def test_cli_options_in_their_units_and_colo_as_an_alias() -> None:
    args = _protect(
        "vm", "--to", "b", "--colo", "-i", "50", "--checkpoint-max-interval", "1500", "-n", "-F"
    )
    spec = ProtectionSpec.from_args(args)
    assert (spec.mode.value, spec.interval_ms, spec.checkpoint_max_interval_ms) == (
        "colo",
        50,
        1500,
    )
    assert spec.checkpoint_max_interval_s == 1.5  # ms everywhere a person sees it
    assert spec.unsafe_flags() == ["-n"] and spec.unsafe
    assert ProtectionSpec.from_args(_protect("vm", "--mode", "colo")).mode.value == "colo"


def test_an_integral_float_is_an_integer_interval() -> None:
    """JSON has one number type: 59999.0 is an integer (JSON Schema 2020-12)."""
    body = {"name": "vm", "peer": "b", "interval_ms": 59999.0}
    validate(SCHEMA, body)
    spec = ProtectionSpec.from_api(body, Config().spec_defaults())
    assert spec.interval_ms == 59999 and type(spec.interval_ms) is int
    with pytest.raises(ApiError) as err:
        validate(SCHEMA, {**body, "interval_ms": 59999.5})
    assert err.value.details is not None and err.value.details["field"] == "interval_ms"


@pytest.mark.parametrize("f", BOUNDED, ids=lambda f: f.name)
def test_out_of_bounds_values_name_the_field(f: Field) -> None:
    outside = []
    if f.minimum is not None:
        outside.append(f.minimum if f.exclusive_minimum else f.minimum - 1)
    if f.maximum is not None:
        outside.append(f.maximum + 1)
    for value in outside:
        v = f.kind(value)
        with pytest.raises(SpecError) as err:
            ProtectionSpec(name="vm").with_(**{f.name: v})
        assert err.value.field == f.name and str(err.value).startswith(f"{f.name}: ")
        if f.api:
            with pytest.raises(ApiError) as api:
                validate(SCHEMA, {"name": "vm", "peer": "b", f.name: v})
            assert api.value.details is not None and api.value.details["field"] == f.name


def test_the_cli_refuses_out_of_bounds_with_the_fields_name() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "protect", "vm", "--to", "b", "-i", "70000",
         "--foreground"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and "interval_ms: 70000 ms is above 60000" in r.stderr, r.stderr


def test_a_non_ascii_peer_is_a_spec_error() -> None:
    for peer in ("hôte:8002", "\u00e9" * 70, "b:x", "b :1"):
        with pytest.raises(SpecError) as err:
            check_peer(peer)
        assert err.value.field == "peer"
    assert check_peer("127.0.0.1:8002") == ("127.0.0.1", 8002)
    assert check_peer("[::1]:9") == ("[::1]", 9)


@pytest.fixture
def remusd(tmp_path: Path) -> Iterator[Remusd]:
    d = Remusd(tmp_path / "a", 30000 + random.randrange(20000))
    d.start()
    yield d
    d.stop()
    for dom in d.hv.list_domains():
        d.hv.destroy(dom.domid)


def test_through_remusd_a_non_ascii_peer_is_422_and_an_integral_float_is_taken(
    remusd: Remusd,
) -> None:
    remusd.hv.create_domain("vm1", memory_mib=16)
    with remusd.api() as c:
        with pytest.raises(ApiClientError) as err:
            c.post("/v1/protections", {"name": "vm1", "peer": "hôte:8002"})
        assert (err.value.status, err.value.code) == (422, "NOT_PROTECTABLE"), err.value
        assert err.value.details is not None
        assert [r["check"] for r in err.value.details["reasons"]] == ["peer_address"]
        # past the schema (no 400) to the pre-flight: nobody listens on port 1
        with pytest.raises(ApiClientError) as err:
            c.post(
                "/v1/protections", {"name": "vm1", "peer": "127.0.0.1:1", "interval_ms": 59999.0}
            )
        assert (err.value.status, err.value.code) == (502, "PEER_UNREACHABLE"), err.value
