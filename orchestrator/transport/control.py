"""The control channel between two orchestrators, sans I/O.

Framed like libxl records (u32 type, u32 length, body, zero padding to 8),
in its own connection beside the stream and back channels. The primary
learns from it that a checkpoint arrived whole (ACK, with a digest of the
bytes received), which is what lets it release that epoch's output; both
sides learn that the other is alive (HEARTBEAT).

Bodies: HELLO and STATS are JSON (rare, and worth being readable in a
capture); the frequent ones are fixed binary. Everything that decides what
may come when is in ``TRANSITIONS``; a frame with no row there, a frame that
does not parse, or a HELLO of another protocol version is a
:class:`ControlError` that names the offset and the frame, and the
connection is closed: nothing after it is processed.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any, Final, NoReturn

from ..streams.framing import RECORD_HEADER, padded_length, padding_for, padding_is_zero

PROTOCOL_VERSION: Final = 1
MAX_BODY: Final = 1 << 20


class FrameType(IntEnum):
    HELLO = 1
    ACK = 2
    HEARTBEAT = 3
    FAILOVER = 4
    SHUTDOWN = 5
    STATS = 6
    DISK = 7
    # COLO's network half (``devices/colo_net.py``)
    MIRROR = 8  # primary -> secondary: a copy of a packet the client sent the guest
    CONN = 9  # primary -> secondary: the primary guest's SYN-ACK numbers
    SVM_OUTPUT = 10  # secondary -> primary: TCP payload its guest sent
    NETSYNC = 11  # primary -> secondary: its output positions at a checkpoint's suspend


@dataclass(frozen=True)
class Hello:
    protection: str
    config: dict[str, Any] = field(default_factory=dict)
    capabilities: tuple[str, ...] = ()
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Ack:
    """Checkpoint ``seq`` arrived whole and was applied; ``digest`` is of its bytes."""

    seq: int
    digest: bytes  # 32 bytes, sha256


@dataclass(frozen=True)
class Heartbeat:
    seq: int
    sent_ns: int  # sender's monotonic clock


@dataclass(frozen=True)
class Failover:
    reason: str


@dataclass(frozen=True)
class Shutdown:
    reason: str


@dataclass(frozen=True)
class Stats:
    values: dict[str, Any]


@dataclass(frozen=True)
class DiskWrites:
    """Blocks the primary's guest wrote before checkpoint ``seq``'s suspend.

    One checkpoint's blocks may span several frames (a frame is at most
    MAX_BODY); ``last`` marks the final one. ``total_blocks`` is the disk's
    size, so that the secondary can size its replica from the first frame.
    """

    seq: int
    total_blocks: int
    blocks: tuple[tuple[int, bytes], ...]
    last: bool
    block_size: int = 4096


@dataclass(frozen=True)
class Mirror:
    """An IPv4 packet the client sent the primary guest, for the secondary guest."""

    packet: bytes


@dataclass(frozen=True)
class ConnInfo:
    """The primary guest accepted a connection: its ISN and SYN-ACK TSval (0: none),
    which the secondary's rewriter needs to map the client's acks to its own copy."""

    client_port: int
    guest_port: int
    isn: int
    tsval: int


@dataclass(frozen=True)
class SvmOutput:
    """TCP payload the secondary guest sent on a connection, at a stream offset,
    after it had loaded checkpoint ``epoch`` (output of an older state is stale)."""

    client_port: int
    guest_port: int
    epoch: int
    offset: int
    payload: bytes


@dataclass(frozen=True)
class NetSync:
    """Where the primary guest's output stood on each connection (stream offset mod
    2**32) when it was suspended for checkpoint ``seq``: the secondary copy's output
    continues from there once it has loaded that checkpoint."""

    seq: int
    ends: tuple[tuple[int, int, int], ...]  # (client port, guest port, offset)


Event = (
    Hello
    | Ack
    | Heartbeat
    | Failover
    | Shutdown
    | Stats
    | DiskWrites
    | Mirror
    | ConnInfo
    | SvmOutput
    | NetSync
)

_ACK: Final = struct.Struct("<Q32s")
_HEARTBEAT: Final = struct.Struct("<QQ")
# seq, total blocks, block size, count, flags (bit 0: last frame of the checkpoint)
_DISK: Final = struct.Struct("<QQIII")
_CONN: Final = struct.Struct("<HHII")
_SVM_OUTPUT: Final = struct.Struct("<HHIQ")  # ports, epoch, offset
_NETSYNC: Final = struct.Struct("<QI4x")  # seq, count
_NETSYNC_END: Final = struct.Struct("<HHI")
DISK_FRAME_BLOCKS: Final = 64  # 256 KiB of 4 KiB blocks: well under MAX_BODY


def encode_event(event: Event) -> bytes:
    if isinstance(event, Hello):
        ftype, body = (
            FrameType.HELLO,
            json.dumps(
                {
                    "version": event.version,
                    "protection": event.protection,
                    "config": event.config,
                    "capabilities": list(event.capabilities),
                }
            ).encode(),
        )
    elif isinstance(event, Ack):
        ftype, body = FrameType.ACK, _ACK.pack(event.seq, event.digest)
    elif isinstance(event, Heartbeat):
        ftype, body = FrameType.HEARTBEAT, _HEARTBEAT.pack(event.seq, event.sent_ns)
    elif isinstance(event, Failover):
        ftype, body = FrameType.FAILOVER, event.reason.encode()
    elif isinstance(event, Shutdown):
        ftype, body = FrameType.SHUTDOWN, event.reason.encode()
    elif isinstance(event, DiskWrites):
        ftype = FrameType.DISK
        numbers = struct.pack(f"<{len(event.blocks)}Q", *(b for b, _ in event.blocks))
        body = b"".join(
            (
                _DISK.pack(
                    event.seq,
                    event.total_blocks,
                    event.block_size,
                    len(event.blocks),
                    int(event.last),
                ),
                numbers,
                *(data for _, data in event.blocks),
            )
        )
    elif isinstance(event, Mirror):
        ftype, body = FrameType.MIRROR, event.packet
    elif isinstance(event, ConnInfo):
        ftype = FrameType.CONN
        body = _CONN.pack(event.client_port, event.guest_port, event.isn, event.tsval)
    elif isinstance(event, SvmOutput):
        ftype = FrameType.SVM_OUTPUT
        body = (
            _SVM_OUTPUT.pack(event.client_port, event.guest_port, event.epoch, event.offset)
            + event.payload
        )
    elif isinstance(event, NetSync):
        ftype = FrameType.NETSYNC
        body = _NETSYNC.pack(event.seq, len(event.ends)) + b"".join(
            _NETSYNC_END.pack(*end) for end in event.ends
        )
    else:
        ftype, body = FrameType.STATS, json.dumps(event.values).encode()
    return RECORD_HEADER.pack(ftype, len(body)) + body + padding_for(len(body))


class ControlError(Exception):
    def __init__(self, offset: int, what: str, message: str) -> None:
        self.offset = offset
        super().__init__(f"control channel offset {offset}: {what}: {message}")


def _decode(ftype: int, body: bytes) -> Event:
    if ftype == FrameType.HELLO:
        d = json.loads(body)
        if not isinstance(d, dict) or not isinstance(d.get("version"), int):
            raise ValueError("HELLO is not an object with an integer version")
        return Hello(
            str(d.get("protection", "")),
            dict(d.get("config") or {}),
            tuple(str(c) for c in d.get("capabilities") or ()),
            d["version"],
        )
    if ftype == FrameType.ACK:
        if len(body) != _ACK.size:
            raise ValueError(f"ACK body of {len(body)} bytes (want {_ACK.size})")
        seq, digest = _ACK.unpack(body)
        return Ack(seq, digest)
    if ftype == FrameType.HEARTBEAT:
        if len(body) != _HEARTBEAT.size:
            raise ValueError(f"HEARTBEAT body of {len(body)} bytes (want {_HEARTBEAT.size})")
        return Heartbeat(*_HEARTBEAT.unpack(body))
    if ftype == FrameType.FAILOVER:
        return Failover(body.decode())
    if ftype == FrameType.SHUTDOWN:
        return Shutdown(body.decode())
    if ftype == FrameType.STATS:
        values = json.loads(body)
        if not isinstance(values, dict):
            raise ValueError("STATS is not an object")
        return Stats(values)
    if ftype == FrameType.DISK:
        return _decode_disk(body)
    if ftype == FrameType.MIRROR:
        if len(body) < 20 or body[0] >> 4 != 4:
            raise ValueError(f"MIRROR of {len(body)} bytes is not an IPv4 packet")
        return Mirror(body)
    if ftype == FrameType.CONN:
        if len(body) != _CONN.size:
            raise ValueError(f"CONN body of {len(body)} bytes (want {_CONN.size})")
        return ConnInfo(*_CONN.unpack(body))
    if ftype == FrameType.SVM_OUTPUT:
        if len(body) < _SVM_OUTPUT.size:
            raise ValueError(f"SVM_OUTPUT body of {len(body)} bytes is shorter than its header")
        cport, gport, epoch, offset = _SVM_OUTPUT.unpack_from(body)
        return SvmOutput(cport, gport, epoch, offset, body[_SVM_OUTPUT.size :])
    if ftype == FrameType.NETSYNC:
        if len(body) < _NETSYNC.size:
            raise ValueError(f"NETSYNC body of {len(body)} bytes is shorter than its header")
        seq, count = _NETSYNC.unpack_from(body)
        if len(body) != _NETSYNC.size + count * _NETSYNC_END.size:
            raise ValueError(f"NETSYNC body of {len(body)} bytes for {count} connections")
        ends = tuple(
            _NETSYNC_END.unpack_from(body, _NETSYNC.size + i * _NETSYNC_END.size)
            for i in range(count)
        )
        return NetSync(seq, ends)
    raise ValueError("unknown frame type")


def _decode_disk(body: bytes) -> DiskWrites:
    if len(body) < _DISK.size:
        raise ValueError(f"DISK body of {len(body)} bytes is shorter than its header")
    seq, total, bsize, count, flags = _DISK.unpack_from(body)
    if bsize == 0 or bsize & (bsize - 1) or bsize > 65536:
        raise ValueError(f"DISK block size {bsize} is not a power of two <= 65536")
    want = _DISK.size + 8 * count + bsize * count
    if len(body) != want:
        raise ValueError(f"DISK body of {len(body)} bytes != {want} for {count} blocks")
    numbers = struct.unpack_from(f"<{count}Q", body, _DISK.size)
    if any(n >= total for n in numbers):
        raise ValueError(f"DISK block number beyond the disk's {total} blocks")
    base = _DISK.size + 8 * count
    blocks = tuple(
        (n, body[base + i * bsize : base + (i + 1) * bsize]) for i, n in enumerate(numbers)
    )
    return DiskWrites(seq, total, blocks, bool(flags & 1), bsize)


class State(Enum):
    AWAIT_HELLO = "await-hello"
    ESTABLISHED = "established"
    CLOSED = "closed"


# (state, frame received) -> next state. Our own HELLO is sent first by both
# sides; the peer's HELLO moves us to ESTABLISHED.
TRANSITIONS: Final[dict[tuple[State, type], State]] = {
    (State.AWAIT_HELLO, Hello): State.ESTABLISHED,
    (State.ESTABLISHED, Ack): State.ESTABLISHED,
    (State.ESTABLISHED, Heartbeat): State.ESTABLISHED,
    (State.ESTABLISHED, Stats): State.ESTABLISHED,
    (State.ESTABLISHED, DiskWrites): State.ESTABLISHED,
    (State.ESTABLISHED, Failover): State.ESTABLISHED,
    (State.ESTABLISHED, Mirror): State.ESTABLISHED,
    (State.ESTABLISHED, ConnInfo): State.ESTABLISHED,
    (State.ESTABLISHED, SvmOutput): State.ESTABLISHED,
    (State.ESTABLISHED, NetSync): State.ESTABLISHED,
    (State.ESTABLISHED, Shutdown): State.CLOSED,
}


class ControlConnection:
    """One end of a control connection: bytes in, events out; events in, bytes out."""

    def __init__(self, version: int = PROTOCOL_VERSION) -> None:
        self.version = version
        self.state = State.AWAIT_HELLO
        self.peer: Hello | None = None
        self._buf = bytearray()
        self._offset = 0  # stream offset of _buf[0]

    def send(self, event: Event) -> bytes:
        if self.state is State.CLOSED:
            raise ControlError(self._offset, type(event).__name__, "connection is closed")
        return encode_event(event)

    def receive_data(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        self._buf += data

    def next_event(self) -> Event | None:
        """The next complete event, or None until more bytes arrive."""
        if self.state is State.CLOSED or len(self._buf) < RECORD_HEADER.size:
            return None
        ftype, length = RECORD_HEADER.unpack_from(self._buf)
        name = FrameType(ftype).name if ftype in FrameType._value2member_map_ else f"type {ftype}"
        if length > MAX_BODY:
            self._fail(name, f"length {length} exceeds {MAX_BODY}")
        total = RECORD_HEADER.size + padded_length(length)
        if len(self._buf) < total:
            return None
        body = bytes(self._buf[RECORD_HEADER.size : RECORD_HEADER.size + length])
        if not padding_is_zero(memoryview(self._buf)[RECORD_HEADER.size + length : total]):
            self._fail(name, "non-zero padding")
        try:
            event = _decode(ftype, body)
        except (ValueError, UnicodeDecodeError) as exc:
            self._fail(name, str(exc))
        nxt = TRANSITIONS.get((self.state, type(event)))
        if nxt is None:
            self._fail(name, f"not allowed in state {self.state.value}")
        if isinstance(event, Hello):
            if event.version != self.version:
                self._fail(
                    name,
                    f"peer speaks control protocol version {event.version}, we speak "
                    f"{self.version}",
                )
            self.peer = event
        del self._buf[:total]
        self._offset += total
        self.state = nxt
        return event

    def _fail(self, what: str, message: str) -> NoReturn:
        self.state = State.CLOSED
        offset = self._offset
        self._buf.clear()
        raise ControlError(offset, what, message)
