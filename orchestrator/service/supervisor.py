"""remusd's protections: worker processes, the replication endpoint, pre-flight, restarts.

Each protection runs in a worker process (``orchestrator.protection.worker``)
in a session of its own, so remusd can crash, restart or be upgraded in the
middle of a checkpoint without touching it: the guest keeps running, the
checkpoint completes, the secondary sees heartbeats throughout. This is a
deliberate step away from the design's "protections run inside remusd";
the worker is still remusd's, and remusd is the only thing that starts one.

The supervisor learns what a worker does from the status file it publishes
every 200 ms (atomic JSON replace) and tells it what to do with signals
(SIGTERM: unprotect; SIGUSR1: fail over). On start it walks the registry:
a worker still alive is re-attached (its pid and command line match); a
primary whose worker is gone is checked first (a domain left suspended or
paused by a worker that died mid-checkpoint is resumed) and then protected
anew if it is meant to be.

A primary under a lease (issue 22) is not resumed that simply: its worker held
the lease, and once it is dead nobody renews it, so the secondary may take the
lease and the guest over. remusd settles the lease on the dead worker's behalf
(``protection/rescue.py``: the guest paused until the witness tells; resumed and
protected anew once remusd holds the lease and nobody took over; destroyed if
another host did), and records what it decided. Without a witness (unsafe) the
guest is resumed as before, and the record and the events say that two copies
may run.

The replication endpoint (``transport/endpoint.py``) pairs each primary's
stream with its control connection and answers PROBEs; each complete pair
becomes a secondary worker holding both fds. What the supervisor knows of the
host below (pre-flight, rescue of a domain whose worker died) it asks of
``protection/host.py``.

A worker gets its settings as one document, ``--spec`` (a
:class:`~orchestrator.protection.spec.ProtectionSpec` in JSON), the same one
the registry keeps and a restart re-spawns from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ..protection.host import (
    Endpoint,
    Hypervisor,
    IncomingPair,
    describe_host,
    link_of,
    preflight,
    rescue_domain,
    sim_host_dir,
)
from ..protection.lease import primary_witness
from ..protection.rescue import (
    FENCED,
    LEASE_GONE,
    LEASE_VALID,
    UNPROTECTED,
    LeaseRescue,
    lease_data,
    redact_url,
)
from ..protection.roles import protect_back_spec, switchover_refusal
from ..protection.session import ReplicationError
from ..protection.spec import Mode, ProtectionSpec, SpecError
from ..protection.status import ProtectionStatus, Role, State, switchover_request
from .config import Config, parse_hostport
from .http import ApiError
from .registry import NotFound, ProtectionRecord, Registry

log = logging.getLogger(__name__)

POLL: Final = 0.25
WORKER_MODULE: Final = "orchestrator.protection.worker"
LIVE_STATES: Final = (State.STARTING.value, State.REPLICATING.value, State.FAILING_OVER.value)
# a secondary worker names itself in its status file once the primary's HELLO said
# which domain it receives; until then the supervisor knows it by this tag
INCOMING: Final = "incoming"
# a secondary heard from its primary this recently may not be failed over unforced
PRIMARY_ALIVE_S: Final = 1.0


# the refusals' error codes and their HTTP status
CODES: Final = {
    "DOMAIN_NOT_FOUND": 404,
    "ALREADY_PROTECTED": 409,
    "PEER_UNREACHABLE": 502,
    "NOT_PROTECTABLE": 422,
    "WRONG_ROLE": 409,
    "NOT_SECONDARY": 409,
    "PRIMARY_ALIVE": 409,
    # a switchover refused: replication or the lease is not in a state to hand over
    "LINK_UNHEALTHY": 409,
    "WITNESS_UNHEALTHY": 409,
    "SWITCHOVER_FAILED": 502,
}
# how long POST .../switchover waits for the worker's end, past the takeover window
SWITCHOVER_WAIT_S: Final = 10.0


class ProtectError(ApiError):
    """A request the supervisor refuses: the API's error of its code, the failed
    checks (if any) in its details."""

    def __init__(self, code: str, message: str, reasons: list[dict[str, str]] | None = None):
        self.reasons = reasons or []
        details = {"reasons": self.reasons} if self.reasons else None
        super().__init__(CODES.get(code, 409), code, message, details)


@dataclass
class Worker:
    """A running worker process, started by us or found again after a restart."""

    name: str
    role: Role
    pid: int
    proc: subprocess.Popen[bytes] | None = None
    last_state: str = ""
    last_lease: str | None = None
    # its last status document seen: once a switchover has made this host the
    # secondary, the file under the guest's name is the new secondary worker's
    final: ProtectionStatus | None = None

    def seen(self, st: ProtectionStatus | None) -> ProtectionStatus | None:
        """``st`` if it is this worker's document, else the last one that was."""
        if st is not None and st.pid == self.pid:
            self.final = st
        return self.final

    async def exited(self, timeout: float, watch: Callable[[], object] | None = None) -> None:
        """Until the process has ended or ``timeout`` passed; ``watch`` on each look."""
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            if watch is not None:
                watch()
            await asyncio.sleep(0.05)

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return _worker_pid_alive(self.pid, self.name)


