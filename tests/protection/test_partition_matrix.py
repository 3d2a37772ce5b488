"""The partition matrix (issue 22): a protection under a lease as the cluster comes apart.

Hosts A and B each in a network namespace of their own (``tests/hostlab.py``),
the replication link a veth pair between them, each reaching the witness (a
real etcd) over its own uplink. Real processes: `remusctl protect --foreground`
on A, `remusctl receive` on B, both under a 1 s lease. Clients on A's side
write keys and count a write as acknowledged only once its OK came back; a
prober asks both copies, each from its own host's side and from a thread of
its own, every few milliseconds whether they answer (one copy's silence, a
probe waiting out its timeout, must not delay the other's probes: a sequential
round put up to 0.2 s of A's silence into the time B was seen standing).

Each case, for Remus and for COLO, ``REMUS_MATRIX_RUNS`` times (default 2).
Every run must end with

* no two answers, one from each copy, within 0.2 s of each other;
* no acknowledged write missing from the copy that stands;
* exactly one copy standing, the one the case calls for, and the status JSON
  of both sides saying which (``failed-over`` on a secondary that took over,
  ``fenced`` on the primary it took over from; the primary ``replicating``,
  ``stopped`` or ``unprotected`` and the secondary ``stopped`` when no
  takeover is right).

Timings are printed, never asserted: for each run, how long after the fault
the standing copy answered for good, against the bound the lease rules give
(the TTL plus the heartbeat timeout, plus the secondary's takeover window
where the primary runs on: ``ProtectionSpec.takeover_window_s``; counted from
the witness's return when the witness itself was gone, since no copy may
stand while nobody can renew a lease), and how
many writes were acknowledged and probes made. Run with ``-s`` to see them,
and ``REMUS_MATRIX_RUNS=10`` for the figures to quote.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final

import pytest

from orchestrator.devices.netbuf_nfqueue import nfqueue_available
from orchestrator.hypervisors.base import DomainNotFound
from orchestrator.hypervisors.sim import SimHypervisor
from orchestrator.protection.spec import ProtectionSpec

from ..hostlab import PORTS, Direction, Host, HostLab, poll, unavailable, wait_exit

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(unavailable() is not None, reason=f"host lab: {unavailable()}"),
]

RUNS: Final = int(os.environ.get("REMUS_MATRIX_RUNS", "2"))
TTL_MS: Final = 1000
HEARTBEAT_TIMEOUT_MS: Final = 300  # the default
ACK_TIMEOUT_MS: Final = 1000  # a fifth of the default: a cut link ends replication sooner
SPEC: Final = ProtectionSpec(
    name="matrix",
    lease_ttl_ms=TTL_MS,
    heartbeat_timeout_ms=HEARTBEAT_TIMEOUT_MS,
    ack_timeout_ms=ACK_TIMEOUT_MS,
)
# a decision (takeover, drop, fence) is due within a few seconds; this only keeps a
# hung process from hanging the suite
DECIDE_TIMEOUT: Final = 30.0
WRITERS: Final = 3


STARTS: Final = 3  # tries at starting a run's protection (see NotStarted)


class NotStarted(AssertionError):
    """A run's protection never got going: on a loaded 2-core machine a 1 s lease can
    miss its renewals before the first checkpoint (the primary then fences and takes
    the lease back, safely). That is not an outcome the matrix measures, so the run
    is started again, and the restarts are printed."""


# -- clients ---------------------------------------------------------------------------


class Writers:
    """Clients on ``host``'s side writing keys over persistent connections; a key
    counts as acknowledged only once its OK came back."""

    def __init__(self, lab: HostLab, host: Host, address: str, n: int) -> None:
        self.lab, self.host, self.address = lab, host, address
        self.acked: dict[str, float] = {}  # key -> when its OK came back (monotonic)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(c,)) for c in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, c: int) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                with self.lab.connect(self.host, self.address, 1.0) as s:
                    f = s.makefile("rwb")
                    while not self.stop.is_set():
                        key = f"w{c}-{i}"
                        i += 1
                        f.write(f"PUT {key} {i}\n".encode())
                        f.flush()
                        if not f.readline().startswith(b"OK"):
                            break
                        self.acked[key] = time.monotonic()
            except OSError:
                time.sleep(0.05)

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def answers(lab: HostLab, host: Host, address: str, timeout: float = 0.2) -> bool:
    """The copy at ``address`` answers a read from ``host``'s side within ``timeout``
    (held output is silence; a gone guest is unreachable)."""
    try:
        with lab.connect(host, address, timeout) as s:
            s.sendall(b"GET probe\n")
            return s.recv(64) != b""
    except OSError:
        return False


def read_all(lab: HostLab, host: Host, address: str, keys: list[str]) -> list[bytes]:
    with lab.connect(host, address, 10.0) as s:
        f = s.makefile("rwb")
        f.write(b"".join(f"GET {k}\n".encode() for k in keys))
        f.flush()
        return [f.readline().rstrip(b"\n") for _ in keys]


def running_address(hv: SimHypervisor, name: str) -> str | None:
    """The service address of ``name`` on ``hv`` if its guest runs there."""
    try:
        d = hv.lookup(name)
    except DomainNotFound:
        return None
    return d.address if d.state == "running" and d.address else None


class Prober:
    """Asks each copy, from its own host's side, over and over, whether it answers.

    One thread per copy, so that one copy's silence (a probe that waits out its
    timeout) never delays the other's probes or their times. Every probe is kept
    as (when it ended, whether the copy answered). Two answers, one from each
    copy, less than ``AT_ONCE`` apart count as two copies answering at once."""

    AT_ONCE: Final = 0.2  # a probe's own timeout: what one sequential round spanned

    def __init__(self, lab: HostLab, name: str, primary: str) -> None:
        self.lab, self.name, self.primary = lab, name, primary
        self.b = SimHypervisor(lab.b.host)  # the B thread's own handle
        self.seen: dict[Host, list[tuple[float, bool]]] = {"a": [], "b": []}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(h,)) for h in ("a", "b")]
        for t in self.threads:
            t.start()

    def _run(self, host: Host) -> None:
        while not self.stop.is_set():
            if host == "a":
                ok = answers(self.lab, "a", self.primary)
            else:
                address = running_address(self.b, self.name)
                ok = address is not None and answers(self.lab, "b", address)
            self.seen[host].append((time.monotonic(), ok))
            time.sleep(0.01)

    @property
    def probes(self) -> int:
        return len(self.seen["a"]) + len(self.seen["b"])

    def together(self) -> list[float]:
        """When B answered with an answer of A's less than AT_ONCE before or after."""
        a_ok = [t for t, ok in self.seen["a"] if ok]
        out = []
        for t, ok in self.seen["b"]:
            if ok:
                i = bisect.bisect_left(a_ok, t - self.AT_ONCE)
                if i < len(a_ok) and a_ok[i] <= t + self.AT_ONCE:
                    out.append(t)
        return out

    @property
    def both(self) -> int:
        return len(self.together())

    def stood_from(self, host: Host, t0: float, until: float) -> float | None:
        """Seconds after ``t0`` from which ``host``'s copy answered at every probe up to
        ``until``; None if it did not answer at the last one."""
        after = [(t, ok) for t, ok in self.seen[host] if t0 <= t <= until]
        if not after or not after[-1][1]:
            return None
        start = after[-1][0]
        for t, ok in reversed(after):
            if not ok:
                break
            start = t
        return start - t0

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


