"""Remus under a lease on a real etcd, as the cluster fails (issue 22, first cases).

Real processes: `remusctl protect --foreground` on host A, `remusctl receive`
on host B, Debian's etcd as the witness; clients that count a write as
acknowledged only once its OK came back, and a prober that asks both copies
every few milliseconds who answers. Measured by the client: acknowledged
writes lost, and moments at which two copies answer.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from orchestrator.devices.netbuf_nfqueue import nfqueue_available
from orchestrator.hypervisors.sim import SimHypervisor, have_netns

from ..etcd import EtcdServer
from .test_cli_remus import remusctl
from .test_colo_net import Writers, _read_all

TTL_MS = 1000


def _answers(address: str) -> bool:
    """The copy at ``address`` answers a read within 0.2 s (held output is silence)."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.2) as s:
            s.settimeout(0.2)
            s.sendall(b"GET probe\n")
            return s.recv(64) != b""
    except OSError:
        return False


class Prober:
    """Asks both copies, over and over, whether they answer; keeps the worst moment."""

    def __init__(self, primary: str, secondary: SimHypervisor, name: str) -> None:
        self.primary, self.secondary, self.name = primary, secondary, name
        self.both = 0  # probes at which both copies answered
        self.rounds = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _secondary_address(self) -> str | None:
        try:
            d = self.secondary.lookup(self.name)
        except Exception:
            return None
        return d.address if d.state == "running" else None

    def _run(self) -> None:
        while not self.stop.is_set():
            a = _answers(self.primary)
            b_addr = self._secondary_address()
            b = b_addr is not None and _answers(b_addr)
            self.rounds += 1
            if a and b:
                self.both += 1
            time.sleep(0.01)

    def join(self) -> None:
        self.stop.set()
        self.thread.join(10)


COLO_SKIP = (
    os.geteuid() != 0 or not have_netns() or nfqueue_available() is not None,
    "COLO's network half needs root, network namespaces and NFQUEUE "
    f"({nfqueue_available() or 'root and ip'})",
)
MODES = [
    pytest.param("remus", id="remus"),
    pytest.param("colo", id="colo", marks=pytest.mark.skipif(COLO_SKIP[0], reason=COLO_SKIP[1])),
]


