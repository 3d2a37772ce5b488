"""COLO replication of one domain: both copies run, checkpoints when they diverge.

The drivers here answer the save/restore helper's COLO callbacks (stream type
COLO; the primary's cbflags are 248, the secondary's 888, protocol notes 1.4
and 3.5) and move the sans-I/O exchange of :mod:`.colo_protocol` along; that
module says how each step maps to QEMU's COLO messages.

Channels: the stream socket carries the forward stream (libxl and libxc
records, CHECKPOINT_STATE NEW) and, in the other direction, the back channel
(CHECKPOINT_STATE SVM_* records from us, CHECKPOINT_DIRTY_PFN_LIST from
libxc), as one TCP connection does for `xl remus --colo`. Both helpers get
the stream fd as their back-channel fd too. We read and write the back
channel only between the helper's own uses of it, one exact record at a
time, so nothing of libxc's is ever read by us. The control channel carries
heartbeats and, beyond Xen, LOADED: an ACK of checkpoint ``seq`` once the
secondary has applied it, with a digest of the secondary's memory, which the
primary compares with its own (``verify_memory``).

The network half (``devices/colo_net.py``) rides on the control channel too:
the client's packets to the primary guest go to the secondary guest (MIRROR),
the secondary guest's TCP output comes back (SVM_OUTPUT) and is compared with
the primary's; matching output leaves at once, a mismatch or output held past
``compare_timeout`` asks for a checkpoint, and a checkpoint releases what its
suspend covered. Checkpoints also come from the timer
(``checkpoint_max_interval``). Not here: COLO disk replication (the secondary
copy writes a disk of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..devices.colo_net import ColoNetPrimary, ColoNetSecondary
from ..devices.netbuf_nfqueue import nfqueue_available
from ..hypervisors.base import DomainInfo, Hypervisor
from ..savehelper import (
    Callbacks,
    HelperFailed,
    HelperSession,
    Mode,
    RestoreArgs,
    SaveArgs,
    StreamType,
)
from ..streams import libxl
from ..streams.libxl import CheckpointState
from ..streams.reader import CheckpointReady, Outcome
from ..transport.control import (
    Ack,
    ConnInfo,
    ControlError,
    Failover,
    Hello,
    Mirror,
    NetSync,
    Shutdown,
    SvmOutput,
)
from .colo_protocol import (
    CheckpointReceived,
    CheckpointSent,
    CheckpointWanted,
    ColoProtocolError,
    DirtyPfnsReceived,
    Event,
    GuestSuspended,
    Loaded,
    Phase,
    PrimaryExchange,
    Reason,
    ReleaseOutput,
    SecondaryExchange,
    SendLoaded,
    StateReceived,
    WriteState,
)
from .remus import Control, RemusSecondary, RemusSettings, _heartbeats, _send_nowait

log = logging.getLogger(__name__)
_REC_HDR = struct.Struct("<II")


@dataclass
class ColoSettings(RemusSettings):
    # at most this long between checkpoints even when the copies agree (QEMU's
    # x-checkpoint-delay; libxl's COLO_PROXY_CHECKPOINT_TIMEOUT is 5 s)
    checkpoint_max_interval: float = 5.0
    # compare a digest of both memories at every checkpoint (costs a hash of
    # the whole memory on both sides: for tests and audits)
    verify_memory: bool = False
    # mirror input and compare output (False: -n, output leaves unchecked)
    compare_output: bool = True
    # output held longer than this for the secondary's asks for a checkpoint
    # (QEMU's colo-compare compare_timeout, 3 s there; here the guests answer
    # in milliseconds, so a slow secondary costs one checkpoint, not 3 s)
    compare_timeout: float = 0.1


@dataclass
class ColoStatus:
    state: str = "starting"
    checkpoints: int = 0
    by_divergence: int = 0
    by_held: int = 0
    by_timer: int = 0
    memory_verified: int = 0  # checkpoints whose memory digests matched
    pause_seconds: list[float] = field(default_factory=list)
    reason: str = ""
    net: dict[str, Any] = field(default_factory=dict)  # the network half's figures


class ColoError(Exception):
    pass


def memory_digest(hv: Hypervisor, domid: int) -> bytes:
    """sha256 of a simulated domain's memory (the backend's memory file)."""
    path = getattr(hv, "memory_path", None)
    if path is None:
        raise ColoError(f"the {hv.name} backend cannot read a domain's memory")
    with open(path(domid), "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"back channel ended inside a record ({len(buf)} of {n} bytes)")
        buf += chunk
    return bytes(buf)


def read_checkpoint_state(sock: socket.socket) -> CheckpointState:
    """One libxl CHECKPOINT_STATE record, read exactly (libxc shares the fd)."""
    rtype, length = _REC_HDR.unpack(_recv_exact(sock, _REC_HDR.size))
    body = _recv_exact(sock, (length + 7) & ~7)
    if rtype != libxl.RecType.CHECKPOINT_STATE or length < 4:
        raise ColoError(f"expected a CHECKPOINT_STATE record, got type {rtype} ({length} bytes)")
    value = struct.unpack_from("<I", body)[0]
    try:
        return CheckpointState(value)
    except ValueError:
        raise ColoError(f"CHECKPOINT_STATE with unknown state {value}") from None


def write_checkpoint_state(sock: socket.socket, state: CheckpointState) -> None:
    sock.sendall(libxl.checkpoint_state_record(state))


class ColoPrimary:
    def __init__(
        self,
        hv: Hypervisor,
        domain: DomainInfo,
        stream: socket.socket,
        control: Control,
        settings: ColoSettings,
    ) -> None:
        self.hv, self.domain, self.stream, self.ctl = hv, domain, stream, control
        self.settings = settings
        self.exchange = PrimaryExchange()
        self.status = ColoStatus()
        self.session: HelperSession | None = None
        self._wanted: asyncio.Queue[Reason] = asyncio.Queue()
        self._loaded: dict[int, asyncio.Future[Ack]] = {}
        self._suspended = False
        self._suspended_at = 0.0
        self._first_suspend = True
        self._digest: bytes | None = None
        self.net: ColoNetPrimary | None = None
        self._comparing = False

    def request_checkpoint(self, reason: Reason = Reason.DIVERGENCE) -> None:
        """The output comparer saw the copies diverge (or anyone wants one now)."""
        if self._wanted.empty():  # one is enough: a checkpoint settles them all
            self._wanted.put_nowait(reason)

    def _comparer_wants(self, reason: str) -> None:
        self.request_checkpoint(Reason.HELD if reason == "held" else Reason.DIVERGENCE)

    def _feed(self, event: Event) -> list[Any]:
        try:
            return self.exchange.receive(event)
        except ColoProtocolError as exc:
            self.status.reason = str(exc)
            raise

    async def _back(self) -> CheckpointState:
        """One CHECKPOINT_STATE from the back channel, within ack_timeout: a
        secondary that stops answering must end COLO, not hang the primary."""
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(read_checkpoint_state, self.stream), self.settings.ack_timeout
            )
        except TimeoutError:
            # the reading thread stays in recv(): breaking the socket releases it
            with contextlib.suppress(OSError):
                self.stream.shutdown(socket.SHUT_RDWR)
            raise ColoError(
                f"no CHECKPOINT_STATE from the secondary in {self.settings.ack_timeout:g} s "
                f"(phase {self.exchange.phase.value})"
            ) from None

    async def _guarded(self, step: Callable[[], Awaitable[int]]) -> int:
        """A callback's body; any failure ends the checkpoint (reply 0: the helper
        stops, and :meth:`run` resumes our copy), never a hang."""
        try:
            return await step()
        except (ColoError, ColoProtocolError, OSError) as exc:
            self.status.reason = self.status.reason or str(exc)
            return 0

    def _loaded_future(self, seq: int) -> asyncio.Future[Ack]:
        fut = self._loaded.get(seq)
        if fut is None:
            fut = self._loaded[seq] = asyncio.get_running_loop().create_future()
        return fut

    # -- helper callbacks (libxc's order: suspend, checkpoint, postcopy, wait_checkpoint)

    async def _suspend(self) -> int:
        return await self._guarded(self._suspend_body)

    async def _suspend_body(self) -> int:
        self._suspended_at = time.perf_counter()
        await self.hv.suspend(self.domain.domid)
        self._suspended = True
        if self.net is not None:
            self.net.suspended(self.exchange.seq)
        self._feed(GuestSuspended())
        if self._first_suspend:  # the live pass: the secondary does not run yet
            self._first_suspend = False
            return 1
        self._feed(StateReceived(await self._back()))  # must be SVM_SUSPENDED
        return 1

    async def _checkpoint(self) -> int:
        return await self._guarded(self._checkpoint_body)

    async def _checkpoint_body(self) -> int:
        if self.exchange.phase is Phase.AWAIT_DIRTY_PFNS:
            # libxc read the secondary's dirty pfns before sending the union
            self._feed(DirtyPfnsReceived())
        if self.settings.verify_memory:  # still suspended: this is what was sent
            self._digest = await asyncio.to_thread(memory_digest, self.hv, self.domain.domid)
        await _send_nowait(self.stream, libxl.CHECKPOINT_END_RECORD)
        self._feed(CheckpointSent())
        return 1

    async def _postcopy(self) -> int:
        return await self._guarded(self._postcopy_body)

    async def _postcopy_body(self) -> int:
        self._feed(StateReceived(await self._back()))  # SVM_READY: it has the checkpoint
        await self.hv.resume(self.domain.domid)
        self._suspended = False
        self.status.pause_seconds.append(time.perf_counter() - self._suspended_at)
        self._feed(StateReceived(await self._back()))  # SVM_RESUMED
        return 1

    async def _wait_checkpoint(self) -> int:
        return await self._guarded(self._wait_checkpoint_body)

    async def _wait_checkpoint_body(self) -> int:
        seq = self.exchange.seq
        try:
            ack = await asyncio.wait_for(self._loaded_future(seq), self.settings.ack_timeout)
        except TimeoutError:
            self.status.reason = f"no LOADED for checkpoint {seq} in {self.settings.ack_timeout} s"
            return 0
        except ConnectionError as exc:
            self.status.reason = str(exc)
            return 0
        for action in self._feed(Loaded(ack.seq)):
            if isinstance(action, ReleaseOutput):
                self._committed(action.seq, ack)
                while not self._wanted.empty():  # asked for before this one: settled
                    self._wanted.get_nowait()
                if self.net is not None:
                    self.net.checkpoint_done(action.seq, first=not self._comparing)
                self._comparing = True
        try:
            reason = await asyncio.wait_for(
                self._wanted.get(), self.settings.checkpoint_max_interval
            )
        except TimeoutError:
            reason = Reason.TIMER
        for action in self._feed(CheckpointWanted(reason)):
            if isinstance(action, WriteState):  # NEW, on the forward stream
                await _send_nowait(self.stream, libxl.checkpoint_state_record(action.state))
        return 1

    def _committed(self, seq: int, ack: Ack) -> None:
        if self._digest is not None:
            if ack.digest != self._digest:
                raise ColoError(
                    f"checkpoint {seq}: the secondary's memory differs from the primary's"
                )
            self.status.memory_verified += 1
        c = self.exchange.counters
        self.status.checkpoints = c.checkpoints
        self.status.by_divergence = c.by_reason[Reason.DIVERGENCE]
        self.status.by_held = c.by_reason[Reason.HELD]
        self.status.by_timer = c.by_reason[Reason.TIMER]
        self.status.state = "replicating"

    async def _control_reader(self) -> None:
        try:
            while True:
                event = await self.ctl.next()
                if isinstance(event, Ack):
                    fut = self._loaded_future(event.seq)
                    if not fut.done():
                        fut.set_result(event)
                elif isinstance(event, SvmOutput):
                    if self.net is not None:
                        self.net.secondary_output(event)
                elif isinstance(event, (Failover, Shutdown)):
                    raise ConnectionError(f"secondary: {event.reason}")
        except (ConnectionError, ControlError) as exc:
            self.status.reason = self.status.reason or str(exc)
            for fut in self._loaded.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(str(exc)))
            if self.session is not None:
                await self.session.abort()

    async def _start_net(self) -> None:
        if not self.settings.compare_output:
            return
        vif = self.hv.vif_name(self.domain.domid)
        why = nfqueue_available()
        if vif is None or why:
            raise ColoError(
                "COLO compares the guest's output on its vif with NFQUEUE: "
                + (why or f"the {self.hv.name} backend gives this domain no vif (needs root)")
                + "; -n runs COLO without comparing (unsafe: output leaves unchecked)"
            )
        self.net = ColoNetPrimary(
            vif, self.ctl.send, self._comparer_wants, self.settings.compare_timeout
        )
        await self.net.setup()

    async def run(self) -> ColoStatus:
        caps = ("ack", "colo") + (("verify-memory",) if self.settings.verify_memory else ())
        if self.settings.compare_output:
            caps += ("colo-net",)
        await self._start_net()
        try:
            return await self._run(caps)
        finally:
            if self.net is not None:
                self.status.net = self.net.figures()
                await self.net.teardown(release=True)

    async def _run(self, caps: tuple[str, ...]) -> ColoStatus:
        await self.ctl.hello(
            Hello(self.domain.uuid, self.domain.config, caps), self.settings.ack_timeout
        )
        await asyncio.to_thread(
            self.stream.sendall, libxl.Header().encode() + libxl.LIBXC_CONTEXT_RECORD
        )
        tasks = [
            asyncio.create_task(self._control_reader()),
            asyncio.create_task(_heartbeats(self.ctl, self.settings.heartbeat_interval)),
            asyncio.create_task(self._watchdog()),
        ]

        async def logdirty(_domid: int, _enable: int) -> int:
            return 0  # no device model in the guests we run

        self.session = HelperSession(
            Mode.SAVE,
            Callbacks(
                suspend=self._suspend,
                postcopy=self._postcopy,
                checkpoint=self._checkpoint,
                wait_checkpoint=self._wait_checkpoint,
                switch_qemu_logdirty=logdirty,
            ),
        )
        dying = False
        try:
            args = SaveArgs(self.domain.domid, self.session.cbflags, StreamType.COLO)
            fd = self.stream.fileno()
            result = await self.session.run(fd, fd, args, extra_env=self.hv.helper_env())
            errors = [r.text for r in result.logs if r.level >= 8]
            if not self.status.reason and errors:
                self.status.reason = f"save helper: {errors[0]}"
        except (HelperFailed, ColoProtocolError, ColoError) as exc:
            self.status.reason = self.status.reason or str(exc)
        except asyncio.CancelledError:
            dying = True  # torn down from outside, like a dead process: no goodbye
            raise
        finally:
            for task in tasks:
                task.cancel()
            if self._suspended and not dying:  # ended mid-checkpoint: ours carries on
                with contextlib.suppress(Exception):
                    await self.hv.resume(self.domain.domid)
        # we carry on: the secondary must drop its copy, not take over (if it is still
        # there to hear it; if not, it is gone anyway)
        with contextlib.suppress(Exception):
            self.ctl.send(Shutdown(f"COLO ended: {self.status.reason or 'stopped'}"))
            await asyncio.wait_for(self.ctl.writer.drain(), 1.0)
        self.status.state = "stopped"
        return self.status

    async def _watchdog(self) -> None:
        """No checkpoint progress in a while (a secondary that stopped reading, so
        the helper blocks writing): end COLO."""
        bound = self.settings.checkpoint_max_interval + 2 * self.settings.ack_timeout
        seen, since = -1, time.monotonic()
        while True:
            await asyncio.sleep(self.settings.ack_timeout / 4)
            if self.status.checkpoints != seen:
                seen, since = self.status.checkpoints, time.monotonic()
            elif time.monotonic() - since > bound and self.session is not None:
                self.status.reason = self.status.reason or f"no checkpoint in {bound:g} s"
                with contextlib.suppress(OSError):
                    self.stream.shutdown(socket.SHUT_RDWR)
                await self.session.abort()
                return


class ColoSecondary(RemusSecondary):
    """The secondary: restores the first checkpoint, then runs its copy and takes
    each later checkpoint into it while it is suspended."""

    def __init__(
        self,
        hv: Hypervisor,
        stream: socket.socket,
        control: Control,
        settings: ColoSettings,
        name: str | None = None,
    ) -> None:
        super().__init__(hv, stream, control, settings, name=name)
        self.colo_settings = settings
        self.exchange = SecondaryExchange()
        self.running = False  # our copy has been started
        self._svm_suspended = False
        self.net: ColoNetSecondary | None = None
        self._forced = False

    def force_failover(self) -> None:
        """As Remus's, and the primary is told at once: it sends no checkpoint while
        its copies agree, so a broken stream alone could go unnoticed there for up
        to ``checkpoint_max_interval``."""
        self._forced = True  # the primary's SHUTDOWN in answer must not drop our copy
        with contextlib.suppress(Exception):
            self.ctl.send(Failover("failover forced by the administrator on the secondary"))
        super().force_failover()

    def _control_event(self, event: object) -> None:
        if self.net is None:
            return
        if isinstance(event, Mirror):
            self.net.mirrored(event)
        elif isinstance(event, ConnInfo):
            self.net.conn_info(event)
        elif isinstance(event, NetSync):
            self.net.net_sync(event)

    async def _checkpoint(self) -> int:
        self.reader.start_checkpoint()
        result = await asyncio.to_thread(self._read_checkpoint_records)
        if isinstance(result, Outcome):
            self.status.reason = result.reason
            return 2  # a broken stream: libxc returns success, and we take over
        if not isinstance(result, CheckpointReady):
            return 0
        self.reader.applied()
        return 1  # libxc applies the checkpoint's memory after this reply

    async def _postcopy(self) -> int:
        assert self.target is not None
        try:
            actions = self.exchange.receive(CheckpointReceived())
            for action in actions:
                if isinstance(action, WriteState):
                    await asyncio.to_thread(write_checkpoint_state, self.stream, action.state)
                    if action.state is CheckpointState.SVM_READY:
                        await self._load_and_run()
                elif isinstance(action, SendLoaded):
                    digest = b""
                    if self.colo_settings.verify_memory:
                        digest = self._loaded_digest
                    self.ctl.send(Ack(action.seq, digest))
                    await self.ctl.writer.drain()
                    self.status.checkpoints = action.seq
                    self.status.state = "replicating"
        except (OSError, ColoProtocolError, ColoError) as exc:
            self.status.reason = self.status.reason or str(exc)
            return 2  # a back-channel write failed: fail over
        return 1

    async def _load_and_run(self) -> None:
        """LoadCheckpoint + ResumeGuest: libxc has written the memory (and vCPU)."""
        assert self.target is not None
        if self.colo_settings.verify_memory:  # before our copy runs again and writes
            self._loaded_digest = await asyncio.to_thread(memory_digest, self.hv, self.target.domid)
        if self.net is not None:
            self.net.loaded(self.exchange.seq)
        if not self.running:
            self.target = await self.hv.finish_restore(self.target.domid)
            self.running = True
        else:
            await self.hv.resume(self.target.domid)
        self._svm_suspended = False

    async def _wait_checkpoint(self) -> int:
        try:
            state = await asyncio.to_thread(read_checkpoint_state, self.stream)
            self.exchange.receive(StateReceived(state))  # must be NEW
        except (OSError, ColoProtocolError, ColoError) as exc:
            self.status.reason = self.status.reason or str(exc)
            return 2
        return 1

    async def _suspend(self) -> int:
        assert self.target is not None
        try:
            await self.hv.suspend(self.target.domid)
            self._svm_suspended = True
            if self.net is not None:
                self.net.suspended()
            for action in self.exchange.receive(GuestSuspended()):
                if isinstance(action, WriteState):  # SVM_SUSPENDED
                    await asyncio.to_thread(write_checkpoint_state, self.stream, action.state)
        except (OSError, ColoProtocolError, ColoError) as exc:
            self.status.reason = self.status.reason or str(exc)
            return 2
        return 1  # libxc now sends our dirty pfns on the back channel

    async def run(self) -> DomainInfo:
        peer = await self.ctl.hello(
            Hello("secondary", {}, ("ack", "colo")), self.settings.ack_timeout
        )
        name = self.name or str(peer.config.get("c_info", {}).get("name", "colo-secondary"))
        # its own disk: the secondary copy runs and writes, and must never write the
        # primary's image (COLO's block replication is not done yet)
        self.target = self.hv.create_restore_target(peer.config, name, replica_disk=True)
        self._loaded_digest = b""
        try:
            if "colo-net" in peer.capabilities:
                await self._start_net(self.target.domid)
            return await self._run()
        except BaseException:
            if not self.running:
                self.hv.destroy(self.target.domid)
            raise
        finally:
            if self.net is not None:  # failover, or the end: our copy's output flows
                await self.net.teardown()

    async def _start_net(self, domid: int) -> None:
        vif, addrs = self.hv.vif_name(domid), self.hv.vif_addresses(domid)
        why = nfqueue_available()
        if vif is None or addrs is None or why:
            raise ColoError(
                "the primary compares output, and this host cannot filter and feed the "
                "secondary copy: " + (why or f"the {self.hv.name} backend gives it no vif")
            )
        self.net = ColoNetSecondary(vif, addrs[0], addrs[1], self.ctl.send)
        await self.net.setup()

    async def _run(self) -> DomainInfo:
        assert self.target is not None
        await asyncio.to_thread(self._read_prelude)
        watch = asyncio.create_task(self._watch_heartbeats())
        dog = asyncio.create_task(self._watchdog())

        async def results(*_args: int) -> int:
            return 0

        session = HelperSession(
            Mode.RESTORE,
            Callbacks(
                static_data_done=results,
                checkpoint=self._checkpoint,
                postcopy=self._postcopy,
                wait_checkpoint=self._wait_checkpoint,
                suspend=self._suspend,
            ),
        )
        args = RestoreArgs(self.target.domid, session.cbflags, StreamType.COLO)
        fd = self.stream.fileno()
        try:
            result = await session.run(fd, fd, args, extra_env=self.hv.helper_env())
        finally:
            watch.cancel()
            dog.cancel()
        if self.unprotected and not self._forced:  # the primary carries on: ours must not
            self.running = False  # so the handler below destroys it
            self.status.state = "stopped"
            raise_unprotected(self.status.reason)
        if not self.running:
            raise ColoError(
                "nothing to fail over to: the first checkpoint never completed"
                + ("" if result.ok else f" (restore helper retval {result.retval})")
            )
        # failover: our copy already runs; if it was suspended mid-checkpoint it
        # resumes from its own last state, which is the last checkpoint plus what
        # it did since (the primary's output after that point never left)
        self.status.state = "failing-over"
        if self.net is not None:  # stop feeding our copy; its output goes out now
            await self.net.teardown()
        if self._svm_suspended:
            await self.hv.resume(self.target.domid)
        self.status.state = "failed-over"
        return self.hv.lookup(self.target.domid)


def raise_unprotected(reason: str) -> None:
    from .remus import Unprotected

    raise Unprotected(reason)
