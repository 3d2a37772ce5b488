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

The replication endpoint accepts primaries' connections for every
protection, pairs each stream with its control connection by protection id
and starts a secondary worker with both fds. A PROBE connection is answered
with one HELLO describing this host (pre-flight for the other side).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ..devices.netbuf_nfqueue import nfqueue_available, remove_stale_rules
from ..devices.netbuf_plug import plug_available
from ..hypervisors.base import DomainNotFound, Hypervisor, HypervisorError
from ..protection.fence import marker_path
from ..savehelper.spawn import HelperNotFound, find_helper
from ..transport.channels import (
    CONTROL,
    MAGIC,
    PREAMBLE,
    PROBE,
    STREAM,
    ChannelError,
    parse_addr,
    probe,
)
from ..transport.control import PROTOCOL_VERSION, ControlError, Hello, encode_event
from .config import Config, parse_hostport
from .registry import Mode

log = logging.getLogger(__name__)

POLL: Final = 0.25
WORKER_MODULE: Final = "orchestrator.protection.worker"
LIVE_STATES: Final = ("starting", "replicating", "failing-over")


class ProtectError(Exception):
    """A request the supervisor refuses; ``code`` is the API's error code."""

    def __init__(self, code: str, message: str, reasons: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.code, self.message, self.reasons = code, message, reasons or []


@dataclass
class ProtectRequest:
    name: str
    peer: str
    interval_ms: int = 200
    netbuf: str = "auto"  # auto|plug|nfqueue|proxy
    no_netbuf: bool = False  # -n (COLO: output is not compared)
    no_disk: bool = False  # -d (COLO: ignored, it never replicates the disk)
    unsafe: bool = False  # -F
    mode: Mode = "remus"
    checkpoint_max_interval_s: float = 5.0  # COLO
    compare_timeout_ms: float = 100.0  # COLO

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.mode,
            "interval_ms": self.interval_ms,
            "netbuf": self.netbuf,
            "no_netbuf": self.no_netbuf,
            "no_disk": self.no_disk,
            "unsafe": self.unsafe,
            "disk": "not replicated" if self.no_disk else "replicated",
        }
        if self.mode == "colo":
            # the secondary copy runs and writes a disk of its own: said here so that
            # nobody reads "protected" as "the disk is safe too"
            out.update(
                checkpoint_max_interval_s=self.checkpoint_max_interval_s,
                compare_timeout_ms=self.compare_timeout_ms,
                disk="not replicated",
            )
        return out


@dataclass
class Worker:
    """A running worker process, started by us or found again after a restart."""

    name: str
    role: str
    pid: int
    proc: subprocess.Popen[bytes] | None = None
    last_state: str = ""
    started: float = field(default_factory=time.time)

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
    if stat.rsplit(")", 1)[1].split()[0] == "Z":
        return False
    return WORKER_MODULE.encode() in argv and (name.encode() in argv or b"secondary" in argv)


def _free_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def netbuf_options(hv: Hypervisor, domid: int) -> dict[str, str | None]:
    """Each output-buffer kind and why it cannot be used here (None: it can)."""
    vif = hv.vif_name(domid)
    return {
        "plug": plug_available() if vif else "the guest has no vif (not root)",
        "nfqueue": nfqueue_available() if vif else "the guest has no vif (not root)",
        "proxy": None,
    }


