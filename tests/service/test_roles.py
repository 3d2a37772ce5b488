"""Roles that change: protect back after a failover, a planned switchover and back.

Real remusd pairs (``test_remusd.Remusd``: two simulated hosts, the API on unix
sockets, a file witness both share, mutual TLS), a client writing keys all along
to whichever host runs the guest, and a prober that asks each host's copy to
answer, every few milliseconds. The measure is the client's: every write the
guest acknowledged is in the copy that stands after each step, and no probe
ever finds two copies answering.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.service.client import ApiClientError

from ..etcd import EtcdServer
from .test_remusd import Remusd, _two, _workers, events, metric, two, wait
from .test_remusd_colo import _cli, _colo_missing

__all__ = ["two"]  # the fixture, used by name

NAME = "vm1"


def _ask(address: str, line: bytes, timeout: float) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(line + b"\n")
        f = s.makefile("rb")
        return f.readline().rstrip(b"\n")


class Load:
    """A client that writes keys to the copy that runs, and a prober of every copy."""

    def __init__(self, *hosts: Remusd) -> None:
        self.hosts = hosts
        self.acked: dict[bytes, bytes] = {}
        self.most_answering = 0
        self.probes = 0
        self.two_at: list[float] = []
        self.excused = (0.0, 0.0)  # a window in which the test itself made a second copy
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._write, daemon=True),
            threading.Thread(target=self._probe, daemon=True),
        ]

    def _addresses(self) -> list[str]:
        found = []
        for d in self.hosts:
            with contextlib.suppress(Exception):
                found += [x.address for x in d.hv.list_domains() if x.name == NAME and x.address]
        return found

    def _running(self) -> list[str]:
        """Where a copy says it runs (a dead host's guest may still say so)."""
        found = []
        for d in self.hosts:
            with contextlib.suppress(Exception):
                found += [
                    x.address
                    for x in d.hv.list_domains()
                    if x.name == NAME and x.state == "running"
                ]
        return found

    def _write(self) -> None:
        i, last = 0, ""
        while not self._stop.is_set():
            key, value = b"k%d" % i, b"v%d" % i
            i += 1
            # the copy that answered last first: under COLO the secondary's runs too,
            # its output filtered, and a write to it is never answered
            running = sorted(self._running(), key=lambda a: a != last)
            for address in running:
                try:
                    if _ask(address, b"PUT " + key + b" " + value, 1.0) == b"OK":
                        self.acked[key] = value
                        last = address
                        break
                except OSError:
                    pass  # not acknowledged: it may or may not be in; nothing is claimed
            else:
                time.sleep(0.01)

    def _probe(self) -> None:
        while not self._stop.is_set():
            answering = 0
            for address in self._addresses():
                with contextlib.suppress(OSError):
                    if _ask(address, b"GET probe", 0.3) == b"NOTFOUND":
                        answering += 1
            self.probes += 1
            now = time.monotonic()
            if answering > 1 and self.excused[0] <= now <= self.excused[1] + 0.5:
                continue
            self.most_answering = max(self.most_answering, answering)
            if answering > 1:
                self.two_at.append(now)
            time.sleep(0.01)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def lost(self, address: str) -> list[bytes]:
        """Acknowledged keys the copy at ``address`` does not hold with their value."""
        acked = dict(self.acked)
        missing = []
        keys = sorted(acked)
        for at in range(0, len(keys), 200):
            batch = keys[at : at + 200]
            host, port = address.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=10) as s:
                f = s.makefile("rwb")
                f.write(b"".join(b"GET " + k + b"\n" for k in batch))
                f.flush()
                for k in batch:
                    if f.readline().rstrip(b"\n") != b"VALUE " + acked[k]:
                        missing.append(k)
        return missing


def record(d: Remusd) -> dict[str, Any]:
    with d.api() as c:
        got: dict[str, Any] = c.get(f"/v1/protections/{NAME}")
        return got


def maybe_record(d: Remusd) -> dict[str, Any] | None:
    try:
        return record(d)
    except ApiClientError:
        return None


def replicating(primary: Remusd, secondary: Remusd, after: int = 3) -> None:
    """``primary`` protects the guest to ``secondary``, which knows itself as such."""

    def both() -> bool:
        p, s = maybe_record(primary), maybe_record(secondary)
        return bool(
            p is not None
            and p["role"] == "primary"
            and p["state"] == "replicating"
            and p["checkpoints"] >= after
            and s is not None
            and s["role"] == "secondary"
            and s["state"] == "replicating"
        )

    wait(both, timeout=60, what=f"replication from {primary.base.name} to {secondary.base.name}")


def kill_host(d: Remusd) -> None:
    """The host dies: its workers, its guests and remusd, all at once."""
    doomed = _workers(d.base)
    for x in d.hv.list_domains():
        with contextlib.suppress(OSError, ValueError):
            doomed.append(
                -int((d.base / "host" / "domains" / str(x.domid) / "guest.pid").read_text())
            )
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # a negative pid: the guest's process group
    d.stop(signal.SIGKILL)


