"""Remus replication of one domain: the primary and the secondary drivers.

The primary spawns the save helper with stream type REMUS and answers its
callbacks as libxl does (``libxl_remus.c``), with one deliberate
difference: ``checkpoint`` writes CHECKPOINT_END and then waits for the
secondary's ACK of that checkpoint before it commits (xl releases output as
soon as CHECKPOINT_END is written). The secondary spawns the restore helper
with stream type REMUS, reads the libxl records of each checkpoint through
libxl's reader phases and ACKs a checkpoint only once it is complete and
applied. When heartbeats stop or the stream breaks it fails over: the
helper finishes from the last complete checkpoint and the guest starts.

Checkpoint devices (output buffers, the disk sender) plug into the primary's
callbacks; the disk's secondary half (:class:`DiskReplica`) plugs into the
secondary's checkpoint callback, which applies a checkpoint's disk blocks
before it ACKs and before libxc applies the checkpoint's memory.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import io
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..devices.base import CheckpointDevice
from ..devices.disk import DiskReplica, DiskReplicaError
from ..hypervisors.base import DomainInfo, Hypervisor
from ..savehelper import (
    Callbacks,
    HelperFailed,
    HelperSession,
    Mode,
    Progress,
    RestoreArgs,
    SaveArgs,
    StreamType,
)
from ..streams import CheckpointReader, CheckpointReply, Layer, Record, StreamDecoder, libxl
from ..streams.decoder import StreamEnd
from ..streams.fileio import iter_events
from ..streams.reader import CheckpointReady, Outcome
from ..transport.control import (
    Ack,
    ControlConnection,
    ControlError,
    DiskWrites,
    Failover,
    Heartbeat,
    Hello,
    Shutdown,
)

log = logging.getLogger(__name__)


@dataclass
class RemusSettings:
    interval: float = 0.2  # seconds between checkpoints (xl remus -i, default 200 ms)
    ack_timeout: float = 5.0
    heartbeat_interval: float = 0.05
    heartbeat_timeout: float = 0.3


# checkpoint pause histogram bounds, seconds (Prometheus `le` values)
PAUSE_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0
)  # fmt: skip
RECENT = 256  # samples kept for medians: a protection runs for months


@dataclass
class RemusStatus:
    state: str = "starting"
    checkpoints: int = 0
    last_checkpoint_at: float = 0.0
    pause_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    ack_lag_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    # pages sent per checkpoint after the first (which carries the whole memory)
    dirty_pages: deque[int] = field(default_factory=lambda: deque(maxlen=RECENT))
    initial_pages: int | None = None
    # cumulative, never trimmed: counts per PAUSE_BUCKETS bound (and +Inf), sum
    pause_counts: list[int] = field(default_factory=lambda: [0] * (len(PAUSE_BUCKETS) + 1))
    pause_sum: float = 0.0
    # epochs (suspend to suspend) and those that took over 1.5 times the interval
    epochs: int = 0
    late_epochs: int = 0
    reason: str = ""

    def record_pause(self, seconds: float) -> None:
        self.pause_seconds.append(seconds)
        self.pause_sum += seconds
        self.pause_counts[bisect.bisect_left(PAUSE_BUCKETS, seconds)] += 1

    def record_pages(self, pages: int) -> None:
        if self.initial_pages is None:
            self.initial_pages = pages
        else:
            self.dirty_pages.append(pages)


class Fence(Protocol):
    """The primary's self-fencing guard (:mod:`.fence`)."""

    def pending(self) -> None: ...
    def arm(self) -> None: ...
    def disarm(self) -> None: ...


class Unprotected(Exception):
    """The primary ended replication on purpose: no failover, the copy is dropped."""


