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
import logging
import socket
import struct
from collections.abc import Awaitable, Callable

from ..coordination import LeaseKeeper
from ..devices.colo_net import ColoNetPrimary, ColoNetSecondary
from ..devices.netbuf_nfqueue import nfqueue_available
from ..hypervisors.base import Capability, DomainInfo, Hypervisor, HypervisorError
from ..savehelper import Callbacks, HelperSession, Mode, RestoreArgs, StreamType
from ..streams import libxl
from ..streams.libxl import CheckpointState
from ..streams.reader import CheckpointReady, Outcome
from ..transport.control import Ack, ConnInfo, Event, Hello, Mirror, NetSync, SvmOutput
from ..transport.controlio import Control, send_nowait
from .colo_protocol import (
    CheckpointReceived,
    CheckpointSent,
    CheckpointWanted,
    ColoProtocolError,
    DirtyPfnsReceived,
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
from .colo_protocol import Event as ColoEvent
from .remus import RemusSecondary
from .session import DigestMismatch, Primary, ReplicationError, no_results
from .spec import ProtectionSpec
from .status import ColoFigures

log = logging.getLogger(__name__)
_REC_HDR = struct.Struct("<II")


class ColoError(ReplicationError):
    pass


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


def _memory_digest(hv: Hypervisor, domid: int) -> bytes:
    try:
        return hv.memory_digest(domid)
    except HypervisorError as exc:
        raise ColoError(str(exc)) from None


class ColoPrimary(Primary):
    stream_type = StreamType.COLO

    def __init__(
        self,
        hv: Hypervisor,
        domain: DomainInfo,
        stream: socket.socket,
        control: Control,
        spec: ProtectionSpec,
        lease: LeaseKeeper | None = None,
    ) -> None:
        super().__init__(hv, domain, stream, control, spec, lease)
        self.exchange = PrimaryExchange()
        self.colo = ColoFigures(0, 0, 0, 0)
        self._wanted: asyncio.Queue[Reason] = asyncio.Queue(maxsize=1)
        self._loaded: asyncio.Future[Ack] | None = None
        self._first_suspend = True
        self._digest: bytes | None = None
        self.net: ColoNetPrimary | None = None
        self._comparing = False

    def capabilities(self) -> tuple[str, ...]:
        caps: tuple[str, ...] = ("ack", "colo")
        if self.spec.verify_memory:
            caps += ("verify-memory",)
        if not self.spec.no_netbuf:
            caps += ("colo-net",)
        return caps

    def back_channel(self) -> int:
        # both helpers get the stream fd as their back channel too, as one TCP
        # connection does for `xl remus --colo`
        return self.stream.fileno()

    def _progress_bound(self) -> float:
        # no checkpoint for checkpoint_max_interval is normal while the copies agree
        return self.spec.checkpoint_max_interval_s + 2 * self.spec.ack_timeout_s

    def callbacks(self) -> Callbacks:
        async def logdirty(_domid: int, _enable: int) -> int:
            return 0  # no device model in the guests we run

        return Callbacks(
            suspend=self._guarded(self._suspend),
            postcopy=self._guarded(self._postcopy),
            checkpoint=self._guarded(self._checkpoint),
            wait_checkpoint=self._guarded(self._wait_checkpoint),
            switch_qemu_logdirty=logdirty,
        )

    def request_checkpoint(self, reason: Reason = Reason.DIVERGENCE) -> None:
        """The output comparer saw the copies diverge (or anyone wants one now)."""
        with contextlib.suppress(asyncio.QueueFull):  # one is enough: it settles them all
            self._wanted.put_nowait(reason)

    def request_switchover(self, protect_back: str) -> None:
        super().request_switchover(protect_back)
        self.request_checkpoint(Reason.TIMER)  # now, not at the timer: it is the last

    def _comparer_wants(self, reason: str) -> None:
        self.request_checkpoint(Reason.HELD if reason == "held" else Reason.DIVERGENCE)

    def _on_frame(self, event: Event) -> None:
        if isinstance(event, SvmOutput) and self.net is not None:
            self.net.secondary_output(event)

    async def _prepare(self) -> None:
        if self.spec.no_netbuf:
            return
        vif = self.hv.vif_name(self.domain.domid)
        why = nfqueue_available()
        if vif is None or why:
            raise ColoError(
                "COLO compares the guest's output on its vif with NFQUEUE: "
                + (why or f"the {self.hv.name} backend gives this domain no vif (needs root)")
                + "; -n runs COLO without comparing (unsafe: output leaves unchecked)"
            )
        assert self.link.ctl is not None
        self.net = ColoNetPrimary(
            vif,
            self.link.ctl.send,
            self._comparer_wants,
            self.spec.compare_timeout_s,
            may_release=self.may_release,
        )
        await self.net.setup()

    async def _teardown(self, dying: bool) -> None:
        if self.net is not None:
            self._net_figures()
            # fenced: what the comparer held was never covered by a valid lease
            await self.net.teardown(release=not self.fenced)
        if not dying and not self.fenced:
            # we carry on: the secondary must drop its copy, not take over (if it is
            # still there to hear it; if not, it is gone anyway). Fenced, we do not
            # carry on: the secondary may take the lease, and its copy runs already
            self.link.shutdown(f"COLO ended: {self.figures.reason or 'stopped'}")
            await self.link.flush()

    def _net_figures(self) -> None:
        if self.net is not None:
            f = self.net.figures()
            for key, value in f.items():
                if hasattr(self.colo, key):
                    setattr(self.colo, key, value)

    def held_packets(self) -> int | None:
        return int(self.net.figures()["held_packets"]) if self.net is not None else None

    def _feed(self, event: ColoEvent) -> list[object]:
        return list(self.exchange.receive(event))

    async def _back(self) -> CheckpointState:
        """One CHECKPOINT_STATE from the back channel, within ack_timeout: a
        secondary that stops answering must end COLO, not hang the primary."""
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(read_checkpoint_state, self.stream), self.spec.ack_timeout_s
            )
        except TimeoutError:
            # the reading thread stays in recv(): breaking the socket releases it
            with contextlib.suppress(OSError):
                self.stream.shutdown(socket.SHUT_RDWR)
            raise ColoError(
                f"no CHECKPOINT_STATE from the secondary in {self.spec.ack_timeout_s:g} s "
                f"(phase {self.exchange.phase.value})"
            ) from None

    def _guarded(self, step: Callable[[], Awaitable[int]]) -> Callable[[], Awaitable[int]]:
        """A callback's body; any failure ends the checkpoint (reply 0: the helper
        stops, and :meth:`run` resumes our copy), never a hang."""

        async def guarded(*_args: int) -> int:
            try:
                return await step()
            except (ReplicationError, ColoProtocolError, OSError) as exc:
                self.figures.fail(str(exc))
                return 0

        return guarded

    # -- helper callbacks (libxc's order: suspend, checkpoint, postcopy, wait_checkpoint)

    async def _suspend(self) -> int:
        # a switchover asked for: this checkpoint is the last, ours is not resumed
        self.last_epoch = self.switchover is not None and not self._first_suspend
        await self.suspend_guest()
        if self.net is not None:
            self.net.suspended(self.exchange.seq)
        self._feed(GuestSuspended())
        if self._first_suspend:  # the live pass: the secondary does not run yet
            self._first_suspend = False
            return 1
        self._feed(StateReceived(await self._back()))  # must be SVM_SUSPENDED
        return 1

    async def _checkpoint(self) -> int:
        if self.exchange.phase is Phase.AWAIT_DIRTY_PFNS:
            # libxc read the secondary's dirty pfns before sending the union
            self._feed(DirtyPfnsReceived())
        if self.spec.verify_memory:  # still suspended: this is what was sent
            self._digest = await asyncio.to_thread(_memory_digest, self.hv, self.domain.domid)
        # LOADED of this checkpoint may come from now on, and only it
        self._loaded = self.link.expect(self.exchange.seq, self._digest or b"")
        await send_nowait(self.stream, libxl.CHECKPOINT_END_RECORD)
        self._feed(CheckpointSent())
        return 1

    async def _postcopy(self) -> int:
        self._feed(StateReceived(await self._back()))  # SVM_READY: it has the checkpoint
        if not self.last_epoch:  # the last: the secondary's copy runs on alone
            await self.resume_guest()
        self._feed(StateReceived(await self._back()))  # SVM_RESUMED
        return 1

    async def _wait_checkpoint(self) -> int:
        seq = self.exchange.seq
        assert self._loaded is not None
        ack = await self.link.reply(self._loaded, seq, self.spec.ack_timeout_s)
        for action in self._feed(Loaded(ack.seq)):
            if isinstance(action, ReleaseOutput):
                self._committed(action.seq, ack)
                while not self._wanted.empty():  # asked for before this one: settled
                    self._wanted.get_nowait()
                if self.net is not None:
                    self.net.checkpoint_done(action.seq, first=not self._comparing)
                self._comparing = True
        if self.last_epoch:  # our output up to the suspend is out; it runs on there
            await self.hand_over(seq)
            return 0
        try:
            reason = await asyncio.wait_for(self._wanted.get(), self.spec.checkpoint_max_interval_s)
        except TimeoutError:
            reason = Reason.TIMER
        for action in self._feed(CheckpointWanted(reason)):
            if isinstance(action, WriteState):  # NEW, on the forward stream
                await send_nowait(self.stream, libxl.checkpoint_state_record(action.state))
        return 1

    def _committed(self, seq: int, ack: Ack) -> None:
        if self._digest is not None:
            if ack.digest != self._digest:
                raise DigestMismatch(
                    f"checkpoint {seq}: the secondary's memory differs from the primary's"
                )
            assert self.colo.memory_verified is not None
            self.colo.memory_verified += 1
        c = self.exchange.counters
        self.colo.checkpoints_by_divergence = c.by_reason[Reason.DIVERGENCE]
        self.colo.checkpoints_by_held_output = c.by_reason[Reason.HELD]
        self.colo.checkpoints_by_timer = c.by_reason[Reason.TIMER]
        self.watchdog.progress()
        self.figures.checkpoint_done(c.checkpoints)


