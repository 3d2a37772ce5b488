"""COLO network output comparison, sans I/O: the comparer and the rewriter.

COLO runs a primary and a secondary copy of the guest. Client packets to the
primary guest are mirrored to the secondary host and injected into the
secondary guest; both guests answer. :class:`OutputComparer` (on the
primary, like QEMU's ``colo-compare``) holds each TCP packet the primary
guest sends until the secondary guest has sent the same bytes at the same
stream offsets, then releases it; a difference, or a packet held too long,
asks for a checkpoint, after which everything held goes out. The secondary's
output never leaves its host: :class:`Rewriter` (on the secondary, like
QEMU's ``filter-rewriter``) shifts the mirrored packets into the secondary
guest's sequence space and reports what the secondary guest sent.

Both copies choose their own initial sequence numbers, so payload is
compared by stream offset, ``(seq - isn - 1) mod 2**32``, never by sequence
number; headers (windows, ACKs, timestamps) legitimately differ and are not
compared at all.

Neither class does I/O or reads a clock: they take packets (as bytes, plus
an opaque handle for the primary's held packets) and the current time, and
return actions for the adapter that owns the queues and sockets.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Final

from .ippacket import (
    FIN,
    RST,
    PacketError,
    TcpSegment,
    parse_tcp,
    rewrite,
    segment,
)

ConnKey = tuple[int, int]  # (client port, guest port)

_MOD32: Final = 1 << 32
_HALF32: Final = 1 << 31
RECENT_WAITS: Final = 1024  # match waits kept for the medians in status


def _offset32(seq: int, isn: int) -> int:
    # the SYN takes sequence number isn, so payload byte 0 is isn + 1
    return (seq - isn - 1) % _MOD32


def _unwrap(offset32: int, ref: int) -> int:
    """The absolute stream offset nearest ``ref`` whose low 32 bits are ``offset32``.

    Connections that live for months move more than 4 GiB; comparing
    absolute offsets keeps the arithmetic free of wrap-around cases.
    """
    d = (offset32 - ref) % _MOD32
    if d >= _HALF32:
        d -= _MOD32
    return ref + d


def syn_ack_info(packet: bytes) -> tuple[ConnKey, int, int | None] | None:
    """For a primary guest's SYN-ACK: (key, ISN, TSval or None); else None.

    Malformed packets give None too: the comparer treats them as opaque.
    """
    try:
        seg = parse_tcp(packet)
    except PacketError:
        return None
    if seg is None or not seg.is_syn_ack:
        return None
    return (seg.dport, seg.sport), seg.seq, seg.tsval


# -- actions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """Accept this held primary packet now."""

    handle: object


@dataclass(frozen=True)
class CheckpointNeeded:
    """``reason`` is "divergence" (output differs; ``key`` says where) or "held"."""

    reason: str
    key: ConnKey | None


Action = Release | CheckpointNeeded


@dataclass(frozen=True)
class Inject:
    """Send this packet into the secondary guest."""

    packet: bytes


@dataclass(frozen=True)
class Report:
    """The secondary guest sent ``payload`` at stream ``offset``: tell the comparer."""

    key: ConnKey
    offset: int
    payload: bytes


RewriterAction = Inject | Report


# -- the comparer's per-connection state ----------------------------------------------


class _Compare(enum.Enum):
    COMPARING = "comparing"
    DIVERGED = "diverged"  # packets stay held until the checkpoint


class _CompareEvent(enum.Enum):
    MISMATCH = "mismatch"
    CHECKPOINT = "checkpoint"


_COMPARE_NEXT: Final[dict[tuple[_Compare, _CompareEvent], _Compare]] = {
    (_Compare.COMPARING, _CompareEvent.MISMATCH): _Compare.DIVERGED,
    (_Compare.COMPARING, _CompareEvent.CHECKPOINT): _Compare.COMPARING,
    (_Compare.DIVERGED, _CompareEvent.CHECKPOINT): _Compare.COMPARING,
}


class _Life(enum.Enum):
    OPEN = "open"
    FIN_SENT = "fin-sent"  # forgotten once everything up to the FIN is decided
    RESET = "reset"  # forgotten once nothing of it is held


class _LifeEvent(enum.Enum):
    FIN = "fin"
    RST = "rst"


_LIFE_NEXT: Final[dict[tuple[_Life, _LifeEvent], _Life]] = {
    (_Life.OPEN, _LifeEvent.FIN): _Life.FIN_SENT,
    (_Life.OPEN, _LifeEvent.RST): _Life.RESET,
    (_Life.FIN_SENT, _LifeEvent.FIN): _Life.FIN_SENT,
    (_Life.FIN_SENT, _LifeEvent.RST): _Life.RESET,
    (_Life.RESET, _LifeEvent.FIN): _Life.RESET,
    (_Life.RESET, _LifeEvent.RST): _Life.RESET,
}


class _Stream:
    """One side's bytes from the decided position on: contiguous, plus pieces ahead of a gap."""

    __slots__ = ("ahead", "ahead_bytes", "base", "data")

    def __init__(self, base: int) -> None:
        self.base = base
        self.data = bytearray()
        self.ahead: dict[int, bytes] = {}
        self.ahead_bytes = 0

    @property
    def end(self) -> int:
        return self.base + len(self.data)

    @property
    def buffered(self) -> int:
        return len(self.data) + self.ahead_bytes

    def reset(self, base: int) -> None:
        self.base = base
        self.data = bytearray()
        self.ahead.clear()
        self.ahead_bytes = 0

    def add(self, start: int, payload: bytes) -> None:
        """Bytes at absolute ``start``; what is already held wins (first copy kept)."""
        end = start + len(payload)
        if end <= self.end:
            return
        if start > self.end:
            old = self.ahead.get(start)
            if old is None or len(old) < len(payload):
                self.ahead_bytes += len(payload) - (len(old) if old is not None else 0)
                self.ahead[start] = payload
            return
        self.data += payload[self.end - start :]
        if self.ahead:
            self._fill_from_ahead()

    def _fill_from_ahead(self) -> None:
        for start in sorted(self.ahead):
            if start > self.end:
                break
            chunk = self.ahead.pop(start)
            self.ahead_bytes -= len(chunk)
            if start + len(chunk) > self.end:
                self.data += chunk[self.end - start :]

    def consume(self, n: int) -> None:
        del self.data[:n]
        self.base += n