def _worker_pid_alive(pid: int, name: str) -> bool:
    """The pid is alive *and* is our worker for ``name`` (pids are reused)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] == "Z" or WORKER_MODULE.encode() not in argv:
        return False
    if b"secondary" in argv:  # it names itself only in its status file
        return True
    try:
        spec = ProtectionSpec.from_json(argv[argv.index(b"--spec") + 1].decode())
    except (ValueError, IndexError, SpecError):
        return False
    return spec.name == name


def refusal_code(reasons: list[dict[str, str]]) -> str:
    """The error code of a protect refused for these reasons."""
    if reasons[0]["check"] == "domain_exists":
        return "DOMAIN_NOT_FOUND"
    unreachable = [r for r in reasons if r["check"] == "peer_reachable"]
    return "PEER_UNREACHABLE" if unreachable == reasons else "NOT_PROTECTABLE"


def _reasons(reasons: list[Any]) -> list[dict[str, str]]:
    return [r.to_dict() for r in reasons]


class Supervisor:
    def __init__(
        self,
        cfg: Config,
        registry: Registry,
        hv: Hypervisor,
        emit: Callable[[str, str, str | None, dict[str, Any] | None], None],
    ) -> None:
        self.cfg, self.registry, self.hv = cfg, registry, hv
        self.emit = emit  # (kind, message, name, data): into the registry's event log
        self.workers: dict[str, Worker] = {}
        self.status_dir = cfg.workers_dir
        self.status_dir.mkdir(parents=True, exist_ok=True)
        self._endpoint: Endpoint | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._restart_at: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        # primaries whose worker died under a lease, being rescued by remusd itself
        self.rescues: dict[str, LeaseRescue] = {}
        # protections whose worker exited and was not started again: their status
        # file is the last word of a process that is gone
        self.gone: set[str] = set()

    @property
    def link_mode(self) -> str:
        """The replication link's mode, for status and metrics: tls or plain."""
        return "plain" if self.cfg.replication.insecure else "tls"

    @property
    def replication_port(self) -> int:
        return self._endpoint.port if self._endpoint is not None else 0

    # -- life cycle -------------------------------------------------------------

    async def start(self) -> None:
        addr = parse_hostport("replication.listen", self.cfg.replication.listen)
        assert addr is not None
        self._endpoint = Endpoint(
            addr[0],
            addr[1],
            lambda: describe_host(self.hv),
            link=link_of(self.hv, self.cfg.replication.insecure),
        )
        await self._endpoint.start()
        self._receiver = asyncio.create_task(self._receive_forever(self._endpoint))
        for rec in self.registry.list():
            await self._recover(rec)
        self._poller = asyncio.create_task(self._poll_forever())

    async def close(self) -> None:
        """remusd stops; its workers carry on (a restarted remusd re-attaches). A rescue
        lets its lease go, and so fences the guest if it ran on it: the next remusd
        rescues again, from a paused guest."""
        rescues = list(self.rescues.items())
        for task in (self._poller, self._receiver, *(r.task for _, r in rescues)):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for name, rescue in rescues:
            if rescue.state == UNPROTECTED:
                rescue.pause()
                self.emit(
                    FENCED,
                    "remusd stops while it holds the lease for this guest: paused, the next "
                    "remusd decides again",
                    name,
                    None,
                )
        if self._endpoint is not None:
            await self._endpoint.close()

    async def _recover(self, rec: ProtectionRecord) -> None:
        st = self.read_status(rec.name)
        if st is not None and _worker_pid_alive(st.pid, rec.name):
            self.workers[rec.name] = Worker(
                rec.name, st.role, st.pid, last_state=st.state.value, last_lease=st.lease
            )
            self.emit("restart", f"re-attached to worker {st.pid}", rec.name, {"pid": st.pid})
            return
        self.gone.add(rec.name)
        if rec.role != Role.PRIMARY.value:
            if rec.last_state in LIVE_STATES:
                self.registry.update_state(rec.name, "stopped", "worker gone while remusd was down")
            return
        # no final word from the worker (or a stale "replicating"): it died
        crashed = st is None or st.state.value in LIVE_STATES
        witness = self.witness_of(rec.spec, st)
        fenced = st is not None and st.state is State.FENCED
        if rec.desired == "protected" and rec.spec is not None and witness and (crashed or fenced):
            why = "worker gone while remusd was down"
            self.emit("restart", f"{why}: its lease decides what runs here", rec.name, None)
            self._start_lease_rescue(rec.name, rec.spec, witness, why, st is not None)
            return
        self._rescue_domain(rec.name)
        if rec.desired == "protected" and crashed and st is not None and not witness:
            self._two_copies_possible(rec.name, "worker gone while remusd was down")
        if rec.desired == "protected":
            self.emit(
                "restart", "worker gone while remusd was down: protecting anew", rec.name, None
            )
            await self._spawn_primary(self._spec_of(rec))

    def _rescue_domain(self, name: str) -> None:
        for kind, message in rescue_domain(self.hv, name, self.status_dir):
            self.emit(kind, message, name, None)

    def _spec_of(self, rec: ProtectionRecord) -> ProtectionSpec:
        if rec.spec is None:
            raise ProtectError(
                "NOT_PROTECTABLE",
                f"{rec.name}: its stored settings do not read: unprotect and protect it again",
            )
        return rec.spec

    # -- requests ------------------------------------------------------------------

    async def check(self, spec: ProtectionSpec) -> list[dict[str, str]]:
        """The pre-flight of a protection, as `protect` runs it, acting on nothing."""
        return _reasons(await preflight(self.hv, spec))

    def registered(self, name: str) -> str | None:
        """Why ``name`` cannot be protected anew here for its record (None: it can be,
        because there is none, or because it is the secondary that took the guest over
        and so runs it now: protect back)."""
        try:
            rec = self.registry.get(name)
        except NotFound:
            return None
        if self._protects_back(rec):
            return None
        return f"{name} is already registered here as {rec.role} ({rec.desired})"

    def _protects_back(self, rec: ProtectionRecord) -> bool:
        w = self.workers.get(rec.name)
        return (
            rec.role == Role.SECONDARY.value
            and rec.last_state == State.FAILED_OVER.value
            and (w is None or not w.alive())
        )

    async def protect(self, spec: ProtectionSpec) -> None:
        w = self.workers.get(spec.name)
        st = w.seen(self.read_status(spec.name)) if w is not None else None
        if w is not None and w.role is Role.SECONDARY and st and st.state is State.FAILED_OVER:
            await w.exited(10)  # the guest runs here; its worker lets the lease go, exits
            self._poll_one(spec.name)
        if spec.name in self.workers and self.workers[spec.name].alive():
            raise ProtectError("ALREADY_PROTECTED", f"{spec.name} is already protected")
        taken = self.registered(spec.name)
        if taken is not None:
            raise ProtectError("ALREADY_PROTECTED", taken)
        if spec.name in self.rescues:
            raise ProtectError(
                "ALREADY_PROTECTED",
                f"remusd holds {spec.name}'s lease until its old secondary has dropped its "
                "copy: protect it again then",
            )
        reasons = await self.check(spec)
        if reasons:
            code = refusal_code(reasons)
            raise ProtectError(code, "; ".join(r["message"] for r in reasons), reasons)
        try:
            rec = self.registry.get(spec.name)
        except NotFound:
            self.registry.add_protection(
                name=spec.name, role="primary", peer=spec.target, mode=spec.mode.value, spec=spec
            )
        else:  # registered() let it through: the survivor of a failover protects back
            self._become_primary(rec, spec, "protected back after a failover")
        what = " with COLO (the disk is not replicated)" if spec.mode is Mode.COLO else ""
        self.emit("protected", f"protecting to {spec.target}{what}", spec.name, spec.to_dict())
        await self._spawn_primary(spec)

    def _become_primary(self, rec: ProtectionRecord, spec: ProtectionSpec, why: str) -> None:
        """The secondary's record becomes the primary's: the guest runs here now (a
        failover, or a switchover), and is protected back to ``spec.peer``."""
        self.registry.remove(rec.name)
        self.registry.add_protection(
            name=rec.name,
            role="primary",
            peer=spec.peer,
            mode=spec.mode.value,
            spec=spec,
            reason=why,
        )
        self.gone.discard(rec.name)
        self.emit(
            "role-changed",
            f"now the primary ({why}): protecting back to {spec.peer}",
            rec.name,
            {"role": Role.PRIMARY.value, "was": rec.role, "peer": spec.peer},
        )

    async def _spawn_primary(self, spec: ProtectionSpec) -> None:
        argv = [*self._worker_base(), "primary", "--spec", spec.to_json()]
        # a stale status file must not be read as the new worker's
        self.status_path(spec.name).unlink(missing_ok=True)
        proc = self._popen(argv, spec.name, ())
        self.workers[spec.name] = Worker(spec.name, Role.PRIMARY, proc.pid, proc)
        self.gone.discard(spec.name)
        self.registry.update_state(spec.name, "starting", "")

    def _worker_base(self) -> list[str]:
        host = sim_host_dir(self.hv)
        return [
            sys.executable,
            "-m",
            WORKER_MODULE,
            *(["--host", str(host)] if host is not None else []),
            "--backend",
            self.hv.name,
            "--status-dir",
            str(self.status_dir),
        ]

    def _popen(self, argv: list[str], tag: str, fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
        with open(self.status_dir / f"{tag}.log", "ab") as logf:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                pass_fds=fds,
                start_new_session=True,  # not ours to kill when remusd dies
                env={**os.environ, "PYTHONPATH": _package_root()},
            )

    async def unprotect(self, name: str, keep_record: bool = False) -> None:
        rec = self.registry.get(name)
        if rec.role != Role.PRIMARY.value:
            raise ProtectError(
                "WRONG_ROLE", f"{name} is the secondary here: unprotect it on the primary"
            )
        self.registry.set_desired(name, "paused" if keep_record else "unprotected")
        # a rescue not yet decided leaves the guest paused: the secondary may run it
        held_back = await self._end_rescue(name)
        w = self.workers.get(name)
        if w is not None and w.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, signal.SIGTERM)
            await w.exited(15)
        self._poll_one(name)
        self.workers.pop(name, None)
        # no restart is due for a protection ended on purpose
        self._backoff.pop(name, None)
        self._restart_at.pop(name, None)
        st = self.read_status(name)
        if held_back or (st is not None and st.state is State.FENCED):
            # fenced: the lease could not be confirmed, and the other copy may run;
            # resuming ours would make two
            self.emit(
                "left-paused",
                "ended while fenced: the guest stays paused here (unpause it only once "
                "the other copy is known to be gone, else destroy it)",
                name,
                None,
            )
        else:
            self._rescue_domain(name)
        if keep_record:
            self.registry.update_state(name, "paused", "replication paused by the administrator")
            self.emit("paused", "replication paused", name, None)
        else:
            self.registry.remove(name)
            self.status_path(name).unlink(missing_ok=True)
            self.emit("unprotected", "replication ended; the domain runs here", name, None)

    async def resume(self, name: str) -> None:
        rec = self.registry.get(name)
        if rec.role != Role.PRIMARY.value:
            raise ProtectError("WRONG_ROLE", f"{name} is the secondary here")
        if name in self.workers and self.workers[name].alive():
            raise ProtectError("ALREADY_PROTECTED", f"{name} is replicating")
        if name in self.rescues:
            raise ProtectError(
                "ALREADY_PROTECTED",
                f"{name}'s worker died and remusd is settling its lease "
                f"({self.rescues[name].state}): it protects it anew itself",
            )
        spec = self._spec_of(rec)
        self.registry.set_desired(name, "protected")
        self.emit("resumed-replication", "replication resumed (full resynchronisation)", name, None)
        await self._spawn_primary(spec)

    async def switchover(self, name: str) -> ProtectionStatus:
        """A planned swap of roles: the primary's worker takes a last checkpoint, waits
        for its ACK with the guest suspended and its output released, lets the lease
        go; the secondary takes over from that checkpoint, and its host protects the
        guest back here. Refused unless replication and the lease are healthy; answers
        once the worker has ended (its final status), or with why it did not hand over.
        """
        rec = self.registry.get(name)
        if rec.role != Role.PRIMARY.value:
            raise ProtectError(
                "WRONG_ROLE", f"{name} is the secondary here: switch over on its primary"
            )
        spec = self._spec_of(rec)
        w, st = self.workers.get(name), self.read_status(name)
        if w is None or not w.alive() or st is None:
            raise ProtectError("LINK_UNHEALTHY", f"{name} is {rec.last_state}, not replicating")
        refusal = switchover_refusal(spec, st)
        if refusal is not None:
            raise ProtectError(*refusal)
        host = parse_hostport("replication.listen", self.cfg.replication.listen)
        assert host is not None
        back = protect_back_spec(
            spec, host[0], self.replication_port, self.cfg.replication.insecure
        )
        switchover_request(self.status_dir, name).write_text(back.to_json())
        os.kill(w.pid, signal.SIGUSR2)
        self.emit(
            "switchover-requested",
            f"switching over to {spec.target}, then protected back to {back.peer}",
            name,
            None,
        )
        await w.exited(
            spec.interval_s + spec.ack_timeout_s + spec.takeover_window_s + SWITCHOVER_WAIT_S,
            lambda: w.seen(self.read_status(name)),
        )
        final = w.seen(self.read_status(name))  # its last word, before the peer's
        self._poll_one(name)
        if final is None or final.state is not State.SWITCHED_OVER:
            said = final.reason if final is not None else "the worker said nothing"
            raise ProtectError("SWITCHOVER_FAILED", f"{name} did not switch over: {said}")
        return final

    def failover(self, name: str, force: bool) -> None:
        rec = self.registry.get(name)
        st = self.read_status(name)
        w = self.workers.get(name)
        if rec.role != Role.SECONDARY.value or w is None or not w.alive():
            raise ProtectError(
                "NOT_SECONDARY", f"{name} has no running secondary here to fail over"
            )
        age = st.last_heartbeat_age_s if st is not None else None
        if age is not None and age < PRIMARY_ALIVE_S and not force:
            raise ProtectError(
                "PRIMARY_ALIVE",
                f"the primary of {name} was heard {age:.3g} s ago: two copies would run (force it)",
            )
        os.kill(w.pid, signal.SIGUSR1)
        self.emit("failover-requested", "failover forced by the administrator", name, None)

    # -- status -----------------------------------------------------------------------

    def status_path(self, name: str) -> Path:
        return self.status_dir / f"{name}.json"

    def read_status(self, name: str) -> ProtectionStatus | None:
        return ProtectionStatus.read(self.status_path(name))

    async def _poll_forever(self) -> None:
        while True:
            try:
                self._poll_all()
                await self._restart_due()
            except Exception:  # one bad status file must not stop supervision
                log.exception("supervisor poll")
            await asyncio.sleep(POLL)

    def _poll_all(self) -> None:
        for name in list(self.workers):
            self._poll_one(name)
        pending = [w for w in self.workers.values() if w.name.startswith(f"{INCOMING}-")]
        if not pending:
            return
        # secondaries started by the endpoint name themselves in their status file
        for path in self.status_dir.glob("*.json"):
            name = path.stem
            if name in self.workers:
                continue
            st = ProtectionStatus.read(path)
            if st is None or st.role is not Role.SECONDARY:
                continue
            for w in pending:
                if st.pid == w.pid:
                    del self.workers[w.name]
                    w.name = name
                    self.workers[name] = w
                    pending.remove(w)
                    self._adopt_secondary(name, st)
                    break

    def _adopt_secondary(self, name: str, st: ProtectionStatus) -> None:
        with contextlib.suppress(NotFound):
            was = self.registry.get(name)
            self.registry.remove(name)  # a previous protection of the same domain
            if was.role == Role.PRIMARY.value:  # protected back here, or switched over
                self.emit(
                    "role-changed",
                    f"now the secondary of {st.peer or 'the peer'} (this host was the primary)",
                    name,
                    {"role": Role.SECONDARY.value, "was": was.role, "peer": st.peer},
                )
        self.gone.discard(name)
        # the secondary learns COLO from the primary's HELLO, so only its worker knows
        self.registry.add_protection(
            name=name, role="secondary", peer=st.peer, mode=st.mode.value, spec=None
        )
        self.emit("receiving", f"secondary copy started ({st.mode.value})", name, None)

    def _poll_one(self, name: str) -> None:
        w = self.workers.get(name)
        if w is None or w.name.startswith(f"{INCOMING}-"):
            if w is not None and not w.alive():
                self.workers.pop(name, None)
            return
        st = w.seen(self.read_status(name))
        state = st.state.value if st is not None else State.STARTING.value
        alive = w.alive()
        if not alive and state in LIVE_STATES:
            state = "error"
            reason = "worker exited unexpectedly"
        else:
            reason = st.reason if st is not None else ""
        if st is not None:
            self._lease_events(w, st)
        if state != w.last_state:
            w.last_state = state
            with contextlib.suppress(Exception):
                self.registry.update_state(
                    name, state, reason, st.checkpoints if st is not None else None
                )
            self.emit(f"state-{state}", reason or state, name, None)
            if state == State.REPLICATING.value:
                self._backoff.pop(name, None)
            if st is not None and state in (FENCED, UNPROTECTED):
                self._state_event(name, st)
        if not alive:
            self.workers.pop(name, None)
            self.gone.add(name)
            self._after_exit(name, state, reason, st)

    def _lease_events(self, w: Worker, st: ProtectionStatus) -> None:
        """A worker's lease lost or run out: an event of its own (the fence follows)."""
        before, w.last_lease = w.last_lease, st.lease
        if st.lease in LEASE_GONE and before in LEASE_VALID:
            self.emit(
                "lease-lost",
                f"the lease on {redact_url(st.witness)} is {st.lease} (it was {before}): "
                "this copy may not run or release output",
                w.name,
                lease_data(st.witness, st.lease, st.lease_valid_for_s),
            )

    def _state_event(self, name: str, st: ProtectionStatus) -> None:
        data = lease_data(st.witness, st.lease, st.lease_valid_for_s)
        if st.state is State.FENCED:
            said = st.reason if st.reason.startswith(FENCED) else f"{FENCED}: {st.reason}"
            self.emit(FENCED, said, name, data)
        elif st.witness:
            self.emit(
                "running-unprotected",
                f"replication ended ({st.reason}); holding the lease on "
                f"{redact_url(st.witness)}, the guest runs on here with nothing replicating "
                "it until remusd protects it again",
                name,
                data,
            )
        else:
            self.emit(
                "running-unprotected",
                f"replication ended ({st.reason}); the guest runs on here with nothing "
                "replicating it, and no witness (unsafe): the secondary may run it too",
                name,
                data,
            )

    def _after_exit(self, name: str, state: str, reason: str, st: ProtectionStatus | None) -> None:
        try:
            rec = self.registry.get(name)
        except NotFound:
            return
        if st is not None and self._roles_swapped(rec, st):
            return
        if rec.role != Role.PRIMARY.value or rec.desired != "protected":
            return
        crashed = state == "error"
        witness = self.witness_of(rec.spec, st)
        if witness and rec.spec is not None and (crashed or state == FENCED):
            # the worker held the lease and can no longer renew it, or it ended fenced:
            # what runs here is the lease's to say, not a resume's
            why = "worker exited unexpectedly" if crashed else f"worker ended fenced ({reason})"
            self._start_lease_rescue(name, rec.spec, witness, why, st is not None)
            return
        self._rescue_domain(name)
        if not witness and st is not None and (crashed or st.checkpoints > 0):
            self._two_copies_possible(name, reason)
        self._retry_later(name, reason)

    def _roles_swapped(self, rec: ProtectionRecord, st: ProtectionStatus) -> bool:
        """A switchover's end on either side. The old primary's copy is gone: nothing
        is restarted here, and the peer's protection back makes this host its
        secondary. The secondary runs the guest now: its host becomes the primary and
        protects the guest back with the document the old primary sent."""
        if rec.role == Role.PRIMARY.value and st.state is State.SWITCHED_OVER:
            self.registry.set_desired(rec.name, "unprotected")
            self.emit(
                "switched-over",
                f"{st.reason}; this host becomes its secondary",
                rec.name,
                {"peer": rec.peer, "pause_ms": st.switchover_pause_ms},
            )
            return True
        if rec.role != Role.SECONDARY.value or st.state is not State.FAILED_OVER:
            return False
        if not st.protect_back:
            return False
        try:
            back = ProtectionSpec.from_json(st.protect_back)
        except SpecError as exc:
            self.emit("error", f"the switchover's protect-back settings do not read: {exc}",
                      rec.name, None)  # fmt: skip
            return True
        self._become_primary(rec, back, f"switchover from {st.peer or back.peer}")
        self._restart_at[rec.name] = time.monotonic()  # spawned by _restart_due
        return True

    def _retry_later(self, name: str, reason: str) -> None:
        delay = min(60.0, self._backoff.get(name, 0.5) * 2)
        self._backoff[name] = delay
        self._restart_at[name] = time.monotonic() + delay
        self.emit("retry", f"replication stopped ({reason}); again in {delay:g} s", name, None)

    def _two_copies_possible(self, name: str, reason: str) -> None:
        """No witness (unsafe): the guest runs on here, and the secondary, which may
        hold a checkpoint, takes over on heartbeats alone. Say so where it is read."""
        why = (
            f"{reason}; no witness (unsafe): the guest runs on here, and the secondary "
            "takes over on heartbeats alone: two copies may run"
        )
        with contextlib.suppress(NotFound):
            self.registry.update_state(name, self.registry.get(name).last_state, why)
        self.emit("two-copies-possible", why, name, None)

    async def _restart_due(self) -> None:
        now = time.monotonic()
        for name, at in list(self._restart_at.items()):
            if at > now:
                continue
            del self._restart_at[name]
            try:
                rec = self.registry.get(name)
            except NotFound:
                continue
            if rec.desired == "protected" and name not in self.workers and name not in self.rescues:
                try:
                    spec = self._spec_of(rec)
                except ProtectError as exc:
                    self.emit("error", exc.message, name, None)
                    continue
                await self._spawn_primary(spec)

    # -- a dead primary under a lease --------------------------------------------------

    def witness_of(self, spec: ProtectionSpec | None, st: ProtectionStatus | None) -> str:
        """The witness a protection runs under ("" for none): its worker's word, else
        what its settings come to on this backend (a primary's default witness is the
        backend's own)."""
        if st is not None and st.witness:
            return st.witness
        if spec is None:
            return ""
        try:
            return primary_witness(spec, self.hv).witness
        except ReplicationError:  # it cannot protect at all: its worker says why
            return ""

    def _start_lease_rescue(
        self, name: str, spec: ProtectionSpec, witness: str, why: str, replicated: bool
    ) -> None:
        """``replicated``: the worker got as far as publishing its status (and so maybe
        to a checkpoint the secondary holds); one that never did is only checked."""
        if name in self.rescues:
            return
        self._restart_at.pop(name, None)

        def record(state: str, reason: str) -> None:
            with contextlib.suppress(NotFound):
                self.registry.update_state(name, state, reason)

        def give_up() -> None:  # nothing to protect from here: the record says why
            with contextlib.suppress(NotFound):
                self.registry.set_desired(name, "unprotected")

        rescue = LeaseRescue(
            name,
            spec,
            witness,
            self.hv,
            self.status_dir,
            record=record,
            emit=lambda kind, message, data: self.emit(kind, message, name, data),
            give_up=give_up,
            recorded=self.registry.get(name).last_state,
            replicated=replicated,
        )
        self.rescues[name] = rescue
        rescue.task = asyncio.get_running_loop().create_task(
            self._lease_rescue(rescue, why), name=f"lease-rescue-{name}"
        )

    async def _end_rescue(self, name: str) -> bool:
        """Unprotect or pause during a rescue: True if it had not decided, so the guest
        stays paused. One that runs the guest here under its lease holds it on until
        the secondary has dropped its copy (nobody told that one to), and does not
        protect again."""
        rescue = self.rescues.get(name)
        if rescue is None or rescue.task is None or rescue.state == UNPROTECTED:
            return False
        rescue.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rescue.task
        return rescue.state == FENCED

    async def _lease_rescue(self, rescue: LeaseRescue, why: str) -> None:
        name = rescue.name
        try:
            respawn = await rescue.run(why)
        finally:
            if self.rescues.get(name) is rescue:
                del self.rescues[name]
        with contextlib.suppress(NotFound):
            if not respawn or self.registry.get(name).desired != "protected":
                return
            if name in self.workers:
                return
            if rescue.replicated:  # the hold was the wait
                self.emit("retry", f"{why}; protecting anew (the lease let go)", name, None)
                await self._spawn_primary(rescue.spec)
            else:
                self._retry_later(name, why)

    # -- what the API and the metrics show -----------------------------------------

    def worker_gone(self, name: str) -> bool:
        """The protection's worker exited (or died) and none runs now: its status file
        is a dead process's last word, and the record speaks instead."""
        return name in self.gone or name in self.rescues

    def lease_view(
        self, rec: ProtectionRecord, st: ProtectionStatus | None
    ) -> dict[str, Any] | None:
        """The lease as this host holds it (None without a witness): its state, how long
        it stays valid (inf: a file witness's lock, held until its holder dies; None: not
        held), and who holds it here (the worker, remusd rescuing a dead worker's guest,
        or nobody)."""
        rescue = self.rescues.get(rec.name)
        if rescue is not None:
            return {
                "url": redact_url(rescue.witness),
                "lease": rescue.lease,
                "lease_valid_for_s": rescue.valid_for_s(),
                "holder": "remusd" if rescue.lease in LEASE_VALID else None,
            }
        witness = self.witness_of(rec.spec, st)
        if not witness:
            return None
        if st is None or st.lease is None or self.worker_gone(rec.name):
            return {"url": redact_url(witness), "lease": None, "lease_valid_for_s": None,
                    "holder": None}  # fmt: skip
        valid = st.lease_valid_for_s
        if valid is None and st.lease in LEASE_VALID:
            valid = math.inf
        return {
            "url": redact_url(witness),
            "lease": st.lease,
            "lease_valid_for_s": valid,
            "holder": "worker" if st.lease in LEASE_VALID else None,
        }

    # -- the receiving side ------------------------------------------------------------

    async def _receive_forever(self, endpoint: Endpoint) -> None:
        while True:
            pair = await endpoint.next_pair()
            try:
                self._spawn_secondary(pair)
            except Exception:  # one failed spawn must not stop the endpoint
                log.exception("starting a secondary for protection %s", pair.protection)
            finally:
                pair.close()  # the worker holds its own copies of both fds

    def _secondary_spec(self) -> ProtectionSpec:
        """The secondary's own settings: this host's timeouts; the rest comes in the
        primary's HELLO."""
        return self.cfg.spec_defaults(INCOMING)

    def _spawn_secondary(self, pair: IncomingPair) -> None:
        stream, ctl = pair.stream.fileno(), pair.control.fileno()
        argv = [
            *self._worker_base(),
            "secondary",
            "--stream-fd",
            str(stream),
            "--control-fd",
            str(ctl),
            "--spec",
            self._secondary_spec().to_json(),
        ]
        tag = f"{INCOMING}-{pair.protection}"
        proc = self._popen(argv, tag, (stream, ctl))
        self.workers[tag] = Worker(tag, Role.SECONDARY, proc.pid, proc)


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])
