"""remusd as real processes: two hosts, the API on real unix sockets, restarts, workers.

The two hosts share a file witness in the test's directory (both remusd name it,
``[witness] url``), so every protection runs under a lease unless a test asks
for none (``witness: none`` with ``unsafe``, on hosts configured without one).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator.hypervisors.sim import SimHypervisor
from orchestrator.service.client import ApiClient, ApiClientError

from ..guestclient import kv
from ..tlshosts import trust_each_other

ROOT = Path(__file__).resolve().parents[2]
# the hosts' lease: its takeover window (1.5 TTL + 1 s) is how long a secondary that lost
# its primary tries to take the lease
LEASE_TTL_MS = 2000


@dataclass
class Remusd:
    """One host: a simulated hypervisor and the remusd process that serves it."""

    base: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    start_extra: tuple[str, ...] = ()
    witness: str = ""  # [witness] url ("": the backend's default, which a receiver follows)

    @property
    def socket(self) -> Path:
        return self.base / "api.sock"

    @property
    def hv(self) -> SimHypervisor:
        return SimHypervisor(self.base / "host")

    def argv(self, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "orchestrator.service.daemon",
            "--config",
            str(self.base / "remusd.toml"),
            "--set",
            f"api.socket={self.socket}",
            "--set",
            f"state.dir={self.base / 'state'}",
            "--set",
            f"state.host={self.base / 'host'}",
            "--set",
            f"replication.listen=127.0.0.1:{self.port}",
            "--set",
            "metrics.listen=",
            *extra,
        ]

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        config = "[replication]\ninterval_ms = 50\n"
        if self.witness:
            config += f'[witness]\nurl = "{self.witness}"\nlease_ttl_ms = {LEASE_TTL_MS}\n'
        (self.base / "remusd.toml").write_text(config)
        log = open(self.base / "remusd.log", "ab")  # noqa: SIM115 (the process owns it)
        self.proc = subprocess.Popen(self.argv(*self.start_extra), stderr=log, cwd=ROOT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with ApiClient(self.socket, timeout=2) as c:
                    c.get("/v1/health")
                return
            except Exception:
                assert self.proc.poll() is None, (self.base / "remusd.log").read_text()
                time.sleep(0.05)
        raise TimeoutError("remusd did not answer")

    def api(self) -> ApiClient:
        return ApiClient(self.socket, timeout=30)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)


def _workers(base: Path) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            argv = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if b"orchestrator.protection.worker" in argv and str(base).encode() in argv:
            pids.append(int(p.name))
    return pids


def _two(tmp_path: Path, witness: str) -> Iterator[tuple[Remusd, Remusd]]:
    port = 20000 + random.randrange(20000)
    a = Remusd(tmp_path / "a", port, witness=witness)
    b = Remusd(tmp_path / "b", port + 1, witness=witness)
    trust_each_other(a.base / "host", b.base / "host")  # the link is mutual TLS
    a.start()
    b.start()
    yield a, b
    for d in (a, b):
        if d.proc is not None and d.proc.poll() is None:
            d.proc.send_signal(signal.SIGCONT)  # a test that stopped it failed midway
        d.stop()
        for pid in _workers(d.base):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        hv = d.hv
        for dom in hv.list_domains():
            hv.destroy(dom.domid)


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Remusd, Remusd]]:
    """Two hosts under one file witness of their own."""
    yield from _two(tmp_path, f"file://{tmp_path}/witness")


@pytest.fixture
def two_unsafe(tmp_path: Path) -> Iterator[tuple[Remusd, Remusd]]:
    """Two hosts with no witness configured: a receiver follows its primary, which may
    protect without one (``witness: none`` with ``unsafe``)."""
    yield from _two(tmp_path, "")


def wait(cond: Callable[[], object], timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what or "condition not reached")
        time.sleep(0.05)


def checkpoints(d: Remusd, name: str) -> int:
    with d.api() as c:
        return int(c.get(f"/v1/protections/{name}")["checkpoints"])


def test_protect_errors_are_typed_and_name_the_failed_checks(two: tuple[Remusd, Remusd]) -> None:
    a, b = two
    a.hv.create_domain("vm1", memory_mib=16)
    peer = f"127.0.0.1:{b.port}"
    with a.api() as c:
        cases = [
            ({"name": "nope", "peer": f"127.0.0.1:{b.port}"}, 404, "DOMAIN_NOT_FOUND"),
            ({"name": "vm1", "peer": "127.0.0.1:1"}, 502, "PEER_UNREACHABLE"),
            ({"name": "vm1", "peer": f"127.0.0.1:{b.port}", "no_netbuf": True}, 422, None),
            ({"name": "vm1", "peer": "no-port:x"}, 422, "NOT_PROTECTABLE"),
            ({"name": "vm 1", "peer": "x"}, 400, "BAD_REQUEST"),
            ({"name": "vm1"}, 400, "BAD_REQUEST"),
            # ssh instead of peer: its sshd is asked to answer, its target parses
            ({"name": "vm1", "ssh": "root@127.0.0.1:1"}, 502, "PEER_UNREACHABLE"),
            ({"name": "vm1", "ssh": "root@"}, 422, "NOT_PROTECTABLE"),
            ({"name": "vm1", "ssh": "h", "peer": peer}, 422, "NOT_PROTECTABLE"),
        ]
        for body, status, code in cases:
            with pytest.raises(ApiClientError) as err:
                c.post("/v1/protections", body)
            assert err.value.status == status, (body, err.value)
            if code:
                assert err.value.code == code
        # -n without -F: NOT_PROTECTABLE, with the check that failed as a typed reason
        with pytest.raises(ApiClientError) as err:
            c.post(
                "/v1/protections", {"name": "vm1", "peer": f"127.0.0.1:{b.port}", "no_netbuf": True}
            )
        assert err.value.code == "NOT_PROTECTABLE"
        assert [r["check"] for r in err.value.details["reasons"]] == ["unsafe"]  # type: ignore[index]
        # a witness no worker could open is refused before anything starts, naming it
        for bad in ("zk://h:2181", "file://relative/dir", "file:dir", "etcd3+http://", "x y"):
            with pytest.raises(ApiClientError) as err:
                c.post("/v1/protections", {"name": "vm1", "peer": peer, "witness": bad})
            assert (err.value.status, err.value.code) == (422, "NOT_PROTECTABLE"), err.value
            assert err.value.details is not None and err.value.details["field"] == "witness"
            assert repr(bad) in err.value.details["problem"], err.value.details
            assert err.value.details["reasons"][0]["check"] == "settings"
        with pytest.raises(ApiClientError) as err:
            c.get("/v1/protections/vm1")
        assert err.value.code == "PROTECTION_NOT_FOUND"
        host = c.get("/v1/host")
        assert host["backend"] == "sim" and host["replication"]["protocol_version"] == 1
        assert host["helper"]["path"]
        # a simulated guest is a process here: the host kernel's count is the one
        mem = host["memory"]
        assert mem["source"].startswith("/proc/meminfo") and 0 < mem["free_bytes"] <= mem[
            "total_bytes"
        ], mem


def test_restart_of_remusd_mid_protection_loses_nothing(two: tuple[Remusd, Remusd]) -> None:
    """SIGKILL remusd while it protects: the worker carries on, the restarted remusd
    re-attaches, and a later failover still has every acknowledged write."""
    a, b = two
    info = a.hv.create_domain("vm1", memory_mib=16)
    with a.api() as c:
        p = c.post("/v1/protections", {"name": "vm1", "peer": f"127.0.0.1:{b.port}"})
        assert p["role"] == "primary" and p["settings"]["interval_ms"] == 50
    wait(lambda: checkpoints(a, "vm1") >= 3, what="first checkpoints")
    with b.api() as c:
        (sec,) = c.get("/v1/protections")
    assert sec["name"] == "vm1" and sec["role"] == "secondary"

    acked = kv(info.address, [b"PUT before%d x%d" % (i, i) for i in range(40)])
    assert set(acked) == {b"OK"}
    (worker,) = _workers(a.base)
    a.stop(signal.SIGKILL)  # in the middle of whatever checkpoint was running
    before = json.loads((a.base / "state" / "workers" / "vm1.json").read_text())["checkpoints"]
    assert set(kv(info.address, [b"PUT during%d y%d" % (i, i) for i in range(40)])) == {b"OK"}

    def still_replicating() -> bool:
        st = json.loads((a.base / "state" / "workers" / "vm1.json").read_text())
        return bool(st["checkpoints"] >= before + 5)

    wait(still_replicating, what="replication without remusd")
    # running between checkpoints (at any instant it may be suspended for one)
    wait(lambda: a.hv.lookup("vm1").state == "running", timeout=10, what="guest running")
    a.start()
    with a.api() as c:
        p = c.get("/v1/protections/vm1")
        assert p["state"] == "replicating" and p["live"]["pid"] == worker
        kinds = [e["kind"] for e in c.get("/v1/events?limit=100")]
        assert "restart" in kinds
    assert _workers(a.base) == [worker]
    n = checkpoints(a, "vm1")
    wait(lambda: checkpoints(a, "vm1") >= n + 3)

    # now the primary host dies for real: worker and guest
    os.kill(worker, signal.SIGKILL)
    gpid = int((a.base / "host" / "domains" / str(info.domid) / "guest.pid").read_text())
    os.killpg(gpid, signal.SIGKILL)
    a.stop(signal.SIGKILL)
    with b.api() as c:
        wait(lambda: c.get("/v1/protections/vm1")["state"] == "failed-over", what="failover")
    restored = b.hv.lookup("vm1")
    got = kv(restored.address, [b"GET before%d" % i for i in range(40)])
    got += kv(restored.address, [b"GET during%d" % i for i in range(40)])
    want = [b"VALUE x%d" % i for i in range(40)] + [b"VALUE y%d" % i for i in range(40)]
    assert got == want
    with b.api() as c:
        metrics = c.request("GET", "/metrics")
    assert 'remus_failovers_total{domain="vm1"} 1' in str(metrics)


def running_copies(name: str, *hosts: Remusd) -> int:
    """How many hosts run a copy of ``name`` (a secondary's receiving copy is paused)."""
    return sum(
        1
        for d in hosts
        for dom in d.hv.list_domains()
        if dom.name == name and dom.state == "running"
    )


def events(d: Remusd, name: str) -> list[dict[str, Any]]:
    with d.api() as c:
        found: list[dict[str, Any]] = c.get(f"/v1/events?name={name}&limit=1000")
    return found


def metric(text: str, name: str, **labels: str) -> float | None:
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        if all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    return None


def test_worker_death_under_a_lease_the_guest_runs_on_here_alone(
    two: tuple[Remusd, Remusd],
) -> None:
    """SIGKILL the primary's worker while its secondary cannot take over (SIGSTOPped):
    remusd pauses the guest, takes the lease itself, finds no takeover on the witness,
    resumes the guest and holds the lease until the secondary, continued, has given up
    and dropped its copy; then it protects anew. One copy runs, never two."""
    a, b = two
    info = a.hv.create_domain("vm1", memory_mib=16)
    peer = f"127.0.0.1:{b.port}"
    with a.api() as c:
        c.post("/v1/protections", {"name": "vm1", "peer": peer})
    wait(lambda: checkpoints(a, "vm1") >= 3)
    with a.api() as c:
        lease = c.get("/v1/protections/vm1")["witness"]
    # a file witness's lock is held until its holder dies: no validity to count down
    assert lease == {
        "url": a.witness, "lease": "held", "lease_valid_for_s": None, "lease_expires": False,
        "holder": "worker",
    }  # fmt: skip
    (secondary,) = _workers(b.base)
    (worker,) = _workers(a.base)
    os.kill(secondary, signal.SIGSTOP)
    try:
        os.kill(worker, signal.SIGKILL)  # may be mid-checkpoint, with the guest suspended
        with a.api() as c:
            wait(
                lambda: c.get("/v1/protections/vm1")["state"] == "unprotected",
                what="remusd holds the lease",
            )
            p = c.get("/v1/protections/vm1")
            text = str(c.request("GET", "/metrics"))
        assert "nobody took over" in p["reason"], p
        assert p["witness"]["holder"] == "remusd" and p["witness"]["lease"] == "held", p
        labels = {"domain": "vm1", "peer": peer, "role": "primary"}
        assert metric(text, "remus_witness_lease_held", **labels) == 1
        assert metric(text, "remus_witness_lease_valid_seconds", **labels) == math.inf
        assert metric(text, "remus_witness_lease_state", state="held", **labels) == 1
        assert metric(text, "remus_witness_info", domain="vm1", witness=a.witness) == 1
        assert metric(text, "remus_unprotected", domain="vm1", peer=peer) == 1
        assert metric(text, "remus_witness_fenced_total", domain="vm1") == 1
        wait(lambda: a.hv.lookup("vm1").state == "running", timeout=10, what="guest resumed")
        assert kv(info.address, [b"PUT k v", b"GET k"]) == [b"OK", b"VALUE v"]
        assert running_copies("vm1", a, b) == 1
    finally:
        os.kill(secondary, signal.SIGCONT)
    # it lost its primary, and cannot take the lease remusd holds: it drops its copy
    wait(
        lambda: any(
            e["kind"] == "state-stopped" and "still holds the lease" in e["message"]
            for e in events(b, "vm1")
        ),
        what="the secondary gives up",
    )
    with a.api() as c:

        def protected_anew() -> bool:
            p = c.get("/v1/protections/vm1")
            return p["state"] == "replicating" and p["live"]["pid"] not in (worker, None)

        wait(protected_anew, what="protected anew")
        wait(lambda: c.get("/v1/protections/vm1")["live"]["checkpoints"] >= 2)
        p = c.get("/v1/protections/vm1")
        text = str(c.request("GET", "/metrics"))
    assert p["witness"]["holder"] == "worker" and p["witness"]["lease"] == "held", p
    assert metric(text, "remus_unprotected", domain="vm1", peer=peer) == 0
    kinds = [e["kind"] for e in events(a, "vm1")]
    assert kinds.index("fenced") < kinds.index("running-unprotected") < kinds.index("retry")
    assert "taken-over" not in kinds and "two-copies-possible" not in kinds
    assert running_copies("vm1", a, b) == 1
    assert kv(info.address, [b"GET k"]) == [b"VALUE v"]


@pytest.mark.parametrize("remusd_away", ["hung", "restarted"])
def test_worker_death_the_secondary_takes_over_under_the_lease_and_ours_goes(
    two: tuple[Remusd, Remusd], remusd_away: str
) -> None:
    """The primary's worker dies while its remusd cannot act (SIGSTOPped, or killed and
    started again later): the secondary takes the lease and the guest over, marking the
    takeover on the witness. remusd, back, pauses its copy, finds the mark, destroys the
    copy and says why, instead of resuming it next to the one that runs now."""
    a, b = two
    info = a.hv.create_domain("vm1", memory_mib=16)
    with a.api() as c:
        c.post("/v1/protections", {"name": "vm1", "peer": f"127.0.0.1:{b.port}"})
    wait(lambda: checkpoints(a, "vm1") >= 3)
    assert kv(info.address, [b"PUT k v"]) == [b"OK"]  # acknowledged: in the secondary's copy
    (worker,) = _workers(a.base)
    assert a.proc is not None
    if remusd_away == "hung":
        a.proc.send_signal(signal.SIGSTOP)
    else:
        a.stop(signal.SIGKILL)
    try:
        os.kill(worker, signal.SIGKILL)
        with b.api() as c:
            wait(lambda: c.get("/v1/protections/vm1")["state"] == "failed-over", what="failover")
    finally:
        if remusd_away == "hung":
            a.proc.send_signal(signal.SIGCONT)
        else:
            a.start()
    with a.api() as c:
        wait(
            lambda: c.get("/v1/protections/vm1")["state"] == "taken-over",
            what="our copy destroyed",
        )
        p = c.get("/v1/protections/vm1")
        text = str(c.request("GET", "/metrics"))
    assert "took vm1 over" in p["reason"] and "destroyed" in p["reason"], p
    assert p["desired"] == "unprotected", p  # not protected again from here
    assert p["witness"]["url"] == a.witness and p["witness"]["holder"] is None, p
    assert [d for d in a.hv.list_domains() if d.name == "vm1"] == []
    assert running_copies("vm1", a, b) == 1
    kinds = [e["kind"] for e in events(a, "vm1")]
    assert kinds.index("fenced") < kinds.index("taken-over"), kinds
    assert "running-unprotected" not in kinds and "retry" not in kinds, kinds
    assert metric(text, "remus_witness_taken_over_total", domain="vm1") == 1
    assert _workers(a.base) == []
    assert kv(b.hv.lookup("vm1").address, [b"GET k"]) == [b"VALUE v"]
    with a.api() as c:
        c.delete("/v1/protections/vm1")
        assert c.get("/v1/protections") == []


def test_worker_death_without_a_witness_resumes_the_guest_and_says_two_copies_may_run(
    two_unsafe: tuple[Remusd, Remusd],
) -> None:
    """No witness (``witness: none``, unsafe): a dead worker's guest is resumed and
    protection retried as it always was, and the secondary takes over on heartbeats
    alone: two copies run, and the record and the events said they might."""
    a, b = two_unsafe
    info = a.hv.create_domain("vm1", memory_mib=16)
    body = {"name": "vm1", "peer": f"127.0.0.1:{b.port}", "witness": "none", "unsafe": True}
    with a.api() as c:
        assert c.post("/v1/protections", body)["witness"] is None
    wait(lambda: checkpoints(a, "vm1") >= 3)
    (worker,) = _workers(a.base)
    os.kill(worker, signal.SIGKILL)  # may be mid-checkpoint, with the guest suspended
    wait(lambda: a.hv.lookup("vm1").state == "running", timeout=10, what="guest resumed")
    assert kv(info.address, [b"PUT k v", b"GET k"]) == [b"OK", b"VALUE v"]
    wait(lambda: "retry" in [e["kind"] for e in events(a, "vm1")], what="retry event")
    (said,) = [e for e in events(a, "vm1") if e["kind"] == "two-copies-possible"]
    assert "no witness" in said["message"] and "two copies may run" in said["message"]
    # the secondary took over when the heartbeats stopped: re-protecting to it must
    # not overwrite that copy
    with b.api() as cb:
        wait(lambda: cb.get("/v1/protections/vm1")["state"] == "failed-over")
    assert running_copies("vm1", a, b) == 2  # what the unsafe mode risks, as said
    with a.api() as c:
        c.delete("/v1/protections/vm1")
        assert c.get("/v1/protections") == []
    assert a.hv.lookup("vm1").state == "running"


def test_a_primary_that_loses_its_lease_fences_and_one_copy_stands(
    two: tuple[Remusd, Remusd], tmp_path: Path
) -> None:
    """The witness loses the primary's lock (its file removed: another member may take
    it). The worker fences its guest at once, and remusd tells: lease-lost, then fenced.
    Then either the primary takes the lease back first (nobody took over: it runs on
    unprotected and is protected anew) or the secondary does (it runs the guest, and
    the primary destroys its copy); whichever, one copy runs."""
    a, b = two
    info = a.hv.create_domain("vm1", memory_mib=16)
    with a.api() as c:
        c.post("/v1/protections", {"name": "vm1", "peer": f"127.0.0.1:{b.port}"})
    wait(lambda: checkpoints(a, "vm1") >= 3)
    lock = tmp_path / "witness" / f"remus-protection-{info.uuid}"
    assert lock.exists(), sorted(p.name for p in lock.parent.iterdir())
    lock.unlink()
    wait(lambda: "fenced" in [e["kind"] for e in events(a, "vm1")], what="the worker fences")
    (lost,) = [e for e in events(a, "vm1") if e["kind"] == "lease-lost"]
    assert lost["data"]["lease"] == "lost" and lost["data"]["witness"] == a.witness, lost

    def settled() -> bool:
        kinds = [e["kind"] for e in events(a, "vm1")]
        with a.api() as c:
            state = c.get("/v1/protections/vm1")["state"]
        # ours: protected anew; theirs: remusd found no copy left to protect here
        return ("running-unprotected" in kinds and state == "replicating") or "copy-gone" in kinds

    wait(settled, timeout=60, what="one copy settled")
    assert running_copies("vm1", a, b) == 1
    kinds = [e["kind"] for e in events(a, "vm1")]
    assert kinds.index("lease-lost") < kinds.index("fenced"), kinds
    if "copy-gone" in kinds:
        with a.api() as c:
            p = c.get("/v1/protections/vm1")
        with b.api() as c:
            assert c.get("/v1/protections/vm1")["state"] == "failed-over"
        assert "took over" in p["reason"] and p["desired"] == "unprotected", p
        assert _workers(a.base) == []
    with a.api() as c:
        text = str(c.request("GET", "/metrics"))
    assert metric(text, "remus_witness_lease_lost_total", domain="vm1") == 1
    assert metric(text, "remus_witness_fenced_total", domain="vm1") == 1


def test_pause_resume_unprotect_and_the_cli_as_a_client(two: tuple[Remusd, Remusd]) -> None:
    a, b = two
    a.hv.create_domain("vm1", memory_mib=16)
    cli = [sys.executable, "-m", "orchestrator.cli", "--host", str(a.base / "host")]
    sock = ["--socket", str(a.socket)]
    r = subprocess.run(
        [*cli, "protect", "vm1", "--to", f"127.0.0.1:{b.port}", "-i", "50", *sock, "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["name"] == "vm1"
    wait(lambda: checkpoints(a, "vm1") >= 2)
    r = subprocess.run([*cli, "status", *sock], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "vm1" in r.stdout and "replicating" in r.stdout
    r = subprocess.run(
        [*cli, "protect", "vm1", "--to", f"127.0.0.1:{b.port}", *sock],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 1 and "ALREADY_PROTECTED" in r.stderr
    r = subprocess.run([*cli, "pause", "vm1", *sock], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "paused" in r.stdout
    assert _workers(a.base) == [] and a.hv.lookup("vm1").state == "running"
    with b.api() as c:  # the secondary dropped its copy: the primary said SHUTDOWN
        wait(lambda: c.get("/v1/protections/vm1")["state"] == "stopped")
    assert b.hv.list_domains() == []
    r = subprocess.run([*cli, "resume", "vm1", *sock], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    wait(lambda: checkpoints(a, "vm1") >= 2)
    r = subprocess.run([*cli, "unprotect", "vm1", *sock], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*cli, "events", "--json", *sock], capture_output=True, text=True, cwd=ROOT)
    kinds = [e["kind"] for e in json.loads(r.stdout)]
    assert kinds.index("protected") < kinds.index("paused") < kinds.index("unprotected")
    r = subprocess.run(
        [*cli, "status", "--socket", str(a.base / "nothing.sock")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "remusd" in r.stderr


def test_bad_configuration_names_the_key(tmp_path: Path) -> None:
    d = Remusd(tmp_path / "x", 1)
    d.base.mkdir()
    (d.base / "remusd.toml").write_text("[replication]\nintervall_ms = 5\n")
    r = subprocess.run(d.argv(), capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode == 2 and "replication.intervall_ms: unknown key" in r.stderr
    (d.base / "remusd.toml").write_text('[replication]\ninterval_ms = "fast"\n')
    r = subprocess.run(d.argv(), capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert "replication.interval_ms: expected int, got str" in r.stderr
    # a witness no worker could open stops remusd at start, not each protection later
    (d.base / "remusd.toml").write_text('[witness]\nurl = "zookeeper://h:2181"\n')
    r = subprocess.run(d.argv(), capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode == 2 and "witness.url: 'zookeeper://h:2181'" in r.stderr, r.stderr
    (d.base / "remusd.toml").write_text("")
    r = subprocess.run(
        d.argv("--set", "witness.url=file://var/lib/w"),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert r.returncode == 2 and "witness.url:" in r.stderr and "file:///ABSOLUTE/DIR" in r.stderr


def test_events_stream_and_tcp_with_a_token(tmp_path: Path) -> None:
    d = Remusd(tmp_path / "a", 30000 + random.randrange(20000))
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    tcp_port = d.port + 1
    d.start_extra = ("--set", f"api.tcp=127.0.0.1:{tcp_port}", "--set", f"api.token_file={token}")
    d.start()
    try:
        assert oct(os.stat(d.socket).st_mode & 0o777) == "0o600"
        with d.api() as c:
            stream = c.events("/v1/events/stream?after=0", timeout=20)
            first = next(stream)
            assert first.event == "started" and first.data["message"].startswith("remusd")
            stream.close()
            with pytest.raises(ApiClientError) as err:
                c.post("/v1/protections/vm1/failover", {"force": True})
            assert err.value.code == "PROTECTION_NOT_FOUND"
        url = f"http://127.0.0.1:{tcp_port}"
        with ApiClient(base_url=url) as anon, pytest.raises(ApiClientError) as err:
            anon.get("/v1/protections")
        assert err.value.status == 401 and err.value.code == "UNAUTHORIZED"
        with ApiClient(base_url=url, token="s3cret") as c:
            assert c.get("/v1/protections") == []
            assert "remus_checkpoints_total" in str(c.request("GET", "/metrics"))
    finally:
        d.stop()


def test_preflight_answers_what_protect_would_and_changes_nothing(
    two: tuple[Remusd, Remusd],
) -> None:
    """`POST /v1/preflight` (what the Ansible preflight module asks): the checks of
    `POST /v1/protections`, in its order and with its codes, and nothing registered."""
    a, b = two
    peer = f"127.0.0.1:{b.port}"
    with a.api() as c:
        r = c.post("/v1/preflight", {"name": "nosuch", "peer": peer})
        assert r["protectable"] is False and r["code"] == "DOMAIN_NOT_FOUND", r
        assert r["reasons"][0]["check"] == "domain_exists", r
        a.hv.create_domain("vm1", memory_mib=16)
        assert c.post("/v1/preflight", {"name": "vm1", "peer": peer}) == {
            "protectable": True,
            "code": None,
            "reasons": [],
        }
        r = c.post("/v1/preflight", {"name": "vm1", "peer": peer, "no_disk": True})
        assert r["protectable"] is False and r["code"] == "NOT_PROTECTABLE", r
        assert [x["check"] for x in r["reasons"]] == ["unsafe"], r
        r = c.post("/v1/preflight", {"name": "vm1", "peer": peer, "witness": "zk://x:1"})
        assert r["reasons"][0]["check"] == "settings" and "witness" in r["reasons"][0]["message"]
        assert c.get("/v1/protections") == []
        assert not any(e["kind"] == "protected" for e in c.get("/v1/events?limit=100"))