# -- one run ---------------------------------------------------------------------------


@dataclass
class Run:
    """One protection of one fresh domain, from start to the outcome."""

    lab: HostLab
    mode: str
    name: str
    logs: Path
    recv: subprocess.Popen[bytes] | None = None
    prot: subprocess.Popen[bytes] | None = None
    service: str = ""
    writers: Writers | None = None
    prober: Prober | None = None
    t0: float = 0.0
    healed: float | None = None  # when a fault that no copy can outlast ended
    decided: float | None = None  # when the outcome was in (default: the case's end)
    done: dict[Host, float] = field(default_factory=dict)  # when each process exited
    problems: list[str] = field(default_factory=list)

    def proc(self, host: Host) -> subprocess.Popen[bytes]:
        proc = self.prot if host == "a" else self.recv
        assert proc is not None
        return proc

    def log(self, host: Host) -> Path:
        return self.logs / ("protect.log" if host == "a" else "receive.log")

    def output(self, host: Host) -> str:
        with contextlib.suppress(OSError):
            return self.log(host).read_text(errors="replace")
        return ""

    def status(self, host: Host) -> dict[str, Any]:
        path = self.lab.hv(host).state_dir() / f"{self.name}.json"
        with contextlib.suppress(OSError, ValueError):
            row: dict[str, Any] = json.loads(path.read_text())
            return row
        return {}

    def fault(self) -> None:
        """The fault happens now."""
        self.t0 = time.monotonic()

    def wait_exit(self, host: Host) -> bool:
        """Wait for ``host``'s process to decide and end (a problem if it does not)."""
        if wait_exit(self.proc(host), DECIDE_TIMEOUT):
            self.done.setdefault(host, time.monotonic() - self.t0)
            return True
        self.problems.append(
            f"{'protect on A' if host == 'a' else 'receive on B'} still runs "
            f"{DECIDE_TIMEOUT:g} s after the fault: {self.status(host)}"
        )
        return False

    def start(self) -> None:
        lab = self.lab
        low, high = PORTS["a"]  # a port outside B's own local ports
        port = low + int.from_bytes(os.urandom(2), "little") % (high - low)
        settings = [
            "--lease-ttl", str(TTL_MS),
            "--ack-timeout", str(ACK_TIMEOUT_MS),
            "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_MS),
        ]  # fmt: skip
        peer = f"{lab.link_address('b')}:{port}"
        self.recv = lab.popen(
            "b", "receive", "--listen", peer, "--witness", lab.witness("b"), *settings,
            log=self.log("b"),
        )  # fmt: skip
        if not poll(lambda: "receiving on" in self.output("b") or self.recv_ended(), 30):
            raise NotStarted("remusctl receive did not start")
        if self.recv_ended():
            raise NotStarted(f"remusctl receive failed: {self.output('b')[-2000:]}")
        args = ["protect", self.name, "--foreground", "--to", peer,
                "--witness", lab.witness("a"), *settings]  # fmt: skip
        if self.mode == "colo":
            args += ["--colo", "--checkpoint-max-interval", "500"]
        else:
            args += ["-i", "50"]
        self.prot = lab.popen("a", *args, log=self.log("a"))
        need = 3 if self.mode == "remus" else 1
        started = poll(
            lambda: (
                int(self.status("a").get("checkpoints") or 0) >= need
                or self.prot is None
                or self.prot.poll() is not None
            ),
            60,
        )
        row = self.status("a")
        if not started or self.prot.poll() is not None:
            raise NotStarted(
                f"the protection did not start (status {row}): "
                f"protect: {self.output('a')[-2000:]} receive: {self.output('b')[-1000:]}"
            )
        if row.get("lease") != "held" or row.get("witness") != lab.witness("a"):
            raise NotStarted(f"the primary does not hold the lease on its witness: {row}")
        self.service = str(row.get("service_address") or lab.a.lookup(self.name).address)

    def recv_ended(self) -> bool:
        return self.recv is not None and self.recv.poll() is not None

    def stop_clients(self) -> None:
        if self.writers is not None:
            self.writers.join()
        if self.prober is not None:
            self.prober.join()