def _common_prefix(a: bytes | bytearray, b: bytes | bytearray, n: int) -> int:
    """Length of the common prefix of a[:n] and b[:n], which differ somewhere."""
    with memoryview(a) as va, memoryview(b) as vb:
        lo, hi = 0, n  # a[:lo] == b[:lo]; they differ within [:hi]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if va[lo:mid] == vb[lo:mid]:
                lo = mid
            else:
                hi = mid
        return lo


@dataclass(eq=False)
class _Held:
    handle: object
    since: float
    size: int
    end: int | None  # absolute end offset of its payload; None without payload


@dataclass(eq=False)
class _Conn:
    key: ConnKey
    isn: int
    decided: int  # every byte below is matched (or settled by a checkpoint)
    primary_high: int  # end of the highest primary byte seen
    last_active: float
    primary: _Stream
    secondary: _Stream
    state: _Compare = _Compare.COMPARING
    life: _Life = _Life.OPEN
    fin_at: int | None = None
    queue: deque[int] = field(default_factory=deque)  # serials of held packets, in order


@dataclass(frozen=True)
class _Tombstone:
    isn: int
    final: int  # absolute end of the stream, FIN excluded


class OutputComparer:
    """Holds the primary guest's output until the secondary's matches (sans I/O).

    ``comparing`` is set by the adapter once the secondary copy runs; a
    connection is compared only if its SYN-ACK went out while it was True.
    Everything else (connections from before, non-TCP, malformed packets) is
    held until the next checkpoint, which is Remus's rule and always safe.

    Secondary bytes for a connection not tracked here are dropped: the
    primary's SYN-ACK is seen here before it is released, and the secondary
    guest cannot send data before the client's answer to that SYN-ACK has
    been mirrored to it, so a report for an unknown key is stale (its
    connection closed, expired, or was never compared).

    Memory stays bounded over months of connections: a connection is
    forgotten once its FIN is decided or its RST released (a small tombstone
    lets the last ACKs and retransmitted FINs through at once), or after
    ``idle_timeout`` without packets and with nothing held, and the least
    recently active one is forgotten when a new one would make more than
    ``max_conns`` (a SYN flood, clients that vanish without FIN or RST): its
    later packets are then held until a checkpoint, Remus's rule, which is
    slower but always safe.
    """

    TOMBSTONES: Final = 4096

    def __init__(
        self,
        hold_bound: float,
        max_buffer: int = 1 << 20,
        *,
        idle_timeout: float = 7200.0,
        max_conns: int = 16384,  # QEMU's colo-compare bounds its table at 16384 too
    ) -> None:
        self.hold_bound = hold_bound
        self.max_buffer = max_buffer
        self.idle_timeout = idle_timeout
        self.max_conns = max_conns
        self.comparing = False
        # counters
        self.compared_packets = 0
        self.matched_bytes = 0
        self.mismatches = 0
        self.released_at_once = 0
        self.released_on_match = 0
        self.released_at_checkpoint = 0
        self.dropped_secondary_bytes = 0
        self.evicted_connections = 0  # forgotten to stay within max_conns
        # how long each packet released on a match waited for the secondary's
        # bytes: COLO's latency cost over unprotected, per packet
        self.match_waits: deque[float] = deque(maxlen=RECENT_WAITS)
        # state
        self._conns: OrderedDict[ConnKey, _Conn] = OrderedDict()  # least recently active first
        self._closed: OrderedDict[ConnKey, _Tombstone] = OrderedDict()
        self._held: dict[int, _Held] = {}  # insertion order is arrival order
        self._serial = 0
        self._held_bytes = 0
        self._secondary_bytes = 0
        self._held_signalled = False

    # -- observers --------------------------------------------------------------------

    @property
    def held_packets(self) -> int:
        return len(self._held)

    @property
    def buffered_bytes(self) -> int:
        """Bytes of held primary packets plus secondary bytes waiting to be compared."""
        return self._held_bytes + self._secondary_bytes

    @property
    def connections(self) -> int:
        return len(self._conns)

    def oldest_held_age(self, now: float) -> float:
        for held in self._held.values():
            return now - held.since
        return 0.0

    # -- events -----------------------------------------------------------------------

    def primary_packet(self, handle: object, packet: bytes, now: float) -> list[Action]:
        """A packet the primary guest sent; ``handle`` comes back in its Release."""
        out: list[Action] = []
        try:
            seg = parse_tcp(packet)
        except PacketError:
            seg = None
        if seg is None:
            self._hold(handle, len(packet), now, None, None)
            self._check_buffer(out)
            return out
        key = (seg.dport, seg.sport)
        if seg.is_syn_ack:
            self._syn_ack(handle, seg, key, len(packet), now, out)
            return out
        conn = self._conns.get(key)
        if conn is None:
            self._untracked(handle, seg, key, len(packet), now, out)
            return out
        self._conns.move_to_end(key)
        conn.last_active = now
        start = _unwrap(_offset32(seg.seq, conn.isn), conn.decided)
        end = start + len(seg.payload)
        if seg.flags & RST:
            conn.life = _LIFE_NEXT[(conn.life, _LifeEvent.RST)]
        elif seg.flags & FIN:
            conn.life = _LIFE_NEXT[(conn.life, _LifeEvent.FIN)]
            conn.fin_at = end
        if seg.payload:
            conn.primary_high = max(conn.primary_high, end)
        if seg.payload and end <= conn.decided and conn.state is _Compare.COMPARING:
            # a retransmission of bytes already matched: nothing new to compare
            out.append(Release(handle))
            self.released_at_once += 1
            self._maybe_forget(conn)
            return out
        serial = self._hold(handle, len(packet), now, conn, end if seg.payload else None)
        if seg.payload:
            self.compared_packets += 1
        if conn.state is _Compare.COMPARING:
            if seg.payload:
                lo = max(start, conn.decided)
                conn.primary.add(lo, seg.payload[lo - start :])
            self._advance(conn, out, serial, now)
        # diverged: everything waits for the checkpoint
        self._check_buffer(out)
        return out

    def secondary_output(
        self, key: ConnKey, offset: int, payload: bytes, now: float
    ) -> list[Action]:
        """Bytes the secondary guest sent at stream ``offset`` (mod 2**32) of ``key``."""
        out: list[Action] = []
        conn = self._conns.get(key)
        if conn is None or conn.state is not _Compare.COMPARING:
            self.dropped_secondary_bytes += len(payload)
            return out
        self._conns.move_to_end(key)
        conn.last_active = now
        start = _unwrap(offset, conn.decided)
        end = start + len(payload)
        if end <= conn.decided:
            return out
        lo = max(start, conn.decided)
        piece = payload[lo - start :]
        if conn.secondary.buffered + len(piece) > self.max_buffer:
            # far ahead of the primary: a checkpoint is asked for below, and the
            # secondary sends afresh after it, so dropping bounds memory safely
            self.dropped_secondary_bytes += len(piece)
            self._signal_held(out)
            return out
        before = conn.secondary.buffered
        conn.secondary.add(lo, piece)
        self._secondary_bytes += conn.secondary.buffered - before
        self._advance(conn, out, None, now)
        self._check_buffer(out)
        return out

    def tick(self, now: float) -> list[Action]:
        """Ask for a checkpoint if a packet has been held longer than ``hold_bound``."""
        out: list[Action] = []
        if self.oldest_held_age(now) > self.hold_bound:
            self._signal_held(out)
        self._expire_idle(now)
        return out

    def primary_ends(self) -> dict[ConnKey, int]:
        """Per compared connection, the end of the primary's output so far (stream
        offset mod 2**32): at a checkpoint's suspend, where the secondary copy's
        output is to continue once it has loaded that checkpoint."""
        return {key: conn.primary_high % _MOD32 for key, conn in self._conns.items()}

    def checkpoint_done(self) -> list[Action]:
        """Both copies are in the same state again: release all, restart comparing."""
        out: list[Action] = [Release(held.handle) for held in self._held.values()]
        self.released_at_checkpoint += len(out)
        self._held.clear()
        self._held_bytes = 0
        self._held_signalled = False
        for conn in list(self._conns.values()):
            conn.queue.clear()
            conn.decided = max(conn.decided, conn.primary_high)
            conn.primary.reset(conn.decided)
            # all of it, not just what is below: the secondary resumes from the
            # primary's state and sends its bytes afresh
            conn.secondary.reset(conn.decided)
            conn.state = _COMPARE_NEXT[(conn.state, _CompareEvent.CHECKPOINT)]
            self._maybe_forget(conn)
        self._secondary_bytes = 0
        return out

    def close(self, key: ConnKey) -> None:
        """Forget ``key``; its held packets, if any, go out at the next checkpoint."""
        conn = self._conns.get(key)
        if conn is not None:
            self._forget(conn, tombstone=False)

    # -- internals --------------------------------------------------------------------

    def _hold(
        self, handle: object, size: int, now: float, conn: _Conn | None, end: int | None
    ) -> int:
        self._serial += 1
        self._held[self._serial] = _Held(handle, now, size, end)
        self._held_bytes += size
        if conn is not None:
            conn.queue.append(self._serial)
        return self._serial

    def _syn_ack(
        self,
        handle: object,
        seg: TcpSegment,
        key: ConnKey,
        size: int,
        now: float,
        out: list[Action],
    ) -> None:
        old = self._conns.get(key)
        if old is not None and old.isn == seg.seq:
            out.append(Release(handle))  # a retransmitted SYN-ACK of a compared connection
            self.released_at_once += 1
            return
        if old is not None:
            self._forget(old, tombstone=False)  # the port pair is reused
        self._closed.pop(key, None)
        if not self.comparing:
            # the secondary may not have this connection: Remus semantics for all of it
            self._hold(handle, size, now, None, None)
            self._check_buffer(out)
            return
        start = len(seg.payload)  # TCP Fast Open data rides on the SYN-ACK
        self._conns[key] = _Conn(
            key=key,
            isn=seg.seq,
            decided=start,
            primary_high=start,
            last_active=now,
            primary=_Stream(start),
            secondary=_Stream(start),
        )
        while len(self._conns) > self.max_conns:
            self._forget(next(iter(self._conns.values())), tombstone=False)
            self.evicted_connections += 1
        out.append(Release(handle))
        self.released_at_once += 1

    def _untracked(
        self,
        handle: object,
        seg: TcpSegment,
        key: ConnKey,
        size: int,
        now: float,
        out: list[Action],
    ) -> None:
        tomb = self._closed.get(key)
        if tomb is not None:
            end = _unwrap(_offset32(seg.seq, tomb.isn), tomb.final) + len(seg.payload)
            if not seg.payload or end <= tomb.final:
                # the last ACKs, retransmitted FINs and data of a finished connection
                out.append(Release(handle))
                self.released_at_once += 1
                return
        self._hold(handle, size, now, None, None)
        self._check_buffer(out)

    def _advance(self, conn: _Conn, out: list[Action], fresh: int | None, now: float) -> None:
        """Compare what both sides have, then release what is decided, in order."""
        if conn.state is _Compare.COMPARING:
            self._compare(conn, out)
        # also right after a mismatch: what lies wholly below it matched (later
        # calls on a diverged connection do not come here)
        queue = conn.queue
        while queue:
            serial = queue[0]
            held = self._held[serial]
            if held.end is not None and held.end > conn.decided:
                break
            queue.popleft()
            del self._held[serial]
            self._held_bytes -= held.size
            out.append(Release(held.handle))
            self.match_waits.append(now - held.since)
            if serial == fresh:
                self.released_at_once += 1
            else:
                self.released_on_match += 1
        self._maybe_forget(conn)

    def _compare(self, conn: _Conn, out: list[Action]) -> None:
        p, s = conn.primary, conn.secondary
        n = min(len(p.data), len(s.data))
        if n == 0:
            return
        with memoryview(p.data) as vp, memoryview(s.data) as vs:
            equal = vp[:n] == vs[:n]
        same = n if equal else _common_prefix(p.data, s.data, n)
        p.consume(same)
        s.consume(same)
        self._secondary_bytes -= same
        conn.decided += same
        self.matched_bytes += same
        if not equal:
            conn.state = _COMPARE_NEXT[(conn.state, _CompareEvent.MISMATCH)]
            self.mismatches += 1
            self._secondary_bytes -= s.buffered
            p.reset(conn.decided)  # nothing is compared until the checkpoint
            s.reset(conn.decided)
            out.append(CheckpointNeeded("divergence", conn.key))

    def _maybe_forget(self, conn: _Conn) -> None:
        if conn.queue:
            return
        if conn.life is _Life.RESET or (
            conn.life is _Life.FIN_SENT and conn.fin_at is not None and conn.decided >= conn.fin_at
        ):
            self._forget(conn, tombstone=True)

    def _forget(self, conn: _Conn, *, tombstone: bool) -> None:
        # held packets of a forgotten connection stay in self._held: only the
        # checkpoint can release them now
        del self._conns[conn.key]
        self._secondary_bytes -= conn.secondary.buffered
        if tombstone:
            self._closed[conn.key] = _Tombstone(conn.isn, conn.decided)
            self._closed.move_to_end(conn.key)
            while len(self._closed) > self.TOMBSTONES:
                self._closed.popitem(last=False)

    def _expire_idle(self, now: float) -> None:
        for _ in range(len(self._conns)):
            conn = next(iter(self._conns.values()))
            if now - conn.last_active <= self.idle_timeout:
                return
            if conn.queue:
                self._conns.move_to_end(conn.key)  # look again later
            else:
                self._forget(conn, tombstone=False)
            if not self._conns:
                return

    def _signal_held(self, out: list[Action]) -> None:
        if not self._held_signalled:
            self._held_signalled = True
            out.append(CheckpointNeeded("held", None))

    def _check_buffer(self, out: list[Action]) -> None:
        if self.buffered_bytes > self.max_buffer:
            self._signal_held(out)


