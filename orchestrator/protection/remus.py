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
import io
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from ..coordination import LeaseKeeper
from ..devices.base import CheckpointDevice
from ..devices.disk import DiskReplica, DiskReplicaError
from ..hypervisors.base import DomainInfo, Hypervisor
from ..savehelper import Callbacks, HelperSession, Mode, RestoreArgs, StreamType
from ..streams import CheckpointReader, CheckpointReply, Layer, Record, StreamDecoder, libxl
from ..streams.decoder import StreamEnd
from ..streams.fileio import iter_events
from ..streams.reader import CheckpointReady, Outcome
from ..transport.control import DiskWrites, Event, Hello
from ..transport.controlio import Control, send_nowait
from .session import (
    DigestMismatch,
    Primary,
    ReplicationError,
    Secondary,
    ack_digest,
    no_results,
)
from .spec import ProtectionSpec

log = logging.getLogger(__name__)


class Fence(Protocol):
    """The primary's self-fencing guard (:mod:`.fence`): what the driver calls."""

    def pending(self) -> None: ...
    def arm(self) -> None: ...
    def disarm(self) -> None: ...


class RemusPrimary(Primary):
    stream_type = StreamType.REMUS

    def __init__(
        self,
        hv: Hypervisor,
        domain: DomainInfo,
        stream: socket.socket,
        control: Control | None,
        spec: ProtectionSpec,
        devices: Sequence[CheckpointDevice] = (),
        fence: Fence | None = None,
        lease: LeaseKeeper | None = None,
    ) -> None:
        """``control`` None is `xl remus -b`: the stream goes to a sink, nobody ACKs,
        and each checkpoint commits as soon as it is written (unsafe: debugging and
        measuring the checkpoint cost alone)."""
        super().__init__(hv, domain, stream, control, spec, lease)
        self.devices = list(devices)
        self.fence = fence
        self._epoch = 0
        self._pages_this_checkpoint = 0
        self._epoch_started = 0.0

    def capabilities(self) -> tuple[str, ...]:
        # a device that the secondary has a half of says so (the disk: "disk")
        return ("ack", *(d.capability for d in self.devices if d.capability))

    def callbacks(self) -> Callbacks:
        return Callbacks(
            suspend=self._suspend, postcopy=self._postcopy, checkpoint=self._checkpoint
        )

    def _progress_event(self, doing: str, done: int) -> None:
        # libxc reports the pages of each batch it sends as "Frames" progress
        if doing == "Frames":
            self._pages_this_checkpoint += done

    async def _setup(self) -> None:
        for dev in self.devices:
            await dev.setup()

    async def _teardown(self, dying: bool) -> None:
        # replication is over: the guest's output flows again, unless we are fenced
        # (then what is held was never covered by a lease and goes nowhere)
        for dev in self.devices:
            try:
                await dev.teardown(release=not self.fenced)
            except Exception as exc:  # the others must still be released
                log.warning("%s teardown: %s", dev.name, exc)
        if self.fence is not None:  # ended on purpose: the domain stays here
            self.fence.disarm()

    # -- helper callbacks (libxc's order: suspend, postcopy, checkpoint) --------------

    async def _suspend(self) -> int:
        self.figures.record_pages(self._pages_this_checkpoint)
        self._pages_this_checkpoint = 0
        now = time.perf_counter()
        if self._epoch_started:
            self.figures.epochs += 1
            if self.spec.interval_s > 0 and now - self._epoch_started > 1.5 * self.spec.interval_s:
                self.figures.late_epochs += 1
        self._epoch_started = now
        # a switchover asked for: this suspend ends the last epoch (the guest runs on
        # from it on the secondary)
        self.last_epoch = self.switchover is not None
        await self.suspend_guest()
        # output from now on belongs to the next epoch; what came before is in
        # the checkpoint being taken, released when its ACK arrives
        self._epoch += 1
        for dev in self.devices:
            await dev.postsuspend(self._epoch)
        return 1

    async def _postcopy(self) -> int:
        if self.last_epoch:  # not resumed here: the secondary resumes it
            return 1
        for dev in self.devices:
            await dev.preresume()
        await self.resume_guest()
        return 1

    async def _checkpoint(self) -> int:
        if self.link.lost is not None:
            return 0
        seq = self.next_seq()
        # the devices' part of what the secondary applies (the disk's blocks)
        parts = [d for d in (dev.digest(seq) for dev in self.devices) if d is not None]
        expected = ack_digest(seq, b"".join(parts) if parts else None)
        fut = self.link.expect(seq, expected)
        sent = time.perf_counter()
        if self.fence is not None:  # from here on the secondary may hold a copy
            self.fence.pending()
        try:
            await send_nowait(self.stream, libxl.CHECKPOINT_END_RECORD)
            ack = await self.link.reply(fut, seq, self.spec.ack_timeout_s)
            if ack.digest != expected:
                raise DigestMismatch(
                    f"checkpoint {seq}: the secondary's ACK digest {ack.digest.hex()[:16]} is not "
                    f"ours {expected.hex()[:16]}: it applied something else"
                )
        except (ReplicationError, OSError) as exc:
            self.figures.fail(f"checkpoint {seq}: {exc}" if isinstance(exc, OSError) else str(exc))
            return 0
        if not self.may_release():  # ACKed, but the lease may not outlive the release
            assert self.lease is not None
            await self.fence_self(
                f"checkpoint {seq} ACKed, but the lease ({self.lease.state.value}) is not "
                f"valid {self.spec.lease_release_margin_s:g} s past its release"
            )
            return 0
        self.watchdog.progress()
        if self.fence is not None:  # the secondary now holds a copy it can start
            self.fence.arm()
        self.figures.ack_lags.append(time.perf_counter() - sent)
        self.figures.checkpoint_done(seq)
        for dev in self.devices:
            await dev.commit(seq - 1)  # the output produced before checkpoint seq
        if self.last_epoch:  # all our guest's output is out; it runs on over there
            await self.hand_over(seq)
            return 0
        # -i is the epoch: "checkpoint every MS milliseconds", as xl's manual has
        # it. libxl waits the whole interval after each checkpoint instead, which
        # stretches every epoch (and the wait of all held output) by the pause and
        # the ACK: on a slow host that halves the checkpoint rate.
        spent = time.perf_counter() - self._epoch_started
        await asyncio.sleep(max(0.0, self.spec.interval_s - spent))
        return 1


