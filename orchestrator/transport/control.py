"""The control channel between two orchestrators, sans I/O.

Framed like libxl records (u32 type, u32 length, body, zero padding to 8),
in its own connection beside the stream and back channels. The primary
learns from it that a checkpoint arrived whole (ACK, with a digest of the
bytes received), which is what lets it release that epoch's output; both
sides learn that the other is alive (HEARTBEAT).

Bodies: HELLO is JSON (rare, and worth being readable in a capture); the
frequent ones are fixed binary. Everything that decides what may come when
is in this file, for both sides: ``TRANSITIONS[role][state][frame]`` for
what a side receives, ``SENDS[role]`` for what it may send, and the
sequence rules (an ACK only for the checkpoint in flight, a checkpoint's
DISK frames before it is acknowledged) in :class:`ControlConnection`. A
frame with no row, a frame that does not parse, or a HELLO of another
protocol version is a :class:`ControlError` that names the offset and the
frame, and the connection is closed: nothing after it is processed.
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
    # 6 was STATS, never sent: the number stays unused
    DISK = 7
    # COLO's network half (``devices/colo_net.py``)
    MIRROR = 8  # primary -> secondary: a copy of a packet the client sent the guest
    CONN = 9  # primary -> secondary: the primary guest's SYN-ACK numbers
    SVM_OUTPUT = 10  # secondary -> primary: TCP payload its guest sent
    NETSYNC = 11  # primary -> secondary: its output positions at a checkpoint's suspend
    # primary -> secondary: a planned switchover (the secondary answers FAILOVER)
    SWITCHOVER = 12


@dataclass(frozen=True)
class Hello:
    protection: str
    config: dict[str, Any] = field(default_factory=dict)
    capabilities: tuple[str, ...] = ()
    version: int = PROTOCOL_VERSION
    # the primary's witness (tooz's URL), so that a receiver without one of its own
    # takes over under the same lease; empty without a witness
    witness: str = ""


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
class Switchover:
    """A planned switchover: checkpoint ``seq`` (ACKed) is the last, the primary's guest
    stays suspended and its lease is let go; the secondary takes over from ``seq`` and
    answers FAILOVER once its copy runs.

    ``protect_back`` is the ProtectionSpec document (JSON) the secondary's host protects
    the guest back with, to the old primary's host; empty: it protects nothing back.
    A document, not fields: this layer sits below the spec's, and only the protection
    layer reads it."""

    seq: int
    protect_back: str = ""


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
    | DiskWrites
    | Mirror
    | ConnInfo
    | SvmOutput
    | NetSync
    | Switchover
)

_ACK: Final = struct.Struct("<Q32s")
_HEARTBEAT: Final = struct.Struct("<QQ")
# seq, total blocks, block size, count, flags (bit 0: last frame of the checkpoint)
_DISK: Final = struct.Struct("<QQIII")
_CONN: Final = struct.Struct("<HHII")
_SVM_OUTPUT: Final = struct.Struct("<HHIQ")  # ports, epoch, offset
_NETSYNC: Final = struct.Struct("<QI4x")  # seq, count
_NETSYNC_END: Final = struct.Struct("<HHI")
_SWITCHOVER: Final = struct.Struct("<Q")  # seq, then the document (UTF-8)
DISK_FRAME_BLOCKS: Final = 64  # 256 KiB of 4 KiB blocks: well under MAX_BODY


def _encode_hello(e: Hello) -> bytes:
    return json.dumps(
        {
            "version": e.version,
            "protection": e.protection,
            "config": e.config,
            "capabilities": list(e.capabilities),
            **({"witness": e.witness} if e.witness else {}),
        }
    ).encode()


def _encode_disk(e: DiskWrites) -> bytes:
    numbers = struct.pack(f"<{len(e.blocks)}Q", *(b for b, _ in e.blocks))
    head = _DISK.pack(e.seq, e.total_blocks, e.block_size, len(e.blocks), int(e.last))
    return b"".join((head, numbers, *(data for _, data in e.blocks)))


def _encode_netsync(e: NetSync) -> bytes:
    ends = b"".join(_NETSYNC_END.pack(*end) for end in e.ends)
    return _NETSYNC.pack(e.seq, len(e.ends)) + ends


# event type -> (frame type, body encoder)
_ENCODERS: Final[dict[type, tuple[FrameType, Any]]] = {
    Hello: (FrameType.HELLO, _encode_hello),
    Ack: (FrameType.ACK, lambda e: _ACK.pack(e.seq, e.digest)),
    Heartbeat: (FrameType.HEARTBEAT, lambda e: _HEARTBEAT.pack(e.seq, e.sent_ns)),
    Failover: (FrameType.FAILOVER, lambda e: e.reason.encode()),
    Shutdown: (FrameType.SHUTDOWN, lambda e: e.reason.encode()),
    DiskWrites: (FrameType.DISK, _encode_disk),
    Mirror: (FrameType.MIRROR, lambda e: e.packet),
    ConnInfo: (
        FrameType.CONN,
        lambda e: _CONN.pack(e.client_port, e.guest_port, e.isn, e.tsval),
    ),
    SvmOutput: (
        FrameType.SVM_OUTPUT,
        lambda e: _SVM_OUTPUT.pack(e.client_port, e.guest_port, e.epoch, e.offset) + e.payload,
    ),
    NetSync: (FrameType.NETSYNC, _encode_netsync),
    Switchover: (
        FrameType.SWITCHOVER,
        lambda e: _SWITCHOVER.pack(e.seq) + e.protect_back.encode(),
    ),
}


def encode_event(event: Event) -> bytes:
    ftype, encode = _ENCODERS[type(event)]
    body: bytes = encode(event)
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
            str(d.get("witness") or ""),
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
    if ftype == FrameType.SWITCHOVER:
        if len(body) < _SWITCHOVER.size:
            raise ValueError(f"SWITCHOVER body of {len(body)} bytes is shorter than its header")
        (seq,) = _SWITCHOVER.unpack_from(body)
        return Switchover(seq, body[_SWITCHOVER.size :].decode())
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


class Role(Enum):
    PRIMARY = "primary"  # runs the guest, sends checkpoints, waits for their ACKs
    SECONDARY = "secondary"  # receives checkpoints, ACKs them, takes over


class State(Enum):
    AWAIT_HELLO = "await-hello"
    ESTABLISHED = "established"
    # primary only: CHECKPOINT_END of checkpoint ``in_flight`` is written, its ACK
    # (Remus) or LOADED (COLO) not yet in
    IN_FLIGHT = "checkpoint-in-flight"
    # secondary only: the primary handed the guest over (SWITCHOVER); all that may
    # come now is proof of life, all that goes back is our FAILOVER once it runs here
    HANDED_OVER = "handed-over"
    CLOSED = "closed"


def _staying(state: State, frames: tuple[type, ...]) -> dict[type, State]:
    return dict.fromkeys(frames, state)


# proof of life, and COLO's secondary output: any time once established
_PRIMARY_ANY_TIME: Final = (Heartbeat, SvmOutput)
_PRIMARY_ENDS: Final[dict[type, State]] = {
    Failover: State.CLOSED,  # the secondary took over (forced): we must stop
    Shutdown: State.CLOSED,
}

# What each side may receive, by state: frame type -> next state. Our own HELLO
# is sent first by both sides; the peer's HELLO moves us to ESTABLISHED.
TRANSITIONS: Final[dict[Role, dict[State, dict[type, State]]]] = {
    Role.PRIMARY: {
        State.AWAIT_HELLO: {Hello: State.ESTABLISHED},
        State.ESTABLISHED: {**_staying(State.ESTABLISHED, _PRIMARY_ANY_TIME), **_PRIMARY_ENDS},
        State.IN_FLIGHT: {
            **_staying(State.IN_FLIGHT, _PRIMARY_ANY_TIME),
            **_PRIMARY_ENDS,
            Ack: State.ESTABLISHED,  # for the checkpoint in flight only (see next_event)
        },
        # a secondary's state only: after SWITCHOVER the primary stays ESTABLISHED
        # until the FAILOVER in answer
        State.HANDED_OVER: {},
        State.CLOSED: {},
    },
    Role.SECONDARY: {
        State.AWAIT_HELLO: {Hello: State.ESTABLISHED},
        State.ESTABLISHED: {
            **_staying(State.ESTABLISHED, (Heartbeat, DiskWrites, Mirror, ConnInfo, NetSync)),
            Shutdown: State.CLOSED,  # the primary ended replication: drop the copy
            Switchover: State.HANDED_OVER,  # for the last ACKed checkpoint only
        },
        State.IN_FLIGHT: {},  # not a secondary's state
        State.HANDED_OVER: _staying(State.HANDED_OVER, (Heartbeat,)),
        State.CLOSED: {},
    },
}

# What each side may send (its peer's table is the check that matters; this one
# catches our own bugs before they reach the wire).
SENDS: Final[dict[Role, frozenset[type]]] = {
    Role.PRIMARY: frozenset(
        {Hello, Heartbeat, DiskWrites, Mirror, ConnInfo, NetSync, Shutdown, Switchover}
    ),
    Role.SECONDARY: frozenset({Hello, Heartbeat, Ack, SvmOutput, Failover}),
}


class ControlConnection:
    """One end of a control connection: bytes in, events out; events in, bytes out.

    The primary tells the codec when a checkpoint's CHECKPOINT_END went out on
    the stream (:meth:`checkpoint_sent`), since that record does not pass
    through here; the ACK rules follow from it.
    """

    def __init__(self, role: Role = Role.PRIMARY, version: int = PROTOCOL_VERSION) -> None:
        self.role = role
        self.version = version
        self.state = State.AWAIT_HELLO
        self.peer: Hello | None = None
        self.in_flight = 0  # primary: the checkpoint whose ACK we wait for
        self.sent_seq = 0  # primary: the last checkpoint sent
        self.acked = 0  # the last checkpoint ACKed (sent by a secondary, received by a primary)
        self._buf = bytearray()
        self._offset = 0  # stream offset of _buf[0]

    def set_role(self, role: Role) -> None:
        if role is self.role:
            return
        if self.state is not State.AWAIT_HELLO:
            raise ControlError(self._offset, "role", "fixed once the connection is established")
        self.role = role

    def checkpoint_sent(self, seq: int) -> None:
        """Primary: checkpoint ``seq`` is written; its ACK may come now, and only its."""
        if self.role is not Role.PRIMARY or self.state is not State.ESTABLISHED:
            raise ControlError(
                self._offset,
                f"checkpoint {seq}",
                f"sent in state {self.state.value} as the {self.role.value}",
            )
        if seq != self.sent_seq + 1:
            raise ControlError(
                self._offset, f"checkpoint {seq}", f"out of order after {self.sent_seq}"
            )
        self.sent_seq = self.in_flight = seq
        self.state = State.IN_FLIGHT

    def send(self, event: Event) -> bytes:
        what = type(event).__name__
        if self.state is State.CLOSED:
            raise ControlError(self._offset, what, "connection is closed")
        if type(event) not in SENDS[self.role]:
            raise ControlError(self._offset, what, f"the {self.role.value} does not send it")
        if isinstance(event, Ack):  # a secondary ACKs each checkpoint once, in order
            if event.seq <= self.acked:
                raise ControlError(
                    self._offset, what, f"checkpoint {event.seq} after {self.acked} was ACKed"
                )
            self.acked = event.seq
        elif isinstance(event, DiskWrites) and event.seq <= self.sent_seq:
            raise ControlError(
                self._offset, what, f"blocks of checkpoint {event.seq} after its CHECKPOINT_END"
            )
        elif isinstance(event, Switchover) and (
            self.state is not State.ESTABLISHED or not 0 < event.seq == self.acked
        ):
            raise ControlError(
                self._offset,
                what,
                f"for checkpoint {event.seq} in state {self.state.value}: only the last "
                f"ACKed one ({self.acked}), with none in flight",
            )
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
        nxt = TRANSITIONS[self.role][self.state].get(type(event))
        if nxt is None:
            self._fail(name, f"not allowed in state {self.state.value} of the {self.role.value}")
        if isinstance(event, Hello):
            if event.version != self.version:
                self._fail(
                    name,
                    f"peer speaks control protocol version {event.version}, we speak "
                    f"{self.version}",
                )
            self.peer = event
        elif isinstance(event, Ack):
            if event.seq != self.in_flight:
                self._fail(name, f"for checkpoint {event.seq}, {self.in_flight} is in flight")
            self.acked, self.in_flight = event.seq, 0
        elif isinstance(event, DiskWrites) and event.seq <= self.acked:
            self._fail(name, f"blocks of checkpoint {event.seq}, which was already ACKed")
        elif isinstance(event, Switchover) and not 0 < event.seq == self.acked:
            self._fail(name, f"from checkpoint {event.seq}, but {self.acked} is the last ACKed")
        del self._buf[:total]
        self._offset += total
        self.state = nxt
        return event

    def _fail(self, what: str, message: str) -> NoReturn:
        self.state = State.CLOSED
        offset = self._offset
        self._buf.clear()
        raise ControlError(offset, what, message)