@pytest.fixture
def pair(two: tuple[Remusd, Remusd]) -> Iterator[tuple[Remusd, Remusd]]:
    a, b = two
    a.hv.create_domain(NAME, memory_mib=16)
    yield a, b


def test_fail_over_protect_back_switch_over_and_back_lose_nothing_one_copy_answers(
    pair: tuple[Remusd, Remusd],
) -> None:
    a, b = pair
    with Load(a, b) as load:
        with a.api() as c:
            c.post("/v1/protections", {"name": NAME, "peer": f"127.0.0.1:{b.port}"})
        replicating(a, b)
        wait(lambda: len(load.acked) >= 50, what="writes acknowledged")

        # 1. host A dies: B takes over
        kill_host(a)
        wait(lambda: (maybe_record(b) or {}).get("state") == "failed-over", what="failover")
        standing = b.hv.lookup(NAME).address
        wait(lambda: len(load.acked) >= 100, what="writes to the survivor")
        assert load.lost(standing) == []

        # 2. A comes back; its remusd finds B took over and drops its copy; B protects back
        # (not while A's remusd is down, nor while A runs a domain of that name)
        with b.api() as c, pytest.raises(ApiClientError) as err:
            c.post("/v1/protections", {"name": NAME, "peer": f"127.0.0.1:{a.port}"})
        assert err.value.code == "PEER_UNREACHABLE", err.value
        a.start()
        wait(lambda: [x for x in a.hv.list_domains() if x.name == NAME] == [], what="A's copy")
        # as if A's copy were still there (a blank one the prober may find answering:
        # the test's own, so its window is not counted)
        made = time.monotonic()
        load.excused = (made, math.inf)
        stale = a.hv.create_domain(NAME, memory_mib=16)
        with b.api() as c, pytest.raises(ApiClientError) as err:
            c.post("/v1/protections", {"name": NAME, "peer": f"127.0.0.1:{a.port}"})
        assert err.value.details is not None
        assert [r["check"] for r in err.value.details["reasons"]] == ["peer_name"], err.value
        a.hv.destroy(stale.domid)
        load.excused = (made, time.monotonic() + 0.5)
        r = _cli(b, "protect", NAME, "--to", f"127.0.0.1:{a.port}", "--json")
        assert r.returncode == 0, r.stderr
        p = json.loads(r.stdout)
        assert p["role"] == "primary", p
        replicating(b, a)
        assert load.lost(b.hv.lookup(NAME).address) == []

        # 3. switch over: A runs the guest again, B becomes its secondary, no manual step
        n = len(load.acked)
        with b.api() as c:
            t0 = time.monotonic()
            done = c.post(f"/v1/protections/{NAME}/switchover")
            took = time.monotonic() - t0
        assert done["state"] == "switched-over", done
        assert done["live"]["switchover_pause_ms"] is not None, done
        replicating(a, b)
        wait(lambda: len(load.acked) >= n + 50, what="writes after the switchover")
        assert load.lost(a.hv.lookup(NAME).address) == []

        # 4. and back, with remusctl
        r = _cli(a, "switchover", NAME, "--json")
        assert r.returncode == 0, r.stderr
        back = json.loads(r.stdout)
        assert back["state"] == "switched-over", back
        replicating(b, a)
        n = len(load.acked)
        wait(lambda: len(load.acked) >= n + 50, what="writes after switching back")
    standing = b.hv.lookup(NAME).address
    assert load.lost(standing) == [], "acknowledged writes lost"
    assert load.most_answering == 1 and load.two_at == [], (load.most_answering, load.probes)
    assert [x for x in a.hv.list_domains() if x.name == NAME and x.state == "running"] == []
    print(
        f"\n{len(load.acked)} writes acknowledged, 0 lost; {load.probes} probes, none with "
        f"two copies; switchover pause {done['live']['switchover_pause_ms']:.0f} ms and "
        f"{back['live']['switchover_pause_ms']:.0f} ms, POST answered in {took * 1e3:.0f} ms"
    )
    kinds_b = [e["kind"] for e in events(b, NAME)]
    kinds_a = [e["kind"] for e in events(a, NAME)]
    # B: secondary, primary (protect back), secondary (switchover), primary (and back)
    assert kinds_b.count("role-changed") == 3, kinds_b
    assert kinds_a.count("role-changed") == 3, kinds_a
    assert kinds_b.count("switched-over") == 1 and kinds_a.count("switched-over") == 1
    with b.api() as c:
        text = str(c.request("GET", "/metrics"))
    assert metric(text, "remus_switchovers_total", domain=NAME) == 1
    assert metric(text, "remus_role_changes_total", domain=NAME) == 3
    assert metric(text, "remus_replication_state", domain=NAME, role="primary") == 1