class RemusSecondary(Secondary):
    """The secondary on a host whose restore helper we drive ourselves."""

    def __init__(
        self,
        hv: Hypervisor,
        stream: socket.socket,
        control: Control,
        spec: ProtectionSpec,
        name: str | None = None,
        disk_replica: Callable[[DomainInfo], DiskReplica] | None = None,
        last_input: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(hv, stream, control, spec, name, last_input)
        self._make_replica = disk_replica
        self.replica: DiskReplica | None = None
        self.reader = CheckpointReader()
        self._staged: DomainInfo | None = None  # built paused, waiting for the lease

    def capabilities(self) -> tuple[str, ...]:
        return ("ack",)

    def complete_checkpoints(self) -> int:
        return self.reader.complete

    def _on_frame(self, event: Event) -> None:
        if isinstance(event, DiskWrites):
            if self.replica is None:
                raise ReplicationError("DISK frames, but disk replication was not announced")
            try:
                self.replica.receive(event)
            except DiskReplicaError as exc:
                raise ReplicationError(f"DISK: {exc}") from None

    def _stream_broken(self) -> None:
        if self.replica is not None:
            self.replica.abort()

    async def _open(self, peer: Hello) -> DomainInfo:
        name = self.name or str(peer.config.get("c_info", {}).get("name", "remus-secondary"))
        target = self.hv.create_restore_target(peer.config, name, replica_disk=True)
        if "disk" in peer.capabilities and self._make_replica is not None:
            self.replica = self._make_replica(target)
        return target

    async def _restore(self) -> None:
        assert self.target is not None
        await asyncio.to_thread(self._read_prelude)
        self.start_link()
        session = HelperSession(
            Mode.RESTORE, Callbacks(static_data_done=no_results, checkpoint=self._checkpoint)
        )
        args = RestoreArgs(self.target.domid, session.cbflags, StreamType.REMUS)
        result = await session.run(self.stream.fileno(), -1, args, extra_env=self.hv.helper_env())
        if not result.ok and self.reader.complete:
            raise ReplicationError(f"restore helper failed: retval {result.retval}")

    async def _stage(self) -> None:
        # the guest built from the last checkpoint, paused, while the lease is awaited
        self._staged = await self._build(paused=True)

    async def _take_over(self) -> DomainInfo:
        if self._staged is None:
            return await self._build(paused=False)
        self.hv.unpause(self._staged.domid)
        return self.hv.lookup(self._staged.domid)

    async def _build(self, paused: bool) -> DomainInfo:
        assert self.target is not None
        if self.replica is not None:
            dropped = self.replica.discard()
            if dropped:
                log.info("failover: %d disk blocks of an incomplete checkpoint dropped", dropped)
        return await self.hv.finish_restore(self.target.domid, paused=paused)

    # -- the stream's libxl records, read between the helper's own reads --------------

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
            self.figures.fail(result.reason)
            return int(result.reply)
        if not isinstance(result, CheckpointReady):  # Apply outside a checkpoint: not reachable
            return int(CheckpointReply.ERROR)
        disk: bytes | None = None
        if self.replica is not None:
            # the checkpoint is complete only with its disk blocks: apply them before
            # the ACK, and before libxc applies its memory (on our SUCCESS reply)
            try:
                await self.replica.wait(result.seq, self.spec.ack_timeout_s)
                if self.replica.pending_blocks(result.seq):
                    disk = await asyncio.to_thread(self.replica.apply, result.seq)
                else:  # nothing to write: not worth a thread hop per idle checkpoint
                    disk = self.replica.apply(result.seq)
            except (TimeoutError, DiskReplicaError) as exc:
                self.figures.fail(
                    f"checkpoint {result.seq}: disk blocks incomplete "
                    f"({exc or 'not in within ' + str(self.spec.ack_timeout_s) + ' s'})"
                )
                return int(CheckpointReply.FAILOVER)
        outcome = self.reader.applied()
        self.figures.checkpoint_done(outcome.seq)
        await self.link.ack(outcome.seq, ack_digest(outcome.seq, disk))
        return int(CheckpointReply.SUCCESS)