def _start(
    a: SimHypervisor, b: SimHypervisor, name: str, witness: str, mode: str = "remus"
) -> tuple[subprocess.Popen[str], subprocess.Popen[str], str]:
    """receive on B, protect on A, both under the lease; the address clients use.

    COLO: the secondary's copy runs all along, its output dropped on host B until
    it takes over; the prober's connections to it go unanswered until then."""
    port = 30000 + int.from_bytes(os.urandom(2), "little") % 20000
    lease = ["--witness", witness, "--lease-ttl", str(TTL_MS)]
    recv = subprocess.Popen(
        remusctl(b.host, "receive", "--listen", f"127.0.0.1:{port}", *lease),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert recv.stdout is not None
    assert "receiving on" in recv.stdout.readline()
    prot = subprocess.Popen(
        remusctl(a.host, "protect", name, "--foreground", "--to", f"127.0.0.1:{port}",
                 *(("--colo", "--checkpoint-max-interval", "500") if mode == "colo"
                   else ("-i", "50")), *lease),
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    status = a.host / "remus" / f"{name}.json"
    deadline = time.monotonic() + 30
    row: dict[str, object] = {}
    while time.monotonic() < deadline:
        try:
            row = json.loads(status.read_text())
            if int(row.get("checkpoints") or 0) >= 3:  # type: ignore[call-overload]
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    else:
        prot.kill()
        recv.kill()
        raise AssertionError(f"no third checkpoint: {row}")
    assert row["lease"] == "held" and row["witness"] == witness, row
    service = str(row.get("service_address") or a.lookup(name).address)
    return recv, prot, service


def _kill(*procs: subprocess.Popen[str] | None) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("mode", MODES)
def test_primary_stopped_longer_than_the_lease_releases_nothing_when_it_resumes(
    hosts: tuple[SimHypervisor, SimHypervisor], etcd: EtcdServer, mode: str
) -> None:
    """SIGSTOP of the primary's orchestrator for 3 TTLs: the secondary takes over once
    the lease has run out; the resumed primary finds no validity left, releases none
    of the output it held, pauses its guest, and destroys it once it reads the
    secondary's takeover mark on the witness. At no probe do two copies answer, and no
    acknowledged write is missing from the copy that stands."""
    a, b = hosts
    info = a.create_domain("web", memory_mib=8)
    recv, prot, service = _start(a, b, "web", etcd.url, mode)
    writers = prober = None
    try:
        writers = Writers(service, 3)
        prober = Prober(service, b, "web")
        time.sleep(0.5)
        t0 = time.monotonic()
        prot.send_signal(signal.SIGSTOP)
        out, _ = recv.communicate(timeout=30)
        took = time.monotonic() - t0
        assert recv.returncode == 0 and "FAILOVER" in out, out
        prot.send_signal(signal.SIGCONT)
        _, err = prot.communicate(timeout=30)
        writers.join()
        prober.join()
        st = json.loads((a.host / "remus" / "web.json").read_text())
        assert st["state"] == "fenced" and "fenced" in st["reason"], (st, err)
        # the secondary's takeover mark on the witness: ours is stale, and goes
        assert "took over: our copy destroyed" in st["reason"], (st, err)
        assert [d for d in a.list_domains() if d.domid == info.domid] == [], (st, err)
        assert prober.both == 0, f"two copies answered at {prober.both} of {prober.rounds}"
        acked = sorted(writers.acked)
        got = _read_all(b.lookup("web").address, acked)
        lost = [k for k, v in zip(acked, got, strict=True) if not v.startswith(b"VALUE")]
        assert acked and not lost, f"{len(lost)} of {len(acked)} acknowledged writes lost: {err}"
        print(
            f"\nSIGSTOP past the lease: takeover {took * 1e3:.0f} ms after the stop "
            f"(TTL {TTL_MS} ms); {len(acked)} acknowledged writes, none lost; "
            f"{prober.rounds} probes, never two copies"
        )
    finally:
        for p in (prot,):
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
        _kill(prot, recv)
        if writers is not None:
            writers.join()
        if prober is not None:
            prober.join()


@pytest.mark.parametrize("mode", MODES)
def test_primary_host_death_the_secondary_takes_over_under_the_lease(
    hosts: tuple[SimHypervisor, SimHypervisor], etcd: EtcdServer, mode: str
) -> None:
    """The primary host dies (orchestrator and guest SIGKILLed): its lease runs out,
    the secondary takes it and the guest runs there with every acknowledged write."""
    a, b = hosts
    info = a.create_domain("web", memory_mib=8)
    recv, prot, service = _start(a, b, "web", etcd.url, mode)
    writers = None
    try:
        writers = Writers(service, 3)
        time.sleep(0.5)
        t0 = time.monotonic()
        prot.kill()
        prot.wait()
        a.destroy(info.domid)
        out, _ = recv.communicate(timeout=30)
        took = time.monotonic() - t0
        writers.join()
        assert recv.returncode == 0 and "FAILOVER" in out, out
        st = json.loads((b.host / "remus" / "web.json").read_text())
        assert st["state"] == "failed-over" and st["lease"] == "held", st
        acked = sorted(writers.acked)
        got = _read_all(b.lookup("web").address, acked)
        lost = [k for k, v in zip(acked, got, strict=True) if not v.startswith(b"VALUE")]
        assert acked and not lost, f"{len(lost)} of {len(acked)} acknowledged writes lost"
        print(f"\nhost death under a {TTL_MS} ms lease: failover {took * 1e3:.0f} ms")
    finally:
        _kill(prot, recv)
        if writers is not None:
            writers.join()


@pytest.mark.parametrize("mode", MODES)
def test_a_forced_failover_while_the_primary_holds_the_lease_drops_the_secondary(
    hosts: tuple[SimHypervisor, SimHypervisor], etcd: EtcdServer, mode: str
) -> None:
    """`remusctl failover --force` with the primary alive: the secondary takes over only
    under the lease, cannot get it, and drops its copy (in COLO the copy that ran all
    along, whose output must never get out); the primary runs on alone."""
    a, b = hosts
    info = a.create_domain("web", memory_mib=8)
    recv, prot, service = _start(a, b, "web", etcd.url, mode)
    try:
        recv.send_signal(signal.SIGUSR1)  # what `remusctl failover --force` sends
        out, _ = recv.communicate(timeout=30)
        assert recv.returncode == 0 and "FAILOVER" not in out, out
        # the primary either still holds the lease, or has let it go with its mark
        # on the witness that the guest runs there
        assert "our copy is dropped" in out, out
        assert "still holds the lease" in out or "its mark on the witness" in out, out
        assert [d for d in b.list_domains() if d.name == "web"] == []
        prot.communicate(timeout=30)
        assert a.lookup(info.domid).state == "running"
        assert _answers(service)
        st = json.loads((a.host / "remus" / "web.json").read_text())
        assert st["state"] == "unprotected" and st["lease"] != "lost", st
    finally:
        _kill(prot, recv)


def test_the_copy_built_while_the_lease_is_awaited_stays_paused_and_silent(
    hosts: tuple[SimHypervisor, SimHypervisor], etcd: EtcdServer
) -> None:
    """A Remus secondary that lost its primary builds its copy from the last checkpoint
    while it waits for the lease (so that, once the lease is its, the guest only has to
    be unpaused). Until then that copy must not answer anybody; here the primary is
    alive and keeps the lease, so the copy is built, never runs, and is dropped."""
    a, b = hosts
    info = a.create_domain("web", memory_mib=8)
    recv, prot, service = _start(a, b, "web", etcd.url)
    states: set[tuple[str, bool]] = set()  # (state, has a guest that listens)
    answered = 0
    try:
        recv.send_signal(signal.SIGUSR1)  # lost the primary, as far as B knows
        while recv.poll() is None:
            try:
                d = b.lookup("web")
            except Exception:  # not built yet, or already dropped
                time.sleep(0.005)
                continue
            states.add((d.state, bool(d.address)))
            if d.address and _answers(d.address):
                answered += 1
        out = recv.communicate(timeout=30)[0]
        assert "our copy is dropped" in out, out
        # an empty restore target is paused too: built means its guest listens
        assert ("paused", True) in states, f"the copy was never seen built and paused: {states}"
        assert not [s for s in states if s[0] == "running"], states
        assert answered == 0, f"the copy waiting for the lease answered {answered} probes"
        assert [d for d in b.list_domains() if d.name == "web"] == []
        assert a.lookup(info.domid).state == "running" and _answers(service)
    finally:
        _kill(prot, recv)