def test_switchover_is_refused_with_a_typed_error_when_it_cannot_hand_over(
    pair: tuple[Remusd, Remusd],
) -> None:
    a, b = pair
    with a.api() as c:
        c.post("/v1/protections", {"name": NAME, "peer": f"127.0.0.1:{b.port}"})
    replicating(a, b)
    cases: list[tuple[Remusd, str]] = [(b, "WRONG_ROLE")]
    for d, code in cases:
        with d.api() as c, pytest.raises(ApiClientError) as err:
            c.post(f"/v1/protections/{NAME}/switchover")
        assert (err.value.status, err.value.code) == (409, code), err.value
    # replication paused: there is no secondary in step to hand over to
    with a.api() as c:
        c.post(f"/v1/protections/{NAME}/pause")
        with pytest.raises(ApiClientError) as err:
            c.post(f"/v1/protections/{NAME}/switchover")
        assert (err.value.status, err.value.code) == (409, "LINK_UNHEALTHY"), err.value
        assert "not replicating" in err.value.message
        c.post(f"/v1/protections/{NAME}/resume")
    replicating(a, b)
    # the secondary's worker stopped: no ACK comes, and the last checkpoint ages past
    # two intervals and a second
    (sec,) = _workers(b.base)
    os.kill(sec, signal.SIGSTOP)
    try:
        with a.api() as c:
            wait(
                lambda: time.time() - (record(a)["live"]["last_checkpoint_at"] or 0) > 1.5,
                what="an old checkpoint",
            )
            with pytest.raises(ApiClientError) as err:
                c.post(f"/v1/protections/{NAME}/switchover")
        assert (err.value.status, err.value.code) == (409, "LINK_UNHEALTHY"), err.value
    finally:
        os.kill(sec, signal.SIGCONT)
    # nothing was handed over: the guest runs on A, protected or not. One look can land
    # in a checkpoint, where the guest is suspended for a moment ("shutdown"): it must
    # be seen running on A within a few seconds
    wait(
        lambda: [x.state for x in a.hv.list_domains() if x.name == NAME] == ["running"],
        timeout=10,
        what="the guest running on A",
    )
    assert [e["kind"] for e in events(a, NAME)].count("switchover-requested") == 0


@pytest.mark.skipif(_colo_missing() is not None, reason=f"COLO needs {_colo_missing()}")
def test_colo_switchover_and_back_lose_nothing_one_copy_answers(
    pair: tuple[Remusd, Remusd],
) -> None:
    """COLO: the secondary's copy runs all along, its output filtered; a switchover
    takes a last checkpoint, and from it the secondary's copy answers alone."""
    a, b = pair
    body = {"name": NAME, "mode": "colo", "no_disk": True, "checkpoint_max_interval_ms": 1000}
    with Load(a, b) as load:
        with a.api() as c:
            c.post("/v1/protections", {**body, "peer": f"127.0.0.1:{b.port}"})
        replicating(a, b, after=1)
        wait(lambda: len(load.acked) >= 50, what="writes acknowledged")
        pauses = []
        for old, new in ((a, b), (b, a)):
            n = len(load.acked)
            with old.api() as c:
                done = c.post(f"/v1/protections/{NAME}/switchover")
            assert done["state"] == "switched-over", done
            pauses.append(done["live"]["switchover_pause_ms"])
            replicating(new, old, after=1)
            assert record(new)["mode"] == "colo"
            wait(lambda n=n: len(load.acked) >= n + 50, what="writes after the switchover")
            assert (
                load.lost(a.hv.lookup(NAME).address if new is a else b.hv.lookup(NAME).address)
                == []
            )
    assert load.most_answering == 1 and load.two_at == [], (load.most_answering, load.probes)
    print(
        f"\nCOLO: {len(load.acked)} writes acknowledged, 0 lost; {load.probes} probes, none "
        f"with two copies; switchover pauses {pauses} ms"
    )


@pytest.fixture
def pair_on_etcd(tmp_path: Path, etcd: EtcdServer) -> Iterator[tuple[Remusd, Remusd]]:
    """Two hosts under a real etcd (the lease expires, unlike a file witness's lock)."""
    for a, b in _two(tmp_path, etcd.url):
        a.hv.create_domain(NAME, memory_mib=16)
        yield a, b


def test_switchover_is_refused_while_the_lease_is_not_valid(
    pair_on_etcd: tuple[Remusd, Remusd], etcd: EtcdServer
) -> None:
    a, b = pair_on_etcd
    with a.api() as c:
        c.post("/v1/protections", {"name": NAME, "peer": f"127.0.0.1:{b.port}"})
    replicating(a, b)
    etcd.kill()  # the witness lost: the lease cannot be renewed
    wait(
        lambda: (record(a)["witness"] or {}).get("lease") not in ("held", None),
        what="the lease not held",
    )
    with a.api() as c, pytest.raises(ApiClientError) as err:
        c.post(f"/v1/protections/{NAME}/switchover")
    assert (err.value.status, err.value.code) == (409, "WITNESS_UNHEALTHY"), err.value
    assert "cannot be handed over" in err.value.message
    assert [e["kind"] for e in events(a, NAME)].count("switchover-requested") == 0
