"""COLO through remusd: `remusctl protect --colo` as a client, two real remusd
processes on two simulated hosts, and the COLO figures in the API, the CLI's
status and the metrics.

The end-to-end test needs root (the guests live in network namespaces and
their output is compared through NFQUEUE); the request schema tests do not.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.devices.netbuf_nfqueue import nfqueue_available
from orchestrator.hypervisors.sim import have_netns
from orchestrator.protection.spec import Mode, ProtectionSpec
from orchestrator.service.client import ApiClientError
from orchestrator.service.daemon import PROTECTION_SCHEMA
from orchestrator.service.http import ApiError, validate

from ..guestclient import kv
from .test_remusd import ROOT, Remusd, _workers, two, wait  # noqa: F401 (two: a fixture)


def _colo_missing() -> str | None:
    """What this machine lacks for COLO's network half (None: nothing)."""
    if os.geteuid() != 0:
        return "root (the guests' network namespaces and NFQUEUE)"
    if not have_netns():
        return "network namespaces (iproute2's `ip netns`)"
    why = nfqueue_available()
    return f"NFQUEUE ({why})" if why is not None else None


@pytest.fixture
def one(tmp_path: Path) -> Iterator[Remusd]:
    d = Remusd(tmp_path / "a", 30000 + random.randrange(20000))
    d.start()
    yield d
    d.stop()


def _bad_request(d: Remusd, body: dict[str, Any]) -> dict[str, Any]:
    with d.api() as c, pytest.raises(ApiClientError) as err:
        c.post("/v1/protections", body)
    assert (err.value.status, err.value.code) == (400, "BAD_REQUEST"), err.value
    assert err.value.details is not None
    return err.value.details