class ColoSecondary(RemusSecondary):
    """The secondary: restores the first checkpoint, then runs its copy and takes
    each later checkpoint into it while it is suspended."""

    tell_primary_on_force = True

    def __init__(
        self,
        hv: Hypervisor,
        stream: socket.socket,
        control: Control,
        spec: ProtectionSpec,
        name: str | None = None,
    ) -> None:
        super().__init__(hv, stream, control, spec, name=name)
        self.exchange = SecondaryExchange()
        self.colo = ColoFigures()
        self.running = False  # our copy has been started
        self._svm_suspended = False
        self.net: ColoNetSecondary | None = None
        self._verify = False
        self._loaded_digest = b""

    def capabilities(self) -> tuple[str, ...]:
        return ("ack", "colo")

    def complete_checkpoints(self) -> int:
        # our copy runs once the first checkpoint is whole: from then on there is
        # something to fail over to
        return self.reader.complete if self.running else 0

    def _on_frame(self, event: Event) -> None:
        if self.net is None:
            return
        if isinstance(event, Mirror):
            self.net.mirrored(event)
        elif isinstance(event, ConnInfo):
            self.net.conn_info(event)
        elif isinstance(event, NetSync):
            self.net.net_sync(event)

    async def _open(self, peer: Hello) -> DomainInfo:
        if not self.hv.can(Capability.COLO):
            raise ColoError(f"COLO on the {self.hv.name} backend is not supported")
        self._verify = "verify-memory" in peer.capabilities
        name = self.name or str(peer.config.get("c_info", {}).get("name", "colo-secondary"))
        # its own disk: the secondary copy runs and writes, and must never write the
        # primary's image (COLO's block replication is not done yet)
        target = self.hv.create_restore_target(peer.config, name, replica_disk=True)
        if "colo-net" in peer.capabilities:
            try:
                await self._start_net(target.domid)
            except BaseException:
                self.hv.destroy(target.domid)
                raise
        return target

    async def _start_net(self, domid: int) -> None:
        vif, addrs = self.hv.vif_name(domid), self.hv.vif_addresses(domid)
        why = nfqueue_available()
        if vif is None or addrs is None or why:
            raise ColoError(
                "the primary compares output, and this host cannot filter and feed the "
                "secondary copy: " + (why or f"the {self.hv.name} backend gives it no vif")
            )
        self.net = ColoNetSecondary(vif, addrs[0], addrs[1], self.link.ctl.send)
        await self.net.setup()

    async def _restore(self) -> None:
        assert self.target is not None
        await asyncio.to_thread(self._read_prelude)
        self.start_link()
        session = HelperSession(
            Mode.RESTORE,
            Callbacks(
                static_data_done=no_results,
                checkpoint=self._checkpoint,
                postcopy=self._postcopy,
                wait_checkpoint=self._wait_checkpoint,
                suspend=self._suspend,
            ),
        )
        args = RestoreArgs(self.target.domid, session.cbflags, StreamType.COLO)
        fd = self.stream.fileno()
        result = await session.run(fd, fd, args, extra_env=self.hv.helper_env())
        if not self.running and not result.ok:
            self.figures.fail(f"restore helper retval {result.retval}")

    async def _stage(self) -> None:
        # our copy runs already, and all the takeover has left to do lets its
        # output out: none of it before the lease is ours
        return None

    async def _take_over(self) -> DomainInfo:
        assert self.target is not None
        # failover: our copy already runs; if it was suspended mid-checkpoint it
        # resumes from its own last state, which is the last checkpoint plus what
        # it did since (the primary's output after that point never left)
        if self.net is not None:  # stop feeding our copy; its output goes out now
            self._net_figures()
            await self.net.teardown()
        if self._svm_suspended:
            await self.hv.resume(self.target.domid)
        return self.hv.lookup(self.target.domid)

    async def _drop(self) -> None:
        # a copy that may not take over (no lease) goes first: its output would
        # flow the moment the filter below is gone
        if self.target is not None and (not self.running or self.link.unprotected or self.refused):
            with contextlib.suppress(HypervisorError):
                self.hv.destroy(self.target.domid)
        if self.net is not None:
            with contextlib.suppress(Exception):
                await self.net.teardown()

    def _net_figures(self) -> None:
        if self.net is not None:
            for key, value in self.net.figures().items():
                if hasattr(self.colo, key):
                    setattr(self.colo, key, value)

    # -- helper callbacks ------------------------------------------------------------

    async def _checkpoint(self) -> int:
        self.reader.start_checkpoint()
        result = await asyncio.to_thread(self._read_checkpoint_records)
        if isinstance(result, Outcome):
            self.figures.fail(result.reason)
            return 2  # a broken stream: libxc returns success, and we take over
        if not isinstance(result, CheckpointReady):
            return 0
        self.reader.applied()
        return 1  # libxc applies the checkpoint's memory after this reply

    async def _postcopy(self) -> int:
        try:
            for action in self.exchange.receive(CheckpointReceived()):
                if isinstance(action, WriteState):
                    await asyncio.to_thread(write_checkpoint_state, self.stream, action.state)
                    if action.state is CheckpointState.SVM_READY:
                        await self._load_and_run()
                elif isinstance(action, SendLoaded):
                    await self.link.ack(action.seq, self._loaded_digest)
                    self.figures.checkpoint_done(action.seq)
        except (OSError, ColoProtocolError, ReplicationError) as exc:
            self.figures.fail(str(exc))
            return 2  # a back-channel write failed: fail over
        return 1

    async def _load_and_run(self) -> None:
        """LoadCheckpoint + ResumeGuest: libxc has written the memory (and vCPU)."""
        assert self.target is not None
        if self._verify:  # before our copy runs again and writes
            self._loaded_digest = await asyncio.to_thread(
                _memory_digest, self.hv, self.target.domid
            )
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
        except (OSError, ColoProtocolError, ReplicationError) as exc:
            self.figures.fail(str(exc))
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
        except (OSError, ColoProtocolError, ReplicationError) as exc:
            self.figures.fail(str(exc))
            return 2
        return 1  # libxc now sends our dirty pfns on the back channel