# -- the rewriter ---------------------------------------------------------------------


class _Close(enum.Enum):
    OPEN = "open"
    CLIENT_FIN = "client-fin"
    GUEST_FIN = "guest-fin"
    BOTH_FIN = "both-fin"
    GONE = "gone"


class _CloseEvent(enum.Enum):
    CLIENT_FIN = "client-fin"
    GUEST_FIN = "guest-fin"
    OTHER = "other"  # a packet without FIN or RST
    RST = "rst"


# pairs not listed leave the phase unchanged
_CLOSE_NEXT: Final[dict[tuple[_Close, _CloseEvent], _Close]] = {
    (_Close.OPEN, _CloseEvent.CLIENT_FIN): _Close.CLIENT_FIN,
    (_Close.OPEN, _CloseEvent.GUEST_FIN): _Close.GUEST_FIN,
    (_Close.CLIENT_FIN, _CloseEvent.GUEST_FIN): _Close.BOTH_FIN,
    (_Close.GUEST_FIN, _CloseEvent.CLIENT_FIN): _Close.BOTH_FIN,
    # after both FINs the next packet without one is the last ACK
    (_Close.BOTH_FIN, _CloseEvent.OTHER): _Close.GONE,
    (_Close.OPEN, _CloseEvent.RST): _Close.GONE,
    (_Close.CLIENT_FIN, _CloseEvent.RST): _Close.GONE,
    (_Close.GUEST_FIN, _CloseEvent.RST): _Close.GONE,
    (_Close.BOTH_FIN, _CloseEvent.RST): _Close.GONE,
}