def test_the_colo_fields_are_validated_and_name_the_field(one: Remusd) -> None:
    base = {"name": "vm1", "peer": "127.0.0.1:1"}
    for field, value, problem in (
        ("mode", "xen", 'must be one of "remus", "colo"'),
        ("mode", 1, "must be a string, not an integer"),
        ("checkpoint_max_interval_ms", 0, "must be >= 1"),
        ("checkpoint_max_interval_ms", 7_200_000, "must be <= 3600000"),
        ("checkpoint_max_interval_ms", "5", "must be an integer, not a string"),
        ("checkpoint_max_interval_ms", 1.5, "must be an integer, not a number"),
        ("compare_timeout_ms", -1, "must be > 0"),
        ("compare_timeout_ms", True, "must be a number, not a boolean"),
    ):
        details = _bad_request(one, {**base, field: value})
        assert details == {"field": field, "in": "body", "problem": problem}, (field, value)
    with one.api() as c:
        doc = c.get("/v1/openapi.json")
    post = doc["paths"]["/v1/protections"]["post"]
    props = post["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert props["mode"]["enum"] == ["remus", "colo"]
    assert props["checkpoint_max_interval_ms"]["type"] == "integer"
    assert "checkpoint_max_interval_s" not in props  # ms everywhere
    assert props["compare_timeout_ms"]["type"] == "number"
    got = doc["paths"]["/v1/protections/{name}"]["get"]["responses"]["200"]["content"]
    colo = got["application/json"]["schema"]["properties"]["colo"]["properties"]
    assert {"checkpoints_by_divergence", "compared_packets", "injected_packets"} <= set(colo)


def test_colo_ignores_no_disk_but_not_unchecked_output(one: Remusd) -> None:
    """-d asks for nothing unsafe under COLO (it never replicates the disk); -n does
    (output leaves uncompared), so it still needs -F."""

    def checks(body: dict[str, Any]) -> list[str]:
        with one.api() as c, pytest.raises(ApiClientError) as err:
            c.post("/v1/protections", {"name": "nope", "peer": "127.0.0.1:1", **body})
        assert err.value.code == "DOMAIN_NOT_FOUND"
        assert err.value.details is not None
        return [r["check"] for r in err.value.details["reasons"]]

    assert "unsafe" not in checks({"mode": "colo", "no_disk": True})
    assert "unsafe" in checks({"mode": "colo", "no_netbuf": True})
    assert "unsafe" in checks({"mode": "remus", "no_disk": True})


def _cli(d: Remusd, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "orchestrator.cli", "--host", str(d.base / "host"), *args]
    return subprocess.run(
        [*argv, "--socket", str(d.socket)], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def _worker_spec(pid: int) -> ProtectionSpec:
    """The settings a worker was started with: its one --spec document."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return ProtectionSpec.from_json(argv[argv.index(b"--spec") + 1].decode())


def _get(d: Remusd, name: str) -> dict[str, Any]:
    with d.api() as c:
        p: dict[str, Any] = c.get(f"/v1/protections/{name}")
    return p


def _conforms(p: dict[str, Any]) -> bool:
    """The protection is what the OpenAPI document says it is."""
    try:
        validate(PROTECTION_SCHEMA, p)
    except ApiError as exc:
        raise AssertionError(f"{exc.message}: {p}") from None
    return True


def _table(text: str) -> list[dict[str, str]]:
    """A table as remusctl prints it: a cell may be empty, so by column position."""
    header, *lines = text.splitlines()
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    return [
        {n: line[a:b].strip() for n, (a, b) in zip(names, bounds, strict=True)} for line in lines
    ]


def _samples(text: str, metric: str, domain: str) -> dict[str, float]:
    """The labels (as written) and value of each ``metric`` sample of ``domain``."""
    out = {}
    for m in re.finditer(rf"^{metric}\{{([^}}]*)\}} (\S+)$", text, re.M):
        if f'domain="{domain}"' in m.group(1):
            out[m.group(1)] = float(m.group(2))
    return out


@pytest.mark.skipif(_colo_missing() is not None, reason=f"COLO needs {_colo_missing()}")
def test_colo_through_remusd_compares_output_and_unprotects(
    two: tuple[Remusd, Remusd],  # noqa: F811 (the fixture imported above)
) -> None:
    a, b = two
    info = a.hv.create_domain("vm1", memory_mib=16)
    peer = f"127.0.0.1:{b.port}"
    r = _cli(
        a,
        "protect",
        "vm1",
        "--colo",
        "--to",
        peer,
        "-d",
        "-F",
        "--checkpoint-max-interval",
        "1000",
        "--compare-timeout",
        "200",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["mode"] == "colo" and p["role"] == "primary" and p["disk"] == "not replicated"
    assert p["settings"]["checkpoint_max_interval_ms"] == 1000
    assert p["settings"]["compare_timeout_ms"] == 200.0
    (worker,) = _workers(a.base)
    spec = _worker_spec(worker)
    assert spec.mode is Mode.COLO and not spec.no_netbuf
    assert (spec.checkpoint_max_interval_ms, spec.compare_timeout_ms) == (1000, 200.0)

    wait(lambda: _get(a, "vm1")["checkpoints"] >= 1, what="the first COLO checkpoint")
    # COLO: the secondary copy runs too (but for a moment at each checkpoint)
    wait(lambda: b.hv.lookup("vm1").state == "running", what="the secondary copy running")
    replies = kv(info.address, [b"PUT k%d v%d" % (i, i) for i in range(8)])
    assert replies == [b"OK"] * 8

    def compared() -> bool:
        colo = _get(a, "vm1")["colo"]
        return bool(colo and (colo["compared_packets"] or 0) > 0)

    wait(compared, what="compared output in the API")
    p = _get(a, "vm1")
    assert _conforms(p)
    assert p["mode"] == "colo" and p["state"] == "replicating", p
    colo = p["colo"]
    assert colo["mismatches"] == 0 and colo["checkpoints_by_divergence"] == 0, colo
    assert colo["mirrored_packets"] > 0 and colo["matched_bytes"] > 0, colo
    # replies released on a match: how long they waited for the secondary's
    assert 0 <= colo["compare_wait_ms_p50"] <= colo["compare_wait_ms_p99"], colo

    # the secondary learnt COLO from the primary's HELLO, and says so
    with b.api() as c:
        wait(lambda: c.get("/v1/protections/vm1")["mode"] == "colo", what="secondary's mode")
        # the status file is published every 200 ms: wait for one written after the PUTs
        wait(
            lambda: (c.get("/v1/protections/vm1")["colo"] or {}).get("injected_packets", 0) > 0,
            what="the secondary's injected packets in its status",
        )
        sec = c.get("/v1/protections/vm1")
    assert _conforms(sec)
    assert sec["role"] == "secondary" and sec["colo"]["output_filtered"] is True, sec
    assert sec["colo"]["injected_packets"] > 0, sec

    r = _cli(a, "status", "--json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["mode"] == "colo" and row["colo"]["compared_packets"] > 0
    assert row["colo"]["mismatches"] == 0
    r = _cli(a, "status")
    assert r.returncode == 0, r.stderr
    print(f"\n{r.stdout}")
    (cells,) = _table(r.stdout)
    assert list(cells)[:4] == ["NAME", "ROLE", "MODE", "STATE"]
    assert cells["MODE"] == "colo" and cells["MISMATCHES"] == "0", r.stdout
    assert int(cells["COMPARED"]) > 0 and int(cells["BY_DIVERGENCE"]) == 0, r.stdout

    with a.api() as c:
        text = c.request("GET", "/metrics")
    assert isinstance(text, str)
    (n_compared,) = _samples(text, "remus_colo_compared_packets_total", "vm1").values()
    assert n_compared > 0
    assert list(_samples(text, "remus_colo_mismatches_total", "vm1").values()) == [0]
    (mirrored,) = _samples(text, "remus_colo_mirrored_packets_total", "vm1").values()
    assert mirrored > 0
    reasons = _samples(text, "remus_colo_checkpoints_total", "vm1")
    assert {k.rsplit('reason="', 1)[1].rstrip('"') for k in reasons} == {
        "divergence",
        "held",
        "timer",
    }
    assert _samples(text, "remus_colo_held_packets", "vm1")
    (wait_s,) = _samples(text, "remus_colo_compare_wait_seconds", "vm1").values()
    assert wait_s == pytest.approx(colo["compare_wait_ms_p50"] / 1e3, abs=0.05)
    state = _samples(text, "remus_replication_state", "vm1")
    assert [v for k, v in state.items() if 'state="replicating"' in k] == [1], state
    (done,) = _samples(text, "remus_checkpoints_total", "vm1").values()
    assert done >= 1

    r = _cli(a, "unprotect", "vm1")
    assert r.returncode == 0, r.stderr
    assert _workers(a.base) == []
    with a.api() as c:
        assert c.get("/v1/protections") == []
    # the primary serves on, with what it had, and its output is no longer held
    assert a.hv.lookup("vm1").state == "running"
    assert kv(info.address, [b"GET k7", b"PUT after x"]) == [b"VALUE v7", b"OK"]
    # the secondary heard the primary's SHUTDOWN and dropped its copy
    with b.api() as c:
        wait(lambda: c.get("/v1/protections/vm1")["state"] == "stopped", what="secondary")
    wait(lambda: b.hv.list_domains() == [], what="the secondary copy dropped")


@pytest.mark.skipif(_colo_missing() is not None, reason=f"COLO needs {_colo_missing()}")
def test_colo_unchecked_output_and_a_remusd_restart_mid_protection(
    two: tuple[Remusd, Remusd],  # noqa: F811 (the fixture imported above)
) -> None:
    """-n -F: COLO without comparing output (no figures, no series); remusd killed and
    restarted re-attaches to the COLO worker, still COLO."""
    a, b = two
    info = a.hv.create_domain("vm1", memory_mib=16)
    body = {
        "name": "vm1",
        "peer": f"127.0.0.1:{b.port}",
        "mode": "colo",
        "no_netbuf": True,
        "unsafe": True,
        "checkpoint_max_interval_ms": 500,
    }
    with a.api() as c:
        p = c.post("/v1/protections", body)
    assert p["mode"] == "colo" and p["disk"] == "not replicated"
    (worker,) = _workers(a.base)
    assert _worker_spec(worker).no_netbuf
    wait(lambda: _get(a, "vm1")["checkpoints"] >= 1, what="the first COLO checkpoint")
    assert kv(info.address, [b"PUT k v"]) == [b"OK"]

    a.stop(signal.SIGKILL)
    a.start()
    p = _get(a, "vm1")
    assert _conforms(p)
    assert p["mode"] == "colo" and p["live"]["pid"] == worker, p
    assert p["colo"]["compared_packets"] is None and p["colo"]["mirrored_packets"] is None
    n = p["checkpoints"]
    wait(lambda: _get(a, "vm1")["colo"]["checkpoints_by_timer"] >= n, what="timer checkpoints")
    with a.api() as c:
        text = c.request("GET", "/metrics")
        assert isinstance(text, str)
        assert not _samples(text, "remus_colo_compared_packets_total", "vm1")
        assert _samples(text, "remus_colo_checkpoints_total", "vm1")
        c.delete("/v1/protections/vm1")
    assert _workers(a.base) == []
    assert a.hv.lookup("vm1").state == "running"
    assert kv(info.address, [b"GET k"]) == [b"VALUE v"]