class Control:
    """The control connection's asyncio adapter over the sans-I/O codec."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = ControlConnection()
        self.last_heard = time.monotonic()

    def send(self, event: Any) -> None:
        self.writer.write(self.conn.send(event))

    async def next(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not None:
                self.last_heard = time.monotonic()
                return event
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("control connection closed by the peer")
            self.conn.receive_data(data)

    async def hello(self, ours: Hello, timeout: float) -> Hello:
        self.send(ours)
        await self.writer.drain()
        return await self.receive_hello(timeout)

    async def receive_hello(self, timeout: float) -> Hello:
        """The peer's HELLO; a secondary reads it before answering, to learn what the
        primary asks for (Remus or COLO), and :meth:`hello` then returns the same."""
        peer = getattr(self, "_peer_hello", None)
        if peer is None:
            peer = await asyncio.wait_for(self.next(), timeout)
            assert isinstance(peer, Hello)  # the codec's table allows nothing else first
            self._peer_hello: Hello | None = peer
        return peer

    def close(self) -> None:
        self.writer.close()


async def _heartbeats(ctl: Control, every: float) -> None:
    seq = 0
    while not ctl.writer.is_closing():
        seq += 1
        ctl.send(Heartbeat(seq, time.monotonic_ns()))
        try:
            await ctl.writer.drain()
        except ConnectionError:
            return  # the peer is gone; the control reader reports why
        await asyncio.sleep(every)


def _send_all(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)


async def _send_nowait(sock: socket.socket, data: bytes) -> None:
    """Send on the blocking stream socket without blocking the event loop.

    The socket stays blocking (the helper needs it so); a non-blocking
    attempt first covers the usual case of room in the send buffer, and only
    the rest, if any, waits in a thread.
    """
    try:
        sent = sock.send(data, socket.MSG_DONTWAIT)
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        await asyncio.to_thread(_send_all, sock, data[sent:])


class RemusPrimary:
    def __init__(
        self,
        hv: Hypervisor,
        domain: DomainInfo,
        stream: socket.socket,
        control: Control | None,
        settings: RemusSettings,
        devices: Sequence[CheckpointDevice] = (),
        fence: Fence | None = None,
    ) -> None:
        """``control`` None is `xl remus -b`: the stream goes to a sink, nobody ACKs,
        and each checkpoint commits as soon as it is written (unsafe: debugging and
        measuring the checkpoint cost alone)."""
        self.hv, self.domain = hv, domain
        self.stream, self.ctl, self.settings = stream, control, settings
        self.devices = list(devices)
        self.fence = fence
        self._epoch = 0
        self.status = RemusStatus()
        self.session: HelperSession | None = None
        self._acks: dict[int, asyncio.Future[Ack]] = {}
        self._seq = 0
        self._suspended_at = 0.0
        self._suspended = False
        self._lost = False
        self._progress = time.monotonic()
        self._pages_this_checkpoint = 0

    async def _control_reader(self) -> None:
        assert self.ctl is not None
        try:
            while True:
                event = await self.ctl.next()
                if isinstance(event, Ack):
                    fut = self._acks.pop(event.seq, None)
                    if fut is not None and not fut.done():
                        fut.set_result(event)
                elif isinstance(event, (Failover, Shutdown)):
                    raise ConnectionError(f"secondary: {event.reason}")
        except (ConnectionError, ControlError) as exc:
            self.status.reason = str(exc)
            self._lost = True
            for fut in self._acks.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(str(exc)))
            # the helper may be blocked writing to a peer that is gone: stop it
            if self.session is not None:
                await self.session.abort()

    async def _watchdog(self) -> None:
        """A checkpoint that makes no progress (a stuck link) ends replication."""
        bound = self.settings.interval + 2 * self.settings.ack_timeout
        while True:
            await asyncio.sleep(self.settings.ack_timeout / 4)
            if time.monotonic() - self._progress > bound and self.session is not None:
                self.status.reason = f"no checkpoint progress for {bound:g} s"
                await self.session.abort()
                return

    def _progress_event(self, event: Progress) -> None:
        # libxc reports the pages of each batch it sends as "Frames" progress
        if event.doing_what == "Frames":
            self._pages_this_checkpoint += event.done

    async def _suspend(self) -> int:
        self.status.record_pages(self._pages_this_checkpoint)
        self._pages_this_checkpoint = 0
        now = time.perf_counter()
        if self._suspended_at:
            self.status.epochs += 1
            interval = self.settings.interval
            if interval > 0 and now - self._suspended_at > 1.5 * interval:
                self.status.late_epochs += 1
        self._suspended_at = now
        await self.hv.suspend(self.domain.domid)
        self._suspended = True
        # output from now on belongs to the next epoch; what came before is in
        # the checkpoint being taken, released when its ACK arrives
        self._epoch += 1
        for dev in self.devices:
            await dev.postsuspend(self._epoch)
        return 1

    async def _postcopy(self) -> int:
        for dev in self.devices:
            await dev.preresume()
        await self.hv.resume(self.domain.domid)
        self._suspended = False
        self.status.record_pause(time.perf_counter() - self._suspended_at)
        return 1

    async def _checkpoint(self) -> int:
        if self._lost:
            return 0
        self._seq += 1
        seq = self._seq
        fut: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._acks[seq] = fut
        sent = time.perf_counter()
        if self.fence is not None:  # from here on the secondary may hold a copy
            self.fence.pending()
        try:
            await _send_nowait(self.stream, libxl.CHECKPOINT_END_RECORD)
            if self.ctl is None:  # -b: nobody to wait for
                fut.set_result(Ack(seq, b""))
            await asyncio.wait_for(fut, self.settings.ack_timeout)
        except TimeoutError:
            self.status.reason = f"no ACK for checkpoint {seq} within {self.settings.ack_timeout} s"
            return 0
        except (ConnectionError, OSError) as exc:
            self.status.reason = f"checkpoint {seq}: {exc}"
            return 0
        finally:
            self._acks.pop(seq, None)
            if not fut.done():
                fut.cancel()
        self._progress = time.monotonic()
        if self.fence is not None:  # the secondary now holds a copy it can start
            self.fence.arm()
        self.status.ack_lag_seconds.append(time.perf_counter() - sent)
        self.status.checkpoints = seq
        self.status.last_checkpoint_at = time.time()
        self.status.state = "replicating"
        for dev in self.devices:
            await dev.commit(seq - 1)  # the output produced before checkpoint seq
        # -i is the epoch: "checkpoint every MS milliseconds", as xl's manual has
        # it. libxl waits the whole interval after each checkpoint instead, which
        # stretches every epoch (and the wait of all held output) by the pause and
        # the ACK: on a slow host that halves the checkpoint rate.
        spent = time.perf_counter() - self._suspended_at
        await asyncio.sleep(max(0.0, self.settings.interval - spent))
        return 1

    async def run(self) -> RemusStatus:
        caps = ("ack", "disk") if any(d.name == "disk" for d in self.devices) else ("ack",)
        hello = Hello(self.domain.uuid, self.domain.config, caps)
        tasks = []
        if self.ctl is not None:
            await self.ctl.hello(hello, self.settings.ack_timeout)
            # from the HELLO on: the secondary's watchdog runs from our prelude on,
            # and setting up the devices can take longer than its timeout
            tasks.append(
                asyncio.create_task(_heartbeats(self.ctl, self.settings.heartbeat_interval))
            )
        await asyncio.to_thread(
            _send_all, self.stream, libxl.Header().encode() + libxl.LIBXC_CONTEXT_RECORD
        )
        for dev in self.devices:
            await dev.setup()
        tasks.append(asyncio.create_task(self._watchdog()))
        if self.ctl is not None:
            tasks.append(asyncio.create_task(self._control_reader()))
        self.session = HelperSession(
            Mode.SAVE,
            Callbacks(suspend=self._suspend, postcopy=self._postcopy, checkpoint=self._checkpoint),
            on_progress=self._progress_event,
        )
        try:
            args = SaveArgs(self.domain.domid, self.session.cbflags, StreamType.REMUS)
            result = await self.session.run(
                self.stream.fileno(), -1, args, extra_env=self.hv.helper_env()
            )
            errors = [r.text for r in result.logs if r.level >= 8]
            if not self.status.reason and errors:
                self.status.reason = f"save helper: {errors[0]}"
        except HelperFailed as exc:
            self.status.reason = self.status.reason or str(exc)
        finally:
            for task in tasks:
                task.cancel()
            if self._suspended:  # a failure mid-checkpoint: the guest carries on here
                with contextlib.suppress(Exception):
                    await self.hv.resume(self.domain.domid)
            for dev in self.devices:  # replication is over: the guest's output flows again
                with contextlib.suppress(Exception):
                    await dev.teardown(release=True)
            if self.fence is not None:  # ended on purpose: the domain stays here
                self.fence.disarm()
        self.status.state = "stopped"
        return self.status


class RemusSecondary:
    def __init__(
        self,
        hv: Hypervisor,
        stream: socket.socket,
        control: Control,
        settings: RemusSettings,
        name: str | None = None,
        disk_replica: Callable[[DomainInfo], DiskReplica] | None = None,
        last_input: Callable[[], float] | None = None,
    ) -> None:
        self.hv, self.stream, self.ctl, self.settings = hv, stream, control, settings
        # over -s, control frames queue behind stream data: any byte proves life
        self._last_input = last_input
        self.name = name
        self._make_replica = disk_replica
        self.replica: DiskReplica | None = None
        self.status = RemusStatus()
        self.reader = CheckpointReader()
        self.target: DomainInfo | None = None
        self._broken = False
        self.unprotected = False

    def _read_checkpoint_records(self) -> Outcome | CheckpointReady:
        """libxl's records of one checkpoint, up to CHECKPOINT_END (exact reads)."""
        decoder = StreamDecoder(Layer.LIBXL, records_only=True)
        decoder.in_checkpoint = True  # libxc has just read a CHECKPOINT record
        with io.FileIO(os.dup(self.stream.fileno()), "rb") as f:
            try:
                for event in iter_events(f, decoder, reuse_buffer=False, read_ahead=False):
                    if isinstance(event, StreamEnd):
                        break
                    if isinstance(event, Record):
                        event.decode()
                        out = self.reader.receive(
                            event, event.rtype == libxl.RecType.CHECKPOINT_END
                        )
                        if isinstance(out, CheckpointReady | Outcome):
                            return out
            except Exception as exc:  # a stream error while buffering means failover
                return self.reader.stream_broken(f"stream broke: {exc}")
        return self.reader.stream_broken("stream ended inside a checkpoint")

    def _read_prelude(self) -> None:
        """The libxl header and LIBXC_CONTEXT, after which the fd is the helper's."""
        prelude = StreamDecoder(Layer.LIBXL)
        with io.FileIO(os.dup(self.stream.fileno()), "rb") as f:
            for event in iter_events(f, prelude, reuse_buffer=False, read_ahead=False):
                if isinstance(event, Record) and event.rtype == libxl.RecType.LIBXC_CONTEXT:
                    return
                if isinstance(event, StreamEnd):
                    break
        raise ConnectionError("stream ended before LIBXC_CONTEXT")

    async def _checkpoint(self) -> int:
        self.reader.start_checkpoint()
        result = await asyncio.to_thread(self._read_checkpoint_records)
        if isinstance(result, Outcome):
            self.status.reason = result.reason
            return int(result.reply)
        if not isinstance(result, CheckpointReady):  # Apply outside a checkpoint: not reachable
            return int(CheckpointReply.ERROR)
        digest = hashlib.sha256(b"".join(bytes(r.body) for r in result.records))
        digest.update(result.seq.to_bytes(8, "little"))
        if self.replica is not None:
            # the checkpoint is complete only with its disk blocks: apply them before
            # the ACK, and before libxc applies its memory (on our SUCCESS reply)
            try:
                await self.replica.wait(result.seq, self.settings.ack_timeout)
                if self.replica.pending_blocks(result.seq):
                    digest.update(await asyncio.to_thread(self.replica.apply, result.seq))
                else:  # nothing to write: not worth a thread hop per idle checkpoint
                    digest.update(self.replica.apply(result.seq))
            except (TimeoutError, DiskReplicaError) as exc:
                self.status.reason = (
                    f"checkpoint {result.seq}: disk blocks incomplete "
                    f"({exc or 'not in within ' + str(self.settings.ack_timeout) + ' s'})"
                )
                return int(CheckpointReply.FAILOVER)
        outcome = self.reader.applied()
        self.status.checkpoints = outcome.seq
        self.status.last_checkpoint_at = time.time()
        self.status.state = "replicating"
        self.ctl.send(Ack(outcome.seq, digest.digest()))
        with contextlib.suppress(ConnectionError):
            await self.ctl.writer.drain()
        return int(CheckpointReply.SUCCESS)

    def _control_event(self, event: object) -> None:
        """A control frame the Remus secondary has no use for (COLO's have)."""

    def force_failover(self) -> None:
        """`remusctl failover`: take over from the last complete checkpoint now."""
        self.status.reason = "failover forced by the administrator"
        self._break_stream()

    async def _watch_heartbeats(self) -> None:
        """No word from the primary for heartbeat_timeout: break the stream to fail over."""
        try:
            while True:
                event = await self.ctl.next()
                if isinstance(event, DiskWrites):
                    if self.replica is None:
                        raise ControlError(0, "DISK", "disk replication was not announced")
                    self.replica.receive(event)
                elif isinstance(event, Shutdown):
                    self.unprotected = True
                    self.status.reason = f"primary ended replication: {event.reason}"
                    return
                else:
                    self._control_event(event)
        except (ConnectionError, ControlError, DiskReplicaError) as exc:
            self.status.reason = f"control: {exc}"
        finally:
            self._break_stream()

    def _complete_checkpoints(self) -> int:
        return self.reader.complete

    def _heartbeat_timeout(self) -> float:
        # Until a checkpoint is whole here there is nothing to fail over to, so
        # giving up fast buys nothing and turns one scheduling hiccup on a busy
        # host (spawning the helper, iptables) into a failed start. A primary
        # that dies in the initial copy still shows as EOF on both sockets.
        if self._complete_checkpoints() == 0:
            return max(self.settings.heartbeat_timeout, self.settings.ack_timeout)
        return self.settings.heartbeat_timeout

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            heard = self.ctl.last_heard
            if self._last_input is not None:
                heard = max(heard, self._last_input())
            timeout = self._heartbeat_timeout()
            if time.monotonic() - heard > timeout:
                self.status.reason = f"no heartbeat for {timeout:g} s: primary lost"
                self._break_stream()
                return

    def _break_stream(self) -> None:
        if not self._broken:
            self._broken = True
            with contextlib.suppress(OSError):
                self.stream.shutdown(socket.SHUT_RDWR)
            if self.replica is not None:
                self.replica.abort()

    async def run(self) -> DomainInfo:
        peer = await self.ctl.hello(Hello("secondary", {}, ("ack",)), self.settings.ack_timeout)
        name = self.name or str(peer.config.get("c_info", {}).get("name", "remus-secondary"))
        self.target = self.hv.create_restore_target(peer.config, name, replica_disk=True)
        if "disk" in peer.capabilities and self._make_replica is not None:
            self.replica = self._make_replica(self.target)
        try:
            await asyncio.to_thread(self._read_prelude)
            watch = asyncio.create_task(self._watch_heartbeats())
            dog = asyncio.create_task(self._watchdog())
            session = HelperSession(
                Mode.RESTORE,
                Callbacks(static_data_done=_zero, checkpoint=self._checkpoint),
            )
            args = RestoreArgs(self.target.domid, session.cbflags, StreamType.REMUS)
            try:
                result = await session.run(
                    self.stream.fileno(), -1, args, extra_env=self.hv.helper_env()
                )
            finally:
                watch.cancel()
                dog.cancel()
            if self.unprotected:
                self.status.state = "stopped"
                raise Unprotected(self.status.reason)
            if not result.ok or self.reader.complete == 0:
                raise RuntimeError(
                    "nothing to fail over to: no complete checkpoint"
                    if self.reader.complete == 0
                    else f"restore helper failed: retval {result.retval}"
                )
            if self.replica is not None:
                dropped = self.replica.discard()
                if dropped:
                    log.info(
                        "failover: %d disk blocks of an incomplete checkpoint dropped", dropped
                    )
            self.status.state = "failing-over"
            info = await self.hv.finish_restore(self.target.domid)
            self.status.state = "failed-over"  # only once the guest runs here
            return info
        except BaseException:
            self.hv.destroy(self.target.domid)
            raise


async def _zero(_missing: int) -> int:
    return 0