# -- the cases: each makes its fault and waits for the outcome to be decided ----------------


def _cut_link(direction: Direction) -> Callable[[Run], None]:
    def fault(r: Run) -> None:
        r.lab.cut_link(direction)
        r.fault()
        r.wait_exit("b")  # the secondary cannot take the lease: it drops its copy
        r.wait_exit("a")  # the primary ends replication, holds on through the window
        r.lab.heal_link()

    return fault


def _sigstop_primary(r: Run) -> None:
    r.proc("a").send_signal(signal.SIGSTOP)
    r.fault()
    r.wait_exit("b")  # stopped past the lease: the secondary takes over
    r.proc("a").send_signal(signal.SIGCONT)
    r.wait_exit("a")  # no validity left: fenced, never released


def _primary_loses_witness(r: Run) -> None:
    r.lab.cut_witness("a")
    r.fault()
    r.wait_exit("b")
    r.lab.heal_witness("a")
    r.wait_exit("a")


def _secondary_loses_witness(r: Run) -> None:
    """Nothing to decide: the primary replicates on. Three TTLs cut off, healed,
    one TTL more, then unprotected (the secondary drops its copy)."""
    r.lab.cut_witness("b")
    r.fault()
    before = int(r.status("a").get("checkpoints") or 0)
    time.sleep(3 * SPEC.lease_ttl_s)
    row = r.status("a")
    if r.proc("a").poll() is not None or r.proc("b").poll() is not None:
        r.problems.append(f"replication ended while only the secondary lost the witness: {row}")
    elif row.get("state") != "replicating" or int(row.get("checkpoints") or 0) <= before:
        r.problems.append(f"the primary stopped checkpointing (from {before}): {row}")
    r.lab.heal_witness("b")
    time.sleep(SPEC.lease_ttl_s)
    r.decided = time.monotonic()  # what follows is the end of the protection
    r.proc("a").send_signal(signal.SIGTERM)  # remusctl unprotect
    r.wait_exit("a")
    r.wait_exit("b")


