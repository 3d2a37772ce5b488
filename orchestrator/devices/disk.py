"""Disk replication: per-checkpoint block sets, applied on commit.

Xen's Remus replicates disks with DRBD or blktap's remus driver: the
primary's writes go to its own disk at once and are mirrored to the
secondary, which holds each epoch's writes aside and applies them only when
that epoch's memory checkpoint is complete, so that after a failover disk
and memory are from the same instant.

Here the primary side (:class:`DiskSender`) is a checkpoint device over
any backend's :class:`~orchestrator.hypervisors.base.BlockDevice` (today the
simulated one's, ``Capability.DISK_REPLICATION``): at
``postsuspend`` of checkpoint *k* (the guest is stopped, so no write is in
flight) it takes the blocks marked in the domain's block dirty map, clears
the marks and sends their contents as DISK frames tagged *k* on the control
connection. The first checkpoint also carries every block of the image that
holds data, the initial synchronisation that DRBD would do.

The secondary side (:class:`DiskReplica`) buffers frames per checkpoint.
When the libxl records of checkpoint *k* are complete, the receiver waits
for *k*'s last DISK frame, applies the blocks to its image and makes them
durable, and only then ACKs *k* (and lets libxc apply *k*'s memory). A
checkpoint whose disk blocks never arrive is not complete: the receiver
fails over to *k-1*, and the blocks of *k* are thrown away.

Unlike Xen's Remus disk (whose blocks flow during the epoch) the blocks go
at suspend time, so a block rewritten ten times in an epoch is sent once;
the cost is that they go in the checkpoint's own window rather than ahead
of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..hypervisors.base import BLOCK_SIZE, BlockDevice
from ..transport.control import DISK_FRAME_BLOCKS, DiskWrites
from .base import CheckpointDevice

_ZERO = bytes(BLOCK_SIZE)


def _blocks_with_data(fd: int, blocks: int) -> list[int]:
    """Blocks of a sparse image that hold anything but zeroes."""
    out: list[int] = []
    size = blocks * BLOCK_SIZE
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        first = start // BLOCK_SIZE
        for b in range(first, (end + BLOCK_SIZE - 1) // BLOCK_SIZE):
            if os.pread(fd, BLOCK_SIZE, b * BLOCK_SIZE) != _ZERO:
                out.append(b)
        pos = max(end, (first + 1) * BLOCK_SIZE)
    return out


@dataclass
class DiskStats:
    # per checkpoint after the first (which carries the initial synchronisation)
    blocks_sent: deque[int] = field(default_factory=lambda: deque(maxlen=256))
    initial_blocks: int = 0
    checkpoints: int = 0


def blocks_digest_part(blocks: tuple[tuple[int, bytes], ...] | list[tuple[int, bytes]]) -> bytes:
    """The bytes a checkpoint's disk digest covers for these blocks, on both sides."""
    return b"".join(n.to_bytes(8, "little") + data for n, data in blocks)


class DiskSender(CheckpointDevice):
    """Primary side: each checkpoint's dirty blocks, sent as that checkpoint's DISK frames."""

    name = "disk"
    capability = "disk"  # the secondary sets up its replica when the HELLO says so

    def __init__(self, domain: BlockDevice, send: Callable[[DiskWrites], None]) -> None:
        self.domain = domain
        self.send = send
        self.stats = DiskStats()
        self._fd = -1
        self._initial: list[int] = []
        # digests of the checkpoints sent and not yet asked for: one in flight at a
        # time, so this never holds more than a couple
        self._digests: dict[int, bytes] = {}

    async def setup(self) -> None:
        path = self.domain.disk_path
        if path is None:
            raise ValueError(f"domain {self.domain.name} has no disk to replicate")
        self._fd = os.open(path, os.O_RDONLY)
        blocks = self.domain.disk_blocks
        self._initial = await asyncio.to_thread(_blocks_with_data, self._fd, blocks)
        self.stats.initial_blocks = len(self._initial)

    async def postsuspend(self, epoch: int) -> None:
        dirty = self.domain.disk_dirty()
        total = len(dirty)
        numbers: list[int] = []
        pos = dirty.find(b"\x01")
        while pos != -1:
            numbers.append(pos)
            pos = dirty.find(b"\x01", pos + 1)
        for n in numbers:
            dirty[n] = 0  # cleared before the read: a later write is marked again
        if self._initial:  # the first checkpoint carries the whole disk's contents
            numbers = sorted(set(numbers).union(self._initial))
            self._initial = []
        self.stats.checkpoints += 1
        if self.stats.checkpoints > 1:
            self.stats.blocks_sent.append(len(numbers))
        chunks = [
            numbers[i : i + DISK_FRAME_BLOCKS] for i in range(0, len(numbers), DISK_FRAME_BLOCKS)
        ]
        digest = hashlib.sha256(epoch.to_bytes(8, "little"))
        for i, chunk in enumerate(chunks or [[]]):
            blocks = tuple((n, os.pread(self._fd, BLOCK_SIZE, n * BLOCK_SIZE)) for n in chunk)
            digest.update(blocks_digest_part(blocks))
            self.send(DiskWrites(epoch, total, blocks, last=i == max(len(chunks) - 1, 0)))
        self._digests = {epoch: digest.digest()}

    def digest(self, epoch: int) -> bytes | None:
        """What the secondary's :meth:`DiskReplica.apply` of ``epoch`` returns if it
        wrote exactly the blocks we sent; the primary checks the ACK against it."""
        return self._digests.pop(epoch, None)

    async def preresume(self) -> None:
        pass

    async def commit(self, epoch: int) -> None:
        pass  # the primary's own disk already has the writes

    async def teardown(self, release: bool) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class DiskReplicaError(Exception):
    pass