class Supervisor:
    def __init__(
        self,
        cfg: Config,
        registry: Any,
        hv: Hypervisor,
        emit: Callable[[str, str, str | None, dict[str, Any] | None], None],
    ) -> None:
        self.cfg, self.registry, self.hv = cfg, registry, hv
        self.emit = emit  # (kind, message, name, data): into the registry's event log
        self.workers: dict[str, Worker] = {}
        self.status_dir = cfg.workers_dir
        self.status_dir.mkdir(parents=True, exist_ok=True)
        self._listener: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._accepting: set[asyncio.Task[None]] = set()
        self._partial: dict[bytes, dict[int, socket.socket]] = {}
        self._poller: asyncio.Task[None] | None = None
        self._restart_at: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self.failovers = 0
        self.replication_port = 0

    # -- life cycle -------------------------------------------------------------

    async def start(self) -> None:
        await self._start_endpoint()
        for rec in self.registry.list():
            await self._recover(rec)
        self._poller = asyncio.create_task(self._poll_forever())

    async def close(self) -> None:
        """remusd stops; its workers carry on (a restarted remusd re-attaches)."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._acceptor is not None:
            self._acceptor.cancel()
        for task in list(self._accepting):
            task.cancel()
        if self._listener is not None:
            self._listener.close()
        for slot in self._partial.values():
            for s in slot.values():
                s.close()

    async def _recover(self, rec: Any) -> None:
        st = self.read_status(rec.name) or {}
        pid = int(st.get("pid", 0))
        if pid and _worker_pid_alive(pid, rec.name):
            self.workers[rec.name] = Worker(rec.name, rec.role, pid, last_state=st["state"])
            self.emit("restart", f"re-attached to worker {pid}", rec.name, {"pid": pid})
            return
        if rec.role != "primary":
            if rec.last_state in LIVE_STATES:
                self.registry.update_state(rec.name, "stopped", "worker gone while remusd was down")
            return
        self._rescue_domain(rec.name)
        if rec.desired == "protected":
            self.emit(
                "restart", "worker gone while remusd was down: protecting anew", rec.name, None
            )
            await self._spawn_primary(rec.name, rec.peer, rec.settings)

    def _rescue_domain(self, name: str) -> None:
        """A worker that died mid-checkpoint leaves its guest suspended: resume it; and
        its output buffer (NFQUEUE rules with nobody reading the queue) would keep
        every packet the guest sends: drop it."""
        if marker_path(self.status_dir, name).exists():
            # the worker's fence guard stopped this copy: the secondary runs the guest
            # now, and resuming ours would make two
            self.emit("fenced", "domain was fenced by its guard: not resumed", name, None)
            return
        try:
            info = self.hv.lookup(name)
        except DomainNotFound:
            return
        vif = self.hv.vif_name(info.domid)
        if vif is not None:
            remove_stale_rules(vif)
        try:
            if info.state == "shutdown" and info.shutdown_reason == "suspend":
                asyncio.get_running_loop().create_task(self.hv.resume(info.domid))
                self.emit("resumed", "domain was left suspended: resumed", name, None)
            elif info.state == "paused":
                self.hv.unpause(info.domid)
                self.emit("resumed", "domain was left paused: unpaused", name, None)
        except HypervisorError as exc:
            self.emit("error", f"could not resume the domain: {exc}", name, None)

    # -- requests ------------------------------------------------------------------

    async def preflight(self, req: ProtectRequest) -> list[dict[str, str]]:
        """Every reason the domain cannot be protected as asked (empty: it can)."""
        reasons: list[dict[str, str]] = []

        def fail(check: str, message: str) -> None:
            reasons.append({"check": check, "message": message})

        info = None
        try:
            info = self.hv.lookup(req.name)
            if info.state != "running":
                fail("domain_running", f"domain {req.name} is {info.state}, not running")
        except DomainNotFound as exc:
            fail("domain_exists", str(exc))
        colo = req.mode == "colo"
        # COLO replicates no disk whatever -d says, so -d asks for nothing unsafe there
        disk_flag = req.no_disk and not colo
        unsafe = [f for f, on in (("-n", req.no_netbuf), ("-d", disk_flag)) if on]
        if unsafe and not req.unsafe:
            fail("unsafe", f"{' '.join(unsafe)} needs unsafe (-F), as with xl remus")
        try:
            find_helper(self.hv.helper_env())
        except HelperNotFound as exc:
            fail("helper", str(exc))
        if colo:
            self._preflight_colo(req, info, fail)
        elif info is not None and not req.no_netbuf:
            options = netbuf_options(self.hv, info.domid)
            if req.netbuf != "auto" and options.get(req.netbuf):
                fail("netbuf", f"{req.netbuf}: {options[req.netbuf]}")
        try:
            parse_addr(req.peer)
        except ValueError:
            fail("peer_address", f"peer {req.peer!r} is not HOST[:PORT]")
            return reasons
        try:
            peer = await probe(req.peer, timeout=3.0)
        except (OSError, TimeoutError, ChannelError) as exc:
            fail("peer_reachable", f"peer {req.peer}: {exc or type(exc).__name__}")
        except ControlError as exc:
            fail("peer_version", f"peer {req.peer}: {exc}")
        else:
            free = int(peer.config.get("free_memory_bytes", 0))
            if info is not None and free < info.memory_bytes:
                fail(
                    "peer_memory",
                    f"peer has {free >> 20} MiB free, the domain needs {info.memory_bytes >> 20}",
                )
            if req.name in peer.config.get("domains", []):
                fail("peer_name", f"peer already runs a domain named {req.name}")
            if colo and peer.config.get("backend") == "xen":
                fail("colo", f"peer {req.peer} runs Xen, which has no COLO for PV guests")
        return reasons

    def _preflight_colo(
        self, req: ProtectRequest, info: Any, fail: Callable[[str, str], None]
    ) -> None:
        if self.hv.name == "xen":
            fail("colo", "COLO on Xen is not supported (Xen ships COLO for HVM guests only)")
        if info is None or req.no_netbuf:
            return
        # the worker would find this out only after connecting to the peer
        vif = self.hv.vif_name(info.domid)
        why = nfqueue_available() if vif else "the guest has no vif (not root)"
        if why:
            fail(
                "colo_compare",
                f"COLO compares the guest's output with NFQUEUE: {why} "
                "(-n -F runs COLO without comparing: output leaves unchecked)",
            )

    async def protect(self, req: ProtectRequest) -> None:
        if req.name in self.workers and self.workers[req.name].alive():
            raise ProtectError("ALREADY_PROTECTED", f"{req.name} is already protected")
        reasons = await self.preflight(req)
        if reasons:
            unreachable = [r for r in reasons if r["check"] == "peer_reachable"]
            if reasons[0]["check"] == "domain_exists":
                raise ProtectError("DOMAIN_NOT_FOUND", reasons[0]["message"], reasons)
            code = "PEER_UNREACHABLE" if unreachable == reasons else "NOT_PROTECTABLE"
            raise ProtectError(code, "; ".join(r["message"] for r in reasons), reasons)
        self.registry.add_protection(
            name=req.name, role="primary", peer=req.peer, mode=req.mode, settings=req.settings()
        )
        what = " with COLO (the disk is not replicated)" if req.mode == "colo" else ""
        self.emit("protected", f"protecting to {req.peer}{what}", req.name, req.settings())
        await self._spawn_primary(req.name, req.peer, req.settings())

    async def _spawn_primary(self, name: str, peer: str, settings: dict[str, Any]) -> None:
        argv = [
            *self._worker_base(),
            "-i",
            str(settings.get("interval_ms", self.cfg.replication.interval_ms)),
            "primary",
            name,
            "--to",
            peer,
        ]
        if settings.get("mode") == "colo":
            argv += [
                "--colo",
                "--checkpoint-max-interval",
                str(settings.get("checkpoint_max_interval_s", 5.0)),
                "--compare-timeout",
                str(settings.get("compare_timeout_ms", 100.0)),
            ]
            if settings.get("no_netbuf"):
                argv.append("-n")
        else:
            netbuf = "none" if settings.get("no_netbuf") else str(settings.get("netbuf", "auto"))
            argv += ["--netbuf", netbuf]
            if settings.get("no_disk"):
                argv.append("-d")
        # a stale status file must not be read as the new worker's
        self.status_path(name).unlink(missing_ok=True)
        proc = self._popen(argv, name, ())
        self.workers[name] = Worker(name, "primary", proc.pid, proc)
        self.registry.update_state(name, "starting", "")

    def _worker_base(self) -> list[str]:
        host = getattr(self.hv, "host", None)  # the simulated host's directory
        return [
            sys.executable,
            "-m",
            WORKER_MODULE,
            *(["--host", str(host)] if host is not None else []),
            "--backend",
            self.hv.name,
            "--status-dir",
            str(self.status_dir),
            "--heartbeat-timeout",
            str(self.cfg.replication.heartbeat_timeout_ms),
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
        if rec.role != "primary":
            raise ProtectError(
                "WRONG_ROLE", f"{name} is the secondary here: unprotect it on the primary"
            )
        self.registry.set_desired(name, "paused" if keep_record else "unprotected")
        w = self.workers.get(name)
        if w is not None and w.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while w.alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        self._poll_one(name)
        self.workers.pop(name, None)
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
        if rec.role != "primary":
            raise ProtectError("WRONG_ROLE", f"{name} is the secondary here")
        if name in self.workers and self.workers[name].alive():
            raise ProtectError("ALREADY_PROTECTED", f"{name} is replicating")
        self.registry.set_desired(name, "protected")
        self.emit("resumed-replication", "replication resumed (full resynchronisation)", name, None)
        await self._spawn_primary(name, rec.peer, rec.settings)

    def failover(self, name: str, force: bool) -> None:
        rec = self.registry.get(name)
        st = self.read_status(name) or {}
        w = self.workers.get(name)
        if rec.role != "secondary" or w is None or not w.alive():
            raise ProtectError(
                "NOT_SECONDARY", f"{name} has no running secondary here to fail over"
            )
        age = st.get("last_heartbeat_age")
        if age is not None and age < 1.0 and not force:
            raise ProtectError(
                "PRIMARY_ALIVE",
                f"the primary of {name} was heard {age} s ago: two copies would run (force it)",
            )
        os.kill(w.pid, signal.SIGUSR1)
        self.emit("failover-requested", "failover forced by the administrator", name, None)

    # -- status -----------------------------------------------------------------------

    def status_path(self, name: str) -> Path:
        return self.status_dir / f"{name}.json"

    def read_status(self, name: str) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.status_path(name).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return data

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
        # secondaries started by the endpoint name themselves in their status file
        for path in self.status_dir.glob("*.json"):
            name = path.stem
            if name in self.workers:
                continue
            st = self.read_status(name)
            pending = [w for w in self.workers.values() if w.name.startswith("incoming-")]
            for w in pending:
                if st is not None and st.get("pid") == w.pid and st.get("role") == "secondary":
                    del self.workers[w.name]
                    w.name = name
                    self.workers[name] = w
                    self._adopt_secondary(name, st)
                    break

    def _adopt_secondary(self, name: str, st: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            self.registry.remove(name)  # a previous protection of the same domain
        # the secondary learns COLO from the primary's HELLO, so only its worker knows
        mode: Mode = "colo" if st.get("mode") == "colo" else "remus"
        self.registry.add_protection(
            name=name, role="secondary", peer=str(st.get("peer", "")), mode=mode, settings={}
        )
        self.emit("receiving", f"secondary copy started ({mode})", name, None)

    def _poll_one(self, name: str) -> None:
        w = self.workers.get(name)
        if w is None or w.name.startswith("incoming-"):
            if w is not None and not w.alive():
                self.workers.pop(name, None)
            return
        st = self.read_status(name)
        state = str(st["state"]) if st else "starting"
        alive = w.alive()
        if not alive and state in LIVE_STATES:
            state = "error"
            reason = "worker exited unexpectedly"
        else:
            reason = str(st.get("reason", "")) if st else ""
        if state != w.last_state:
            w.last_state = state
            with contextlib.suppress(Exception):
                self.registry.update_state(
                    name, state, reason, st.get("checkpoints") if st else None
                )
            self.emit(f"state-{state}", reason or state, name, None)
            if state == "failed-over":
                self.failovers += 1
            if state == "replicating":
                self._backoff.pop(name, None)
        if not alive:
            self.workers.pop(name, None)
            self._after_exit(name, state, reason)

    def _after_exit(self, name: str, state: str, reason: str) -> None:
        try:
            rec = self.registry.get(name)
        except Exception:
            return
        if rec.role != "primary" or rec.desired != "protected":
            return
        self._rescue_domain(name)
        delay = min(60.0, self._backoff.get(name, 0.5) * 2)
        self._backoff[name] = delay
        self._restart_at[name] = time.monotonic() + delay
        self.emit("retry", f"replication stopped ({reason}); again in {delay:g} s", name, None)

    async def _restart_due(self) -> None:
        now = time.monotonic()
        for name, at in list(self._restart_at.items()):
            if at > now:
                continue
            del self._restart_at[name]
            try:
                rec = self.registry.get(name)
            except Exception:
                continue
            if rec.desired == "protected" and name not in self.workers:
                await self._spawn_primary(name, rec.peer, rec.settings)

    # -- replication endpoint ---------------------------------------------------------

    async def _start_endpoint(self) -> None:
        addr = parse_hostport("replication.listen", self.cfg.replication.listen)
        assert addr is not None
        # a raw listening socket, not asyncio.start_server: a transport starts reading
        # at once, and bytes past the preamble (a primary's HELLO) belong to the worker
        # that inherits the fd, so nothing may read one byte more than the preamble
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        lsock = socket.socket(family, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(addr)
        lsock.listen(128)
        lsock.setblocking(False)
        self._listener = lsock
        self.replication_port = lsock.getsockname()[1]
        self._acceptor = asyncio.create_task(self._accept_forever(lsock))

    async def _accept_forever(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(lsock)
            conn.setblocking(False)
            task = asyncio.create_task(self._accept(conn))
            self._accepting.add(task)
            task.add_done_callback(self._accepting.discard)

    async def _accept(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        raw = b""
        try:
            async with asyncio.timeout(10):
                while len(raw) < PREAMBLE.size:
                    chunk = await loop.sock_recv(conn, PREAMBLE.size - len(raw))
                    if not chunk:
                        raise ConnectionError("closed inside the preamble")
                    raw += chunk
            magic, kind, pid = PREAMBLE.unpack(raw)
        except (OSError, TimeoutError):
            conn.close()
            return
        if magic != MAGIC or kind not in (STREAM, CONTROL, PROBE):
            conn.close()
            return
        conn.setblocking(True)
        if kind == PROBE:
            await asyncio.to_thread(self._answer_probe, conn)
            return
        slot = self._partial.setdefault(pid, {})
        old = slot.pop(kind, None)
        if old is not None:
            old.close()
        slot[kind] = conn
        if STREAM in slot and CONTROL in slot:
            del self._partial[pid]
            self._spawn_secondary(str(uuidlib.UUID(bytes=pid)), slot[STREAM], slot[CONTROL])

    def _answer_probe(self, sock: socket.socket) -> None:
        hello = Hello(
            "probe",
            {
                "free_memory_bytes": _free_memory(),
                "domains": [d.name for d in self.hv.list_domains()],
                "backend": self.hv.name,
            },
            ("ack", "disk"),
            PROTOCOL_VERSION,
        )
        with contextlib.suppress(OSError):
            sock.sendall(encode_event(hello))
        sock.close()

    def _spawn_secondary(self, protection: str, stream: socket.socket, ctl: socket.socket) -> None:
        argv = [
            *self._worker_base(),
            "secondary",
            "--stream-fd",
            str(stream.fileno()),
            "--control-fd",
            str(ctl.fileno()),
        ]
        tag = f"incoming-{protection}"
        proc = self._popen(argv, tag, (stream.fileno(), ctl.fileno()))
        stream.close()
        ctl.close()
        self.workers[tag] = Worker(tag, "secondary", proc.pid, proc)


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])