def _etcd_restart(r: Run) -> None:
    """Both sides lose the witness for longer than the secondary's takeover window."""
    etcd = r.lab.etcd
    assert etcd is not None
    etcd.kill()
    r.fault()
    time.sleep(SPEC.takeover_window_s + 1.0)
    etcd.start()
    r.healed = time.monotonic()
    r.wait_exit("b")
    r.wait_exit("a")


def _healed_after_takeover(r: Run) -> None:
    """A cut off from B and the witness: B takes over and exits; then A comes back."""
    r.lab.cut_link("both")
    r.lab.cut_witness("a")
    r.fault()
    r.wait_exit("b")
    r.lab.heal()
    r.wait_exit("a")  # it must learn of the takeover and drop its copy


def _primary_host_dies(r: Run) -> None:
    r.lab.kill_host("a")  # silently: no FIN, no RST, no word to the witness
    r.fault()
    r.wait_exit("b")
    r.done.setdefault("a", 0.0)


@dataclass(frozen=True)
class Case:
    fault: Callable[[Run], None]
    survivors: tuple[Host, ...]  # whose copy may stand at the end
    window: bool = False  # the bound counts the secondary's takeover window
    a_destroyed: bool = False  # the stale primary's copy must be gone, not only paused
    a_dead: bool = False  # the primary's host died: its status file is stale
    # no copy may stand while the fault lasts (the witness itself is gone: a primary
    # that cannot renew must fence), so the bound counts from its end
    from_heal: bool = False


CASES: Final[dict[str, Case]] = {
    "link-cut-both-ways": Case(_cut_link("both"), ("a",), window=True),
    "link-cut-a-to-b": Case(_cut_link("a->b"), ("a",), window=True),
    "link-cut-b-to-a": Case(_cut_link("b->a"), ("a",), window=True),
    "primary-sigstop-past-the-lease": Case(_sigstop_primary, ("b",)),
    "primary-loses-the-witness": Case(_primary_loses_witness, ("b",)),
    "secondary-loses-the-witness": Case(_secondary_loses_witness, ("a",)),
    # whichever copy stands, exactly one: the secondary if the witness came back in
    # its window, else the primary once it can take the lease back
    "etcd-killed-and-restarted": Case(_etcd_restart, ("a", "b"), from_heal=True),
    "partition-healed-after-takeover": Case(_healed_after_takeover, ("b",), a_destroyed=True),
    "primary-host-dies": Case(_primary_host_dies, ("b",), a_dead=True),
}


