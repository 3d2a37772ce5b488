"""remusd as real processes: two hosts, the API on real unix sockets, restarts, workers."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.hypervisors.sim import SimHypervisor
from orchestrator.service.client import ApiClient, ApiClientError

from ..guestclient import kv

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Remusd:
    """One host: a simulated hypervisor and the remusd process that serves it."""

    base: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    start_extra: tuple[str, ...] = ()

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
        (self.base / "remusd.toml").write_text("[replication]\ninterval_ms = 50\n")
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


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Remusd, Remusd]]:
    port = 20000 + random.randrange(20000)
    a, b = Remusd(tmp_path / "a", port), Remusd(tmp_path / "b", port + 1)
    a.start()
    b.start()
    yield a, b
    for d in (a, b):
        d.stop()
        for pid in _workers(d.base):
            os.kill(pid, signal.SIGKILL)
        hv = d.hv
        for dom in hv.list_domains():
            hv.destroy(dom.domid)


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
    with a.api() as c:
        cases = [
            ({"name": "nope", "peer": f"127.0.0.1:{b.port}"}, 404, "DOMAIN_NOT_FOUND"),
            ({"name": "vm1", "peer": "127.0.0.1:1"}, 502, "PEER_UNREACHABLE"),
            ({"name": "vm1", "peer": f"127.0.0.1:{b.port}", "no_netbuf": True}, 422, None),
            ({"name": "vm1", "peer": "no-port:x"}, 422, "NOT_PROTECTABLE"),
            ({"name": "vm 1", "peer": "x"}, 400, "BAD_REQUEST"),
            ({"name": "vm1"}, 400, "BAD_REQUEST"),
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
        with pytest.raises(ApiClientError) as err:
            c.get("/v1/protections/vm1")
        assert err.value.code == "PROTECTION_NOT_FOUND"
        host = c.get("/v1/host")
        assert host["backend"] == "sim" and host["replication"]["protocol_version"] == 1
        assert host["helper"]["path"]


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


def test_worker_death_leaves_the_guest_running_and_is_retried(
    two: tuple[Remusd, Remusd],
) -> None:
    a, b = two
    info = a.hv.create_domain("vm1", memory_mib=16)
    with a.api() as c:
        c.post("/v1/protections", {"name": "vm1", "peer": f"127.0.0.1:{b.port}"})
    wait(lambda: checkpoints(a, "vm1") >= 3)
    (worker,) = _workers(a.base)
    os.kill(worker, signal.SIGKILL)  # may be mid-checkpoint, with the guest suspended
    wait(lambda: a.hv.lookup("vm1").state == "running", timeout=10, what="guest resumed")
    assert kv(info.address, [b"PUT k v", b"GET k"]) == [b"OK", b"VALUE v"]
    with a.api() as c:
        wait(
            lambda: any(e["kind"] == "retry" for e in c.get("/v1/events?limit=100")),
            what="retry event",
        )
        # the secondary took over when the heartbeats stopped: re-protecting to it must
        # not overwrite that copy, and says why
        with b.api() as cb:
            wait(lambda: cb.get("/v1/protections/vm1")["state"] == "failed-over")
        c.delete("/v1/protections/vm1")
        assert c.get("/v1/protections") == []
    assert a.hv.lookup("vm1").state == "running"


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