def _close_event(seg: TcpSegment, fin: _CloseEvent) -> _CloseEvent:
    if seg.flags & RST:
        return _CloseEvent.RST
    if seg.flags & FIN:
        return fin
    return _CloseEvent.OTHER


@dataclass(frozen=True)
class _Isn:
    isn: int
    tsval: int | None  # None: that copy's SYN-ACK had no timestamp option


@dataclass(eq=False)
class _RConn:
    client_isn: int
    primary: _Isn | None = None
    secondary: _Isn | None = None
    # the secondary guest's next sequence number (after the highest it sent)
    secondary_next: int | None = None
    # secondary stream offset - primary stream offset, mod 2**32 (see realign)
    shift: int = 0
    close: _Close = _Close.OPEN
    pending: list[bytes] = field(default_factory=list)
    last_used: float | None = None  # the last tick() before its last mirrored packet


class Rewriter:
    """Moves mirrored client packets into the secondary guest's sequence space (sans I/O).

    The secondary guest sits on its own /30 link whose only peer is
    ``host_ip``: mirrored packets get that source and ``guest_ip`` as
    destination. Its SYN-ACK (and the primary's, reported over the network)
    give the ISN and TSval offsets that the client's ACK numbers, SACK
    blocks and TSecr need; packets that arrive before both are known wait
    (at most ``max_pending`` per connection).

    Memory stays bounded: a connection is forgotten after its FINs and last
    ACK or an RST, after ``idle_timeout`` without a mirrored packet (as the
    comparer forgets it), and the least recently used one past
    ``max_conns``; primary SYN-ACKs waiting for their mirrored SYN, a race
    of a round trip, at most ``max_early``. Time comes in through
    :meth:`tick` only, which the adapter calls at each checkpoint.
    """

    def __init__(
        self,
        guest_ip: bytes,
        host_ip: bytes,
        mtu: int = 1500,
        *,
        max_pending: int = 64,
        max_conns: int = 16384,  # as the comparer (and QEMU's filter-rewriter)
        max_early: int = 1024,
        idle_timeout: float = 7200.0,
    ) -> None:
        if len(guest_ip) != 4 or len(host_ip) != 4:
            raise ValueError("guest_ip and host_ip must be 4-byte IPv4 addresses")
        self.guest_ip = guest_ip
        self.host_ip = host_ip
        self.mtu = mtu
        self.max_pending = max_pending
        self.max_conns = max_conns
        self.max_early = max_early
        self.idle_timeout = idle_timeout
        self.injected = 0
        self.reported_bytes = 0
        self.dropped_unknown = 0
        self.dropped_pending = 0
        self.dropped_malformed = 0
        self.expired_connections = 0  # idle, or evicted past max_conns
        self._now: float | None = None  # the last tick's time; None before the first
        self._conns: OrderedDict[ConnKey, _RConn] = OrderedDict()  # least recently used first
        # primary SYN-ACKs that came before the mirrored SYN
        self._early: OrderedDict[ConnKey, _Isn] = OrderedDict()

    @property
    def pending(self) -> int:
        return sum(len(c.pending) for c in self._conns.values())

    @property
    def connections(self) -> int:
        return len(self._conns)

    def primary_syn_ack(self, key: ConnKey, isn: int, tsval: int | None) -> list[RewriterAction]:
        """The primary guest's ISN and SYN-ACK TSval for ``key``."""
        info = _Isn(isn, tsval)
        conn = self._conns.get(key)
        if conn is None or (conn.primary is not None and conn.primary.isn != isn):
            # for a SYN not mirrored yet (a different ISN means a new connection
            # on the same ports, whose SYN restarts the state when it comes)
            self._early[key] = info
            self._early.move_to_end(key)
            while len(self._early) > self.max_early:
                self._early.popitem(last=False)
            return []
        if conn.primary is not None:
            return []  # a retransmitted SYN-ACK: keep the first TSval, as the ISN is the same
        conn.primary = info
        return self._flush(key, conn)

    def mirrored(self, packet: bytes) -> list[RewriterAction]:
        """A copy of a packet from a client to the primary guest."""
        try:
            seg = parse_tcp(packet)
        except PacketError:
            self.dropped_malformed += 1
            return []
        if seg is None:
            return self._inject(rewrite(packet, src=self.host_ip, dst=self.guest_ip))
        key = (seg.sport, seg.dport)
        conn = self._conns.get(key)
        if seg.is_syn:
            if conn is None or conn.client_isn != seg.seq:
                if conn is not None:
                    self.dropped_pending += len(conn.pending)
                conn = _RConn(client_isn=seg.seq, primary=self._early.pop(key, None))
                self._conns[key] = conn
            self._touch(key)
            return self._inject(rewrite(packet, src=self.host_ip, dst=self.guest_ip))
        if conn is None:
            self.dropped_unknown += 1
            return []
        self._touch(key)
        if conn.primary is None or conn.secondary is None:
            if len(conn.pending) >= self.max_pending:
                self.dropped_pending += 1  # the client retransmits it
            else:
                conn.pending.append(packet)
            return []
        return self._forward(key, conn, packet, seg)

    def secondary_output(self, packet: bytes) -> list[RewriterAction]:
        """A packet the secondary guest sent (to ``host_ip``); it goes nowhere else."""
        try:
            seg = parse_tcp(packet)
        except PacketError:
            self.dropped_malformed += 1
            return []
        if seg is None:
            return []
        key = (seg.dport, seg.sport)
        conn = self._conns.get(key)
        if conn is None:
            return []
        out: list[RewriterAction] = []
        end = (seg.seq + seg.seq_len) % _MOD32
        if conn.secondary_next is None or (end - conn.secondary_next) % _MOD32 < _HALF32:
            conn.secondary_next = end
        if seg.is_syn_ack and (conn.secondary is None or conn.secondary.isn != seg.seq):
            conn.secondary = _Isn(seg.seq, seg.tsval)
            out += self._flush(key, conn)
        if seg.payload and conn.secondary is not None:
            offset = (_offset32(seg.seq, conn.secondary.isn) - conn.shift) % _MOD32
            out.append(Report(key, offset, seg.payload))
            self.reported_bytes += len(seg.payload)
        self._step_close(key, conn, _close_event(seg, _CloseEvent.GUEST_FIN))
        return out

    def realign(self, key: ConnKey, primary_end: int) -> None:
        """The secondary guest loaded a checkpoint at which the primary's output on
        ``key`` ended at stream offset ``primary_end`` (mod 2**32).

        A real guest's TCP state is in its memory, so a checkpoint rewinds (or
        advances) the secondary's sequence numbers to the primary's, as QEMU's
        filter-rewriter assumes when it resets its offsets. This simulated guest's
        TCP lives in its host kernel, which a checkpoint does not touch: what the
        secondary sent before stays sent, and its next byte, which is the
        primary's byte ``primary_end``, goes out at its own next sequence number.
        From now on its offsets are shifted by the difference, both ways.
        """
        conn = self._conns.get(key)
        if conn is None or conn.secondary is None or conn.secondary_next is None:
            return
        sent = (conn.secondary_next - conn.secondary.isn - 1) % _MOD32
        conn.shift = (sent - primary_end) % _MOD32

    def tick(self, now: float) -> None:
        """Forget connections without a mirrored packet for ``idle_timeout``."""
        if self._now is None:
            # the first tick: what came before it was used "now", not at time 0
            for conn in self._conns.values():
                conn.last_used = now
        self._now = now
        while self._conns:
            conn = next(iter(self._conns.values()))  # the least recently used
            used = now if conn.last_used is None else conn.last_used
            if now - used <= self.idle_timeout:
                return
            self._conns.popitem(last=False)
            self.dropped_pending += len(conn.pending)
            self.expired_connections += 1

    # -- internals --------------------------------------------------------------------

    def _touch(self, key: ConnKey) -> None:
        conn = self._conns[key]
        conn.last_used = self._now
        self._conns.move_to_end(key)
        while len(self._conns) > self.max_conns:
            _, evicted = self._conns.popitem(last=False)
            self.dropped_pending += len(evicted.pending)
            self.expired_connections += 1

    def _inject(self, packet: bytes) -> list[RewriterAction]:
        pieces = segment(packet, self.mtu)
        self.injected += len(pieces)
        return [Inject(p) for p in pieces]

    def _deltas(self, conn: _RConn) -> tuple[int, int]:
        assert conn.primary is not None and conn.secondary is not None
        ack_delta = conn.secondary.isn - conn.primary.isn + conn.shift
        if conn.primary.tsval is None or conn.secondary.tsval is None:
            return ack_delta, 0
        return ack_delta, conn.secondary.tsval - conn.primary.tsval

    def _forward(
        self, key: ConnKey, conn: _RConn, packet: bytes, seg: TcpSegment
    ) -> list[RewriterAction]:
        ack_delta, tsecr_delta = self._deltas(conn)
        nxt = conn.secondary_next
        beyond = (seg.ack + ack_delta - nxt) % _MOD32 if nxt is not None else 0
        if nxt is not None and seg.has_ack and 0 < beyond < _HALF32:
            # The client acknowledges the primary's bytes. Where the primary has
            # sent more than the secondary (their replies differed in length, and
            # this simulated guest's kernel does not rewind at a checkpoint as a
            # real guest's TCP state would), the shifted ACK would cover bytes the
            # secondary never sent, and Linux discards a segment with such an ACK,
            # data and all, which would stall the copy. Acknowledge what it sent.
            ack_delta = (nxt - seg.ack) % _MOD32
        shifted = rewrite(
            packet,
            src=self.host_ip,
            dst=self.guest_ip,
            ack_delta=ack_delta,
            tsecr_delta=tsecr_delta,
        )
        out = self._inject(shifted)
        self._step_close(key, conn, _close_event(seg, _CloseEvent.CLIENT_FIN))
        return out

    def _flush(self, key: ConnKey, conn: _RConn) -> list[RewriterAction]:
        if conn.primary is None or conn.secondary is None or not conn.pending:
            return []
        waiting, conn.pending = conn.pending, []
        out: list[RewriterAction] = []
        for packet in waiting:
            seg = parse_tcp(packet)  # parsed once already: well-formed TCP
            assert seg is not None
            out += self._forward(key, conn, packet, seg)
            if self._conns.get(key) is not conn:
                break  # an RST or the last ACK ended it
        return out

    def _step_close(self, key: ConnKey, conn: _RConn, event: _CloseEvent) -> None:
        conn.close = _CLOSE_NEXT.get((conn.close, event), conn.close)
        if conn.close is _Close.GONE and self._conns.get(key) is conn:
            del self._conns[key]