def _bound(case: Case) -> float:
    bound = SPEC.lease_ttl_s + SPEC.heartbeat_timeout_s
    return bound + (SPEC.takeover_window_s if case.window else 0.0)


def _domain_state(hv: SimHypervisor, name: str) -> str:
    try:
        return hv.lookup(name).state
    except DomainNotFound:
        return "gone"


def _standing(lab: HostLab, r: Run) -> list[Host]:
    """The copies that answer now (each asked for up to a second)."""
    out: list[Host] = []
    copies: list[tuple[Host, str | None]] = [
        ("a", r.service),
        ("b", running_address(lab.b, r.name)),
    ]
    for host, address in copies:
        if address is not None and poll(partial(answers, lab, host, address), 1.0):
            out.append(host)
    return out


def _gap(writers: Writers, key: str) -> str:
    """How long after the same client's previous acknowledgement this one came."""
    client, i = key.rsplit("-", 1)
    before = writers.acked.get(f"{client}-{int(i) - 1}")
    return "" if before is None else f" ({writers.acked[key] - before:.3f} s after its previous)"


def _check(r: Run, case: Case) -> dict[str, Any]:
    """The outcome of a run: its figures, or problems added to ``r.problems``."""
    lab = r.lab
    standing = _standing(lab, r)
    r.stop_clients()
    assert r.writers is not None and r.prober is not None
    st_a, st_b = r.status("a"), r.status("b")
    dom_a = _domain_state(lab.a, r.name)
    if len(standing) != 1 or standing[0] not in case.survivors:
        r.problems.append(
            f"copies standing: {standing or 'none'} (expected exactly one of "
            f"{list(case.survivors)}); A's domain {dom_a}"
        )
    if r.prober.both:
        at = [t - r.t0 for t in r.prober.together()]
        r.problems.append(
            f"two copies answered at once {r.prober.both} times in {r.prober.probes} probes, from "
            f"{at[0]:+.3f} s to {at[-1]:+.3f} s after the fault"
        )
    survivor = standing[0] if len(standing) == 1 else None
    if survivor == "b":
        if st_b.get("state") != "failed-over" or st_b.get("lease") != "held":
            r.problems.append(
                f"B stands, but its status is not failed-over under the lease: {st_b}"
            )
        if not case.a_dead and st_a.get("state") != "fenced":
            r.problems.append(f"B took over, but A's status is not fenced: {st_a}")
        if dom_a == "running":
            r.problems.append("B took over, and A's guest still runs")
        if case.a_destroyed and dom_a != "gone":
            r.problems.append(f"the stale primary kept its copy ({dom_a}): {st_a.get('reason')}")
    elif survivor == "a":
        if st_a.get("state") not in ("replicating", "stopped", "unprotected"):
            r.problems.append(f"A stands, but its status says {st_a}")
        if st_b.get("state") == "failed-over":
            r.problems.append(f"A stands, and B's status says it took over: {st_b}")
    lost: list[str] = []
    acked = sorted(r.writers.acked)
    if survivor is not None:
        address = r.service if survivor == "a" else running_address(lab.b, r.name)
        assert address is not None
        try:
            got = read_all(lab, survivor, address, acked)
            lost = [k for k, v in zip(acked, got, strict=True) if not v.startswith(b"VALUE")]
        except OSError as exc:
            r.problems.append(
                f"the acknowledged writes could not be read back from {survivor}: {exc}"
            )
        if lost:
            when = ", ".join(
                f"{k} +{r.writers.acked[k] - r.t0:.3f} s" + _gap(r.writers, k) for k in lost[:5]
            )
            last = max(r.writers.acked.values()) - r.t0
            r.problems.append(
                f"{len(lost)} of {len(acked)} acknowledged writes lost: {when} after the "
                f"fault (the last acknowledgement came +{last:.3f} s after it)"
            )
    if not acked:
        r.problems.append("no write was acknowledged: the run measured nothing")
    if r.problems:
        r.problems.append(f"A status: {st_a}")
        r.problems.append(f"B status: {st_b}")
        r.problems.append(f"protect on A said: {r.output('a')[-1500:]}")
        r.problems.append(f"receive on B said: {r.output('b')[-1500:]}")
    until = r.decided or time.monotonic()
    since = r.healed if case.from_heal and r.healed is not None else r.t0
    stood = r.prober.stood_from(survivor, since, until) if survivor is not None else None
    return {
        "survivor": survivor,
        "stood": stood,
        "done": dict(r.done),
        "acked": len(acked),
        "lost": len(lost),
        "probes": r.prober.probes,
        "both": r.prober.both,
    }