class DiskReplica:
    """Secondary side: blocks held per checkpoint, written to the replica at commit."""

    def __init__(self, domain: BlockDevice) -> None:
        self.domain = domain
        path = domain.disk_path
        if path is None:
            raise DiskReplicaError("the restore target has no disk image")
        # blank: the first checkpoint carries only the blocks that hold data, so
        # anything stale left here would survive where the primary has zeroes
        with open(path, "r+b") as f:
            f.truncate(0)
        self._pending: dict[int, list[tuple[int, bytes]]] = {}
        self._complete: set[int] = set()
        self._arrived = asyncio.Event()
        self._aborted = False
        self.applied_seq = 0
        self.blocks_applied = 0

    def receive(self, frame: DiskWrites) -> None:
        if frame.block_size != BLOCK_SIZE:
            raise DiskReplicaError(f"block size {frame.block_size}, replica uses {BLOCK_SIZE}")
        if frame.seq <= self.applied_seq or frame.seq in self._complete:
            raise DiskReplicaError(f"DISK frame for checkpoint {frame.seq}, already complete")
        self._size(frame.total_blocks)
        self._pending.setdefault(frame.seq, []).extend(frame.blocks)
        if frame.last:
            self._complete.add(frame.seq)
            self._arrived.set()

    def _size(self, total: int) -> None:
        path = self.domain.disk_path
        if path is None:
            raise DiskReplicaError("the restore target has no disk image")
        if path.stat().st_size != total * BLOCK_SIZE:
            with open(path, "r+b") as f:
                f.truncate(total * BLOCK_SIZE)

    async def wait(self, seq: int, timeout: float) -> None:
        """Until checkpoint ``seq``'s last DISK frame is in, or TimeoutError."""
        async with asyncio.timeout(timeout):
            while seq not in self._complete:
                if self._aborted:
                    raise DiskReplicaError("the replication link is gone")
                self._arrived.clear()
                await self._arrived.wait()

    def abort(self) -> None:
        """The link is gone: a wait for blocks that cannot come ends now."""
        self._aborted = True
        self._arrived.set()

    def pending_blocks(self, seq: int) -> int:
        return len(self._pending.get(seq, ()))

    def apply(self, seq: int) -> bytes:
        """Write checkpoint ``seq``'s blocks durably; the digest covers what was written."""
        if seq not in self._complete:
            raise DiskReplicaError(f"checkpoint {seq}'s disk blocks are incomplete")
        path = self.domain.disk_path
        assert path is not None  # receive() checked
        digest = hashlib.sha256(seq.to_bytes(8, "little"))
        blocks = self._pending.pop(seq, [])
        if blocks:  # an idle guest's checkpoints write nothing: no fdatasync either
            fd = os.open(path, os.O_WRONLY)
            try:
                for n, data in blocks:
                    os.pwrite(fd, data, n * BLOCK_SIZE)
                digest.update(blocks_digest_part(blocks))
                os.fdatasync(fd)
            finally:
                os.close(fd)
        self._complete.discard(seq)
        self.applied_seq = seq
        self.blocks_applied += len(blocks)
        return digest.digest()

    def discard(self) -> int:
        """Failover: drop every block of a checkpoint that did not complete."""
        dropped = sum(len(b) for b in self._pending.values())
        self._pending.clear()
        self._complete.clear()
        return dropped