# -- the matrix ------------------------------------------------------------------------


_counter = iter(range(1_000_000))


def _one_run(lab: HostLab, mode: str, case_name: str, logs: Path) -> tuple[Run, dict[str, Any]]:
    case = CASES[case_name]
    name = f"vm{next(_counter)}"
    logs.mkdir(parents=True, exist_ok=True)
    r = Run(lab, mode, name, logs)
    try:
        lab.a.create_domain(name, memory_mib=8)
        r.start()
        r.writers = Writers(lab, "a", r.service, WRITERS)
        r.prober = Prober(lab, name, r.service)
        time.sleep(1.0)  # writes acknowledged before the fault
        case.fault(r)
        return r, _check(r, case)
    finally:
        r.stop_clients()
        lab.reset()


def _fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


@pytest.mark.timeout(120 + 120 * RUNS)
@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("mode", ["remus", "colo"])
def test_partition(hostlab: HostLab, mode: str, case_name: str, tmp_path: Path) -> None:
    if mode == "colo" and nfqueue_available() is not None:
        pytest.skip(f"COLO compares output with NFQUEUE: {nfqueue_available()}")
    case = CASES[case_name]
    failures: list[str] = []
    figures: list[dict[str, Any]] = []
    for run in range(RUNS):
        for attempt in range(STARTS):
            try:
                r, fig = _one_run(hostlab, mode, case_name, tmp_path / f"run{run}.{attempt}")
                break
            except NotStarted as exc:
                print(f"\n[{mode} {case_name} #{run}] did not start: {str(exc)[:300]}")
        else:
            failures.append(f"run {run}: did not start in {STARTS} tries")
            continue
        figures.append(fig)
        done = ", ".join(f"{h.upper()} ended {_fmt(t)}" for h, t in sorted(fig["done"].items()))
        print(
            f"\n[{mode} {case_name} #{run}] stands: {str(fig['survivor']).upper()} from "
            f"{_fmt(fig['stood'])} after the {'heal' if case.from_heal else 'fault'} "
            f"(bound {_bound(case):.2f} s); {done}; "
            f"{fig['acked']} writes acknowledged, {fig['lost']} lost; {fig['probes']} probes, "
            f"{fig['both']} with two copies"
        )
        if r.problems:
            failures.append(f"run {run}:\n  " + "\n  ".join(r.problems))
    stood = [f["stood"] for f in figures if f["stood"] is not None]
    print(
        f"\n[{mode} {case_name}] {len(figures)} of {RUNS} runs: "
        f"{RUNS - len(failures)} as required; stands after the "
        f"{'heal' if case.from_heal else 'fault'}: median "
        f"{_fmt(statistics.median(stood) if stood else None)}, max "
        f"{_fmt(max(stood) if stood else None)} (bound {_bound(case):.2f} s); "
        f"{sum(f['acked'] for f in figures)} writes acknowledged, "
        f"{sum(f['lost'] for f in figures)} lost; {sum(f['probes'] for f in figures)} probes, "
        f"{sum(f['both'] for f in figures)} with two copies"
    )
    assert not failures, f"{mode} {case_name}: " + "\n".join(failures)
