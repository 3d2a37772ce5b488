"""IPv4 and TCP packets, sans I/O: parse, check, rewrite, split and build.

The COLO network path handles packets as the kernel hands them over
(NFQUEUE, AF_PACKET): bytes that start with an IPv4 header. Everything here
takes bytes and returns bytes or values; nothing reads a socket or a clock.

Checksums are always recomputed from scratch, never updated incrementally:
a packet captured before the NIC (or veth) would finish it carries only the
partial pseudo-header sum of checksum offload, and an incremental update of
a wrong checksum stays wrong.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

# TCP flags
FIN: Final = 0x01
SYN: Final = 0x02
RST: Final = 0x04
PSH: Final = 0x08
ACK: Final = 0x10
URG: Final = 0x20
ECE: Final = 0x40
CWR: Final = 0x80

PROTO_ICMP: Final = 1
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17

_OPT_EOL: Final = 0
_OPT_NOP: Final = 1
_OPT_SACK: Final = 5
_OPT_TIMESTAMP: Final = 8

_IP_DF: Final = 0x4000
_IP_MF: Final = 0x2000
_IP_OFFSET_MASK: Final = 0x1FFF

_MOD32: Final = 1 << 32


class PacketError(ValueError):
    """A packet that is not a well-formed, unfragmented IPv4 packet."""


# -- checksums ------------------------------------------------------------------------


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of ``data``, as the 16-bit value to store.

    The one's-complement sum of 16-bit words equals the big-endian integer of
    the data modulo 0xffff, because 2**16 is 1 modulo 0xffff; ``int.from_bytes``
    and one big-integer remainder do that in C, with no per-byte Python loop
    and no byte-order fix-up. Odd lengths are padded with a zero byte.
    """
    view = memoryview(data).cast("B")
    n = int.from_bytes(view, "big")
    if len(view) & 1:
        n <<= 8
    if n == 0:
        return 0xFFFF
    folded = n % 0xFFFF or 0xFFFF  # a nonzero sum folds to 0xffff, never to 0
    return ~folded & 0xFFFF


def _sum_is_ffff(data: bytes | bytearray | memoryview) -> bool:
    # a region that includes its own correct checksum sums to 0xffff (-0)
    return checksum(data) == 0


# -- the IPv4 header ------------------------------------------------------------------


def _ipv4_header(packet: bytes | bytearray, *, fragments_ok: bool = False) -> tuple[int, int, int]:
    """Validate the IPv4 header; return (header length, total length, protocol)."""
    if len(packet) < 20:
        raise PacketError(f"truncated IPv4 header: {len(packet)} bytes, need 20 at offset 0")
    version = packet[0] >> 4
    if version != 4:
        raise PacketError(f"not IPv4: version {version} at offset 0")
    hlen = (packet[0] & 0x0F) * 4
    if hlen < 20:
        raise PacketError(f"IPv4 header length {hlen} < 20 at offset 0")
    total = int.from_bytes(packet[2:4], "big")
    if total < hlen:
        raise PacketError(f"IPv4 total length {total} < header length {hlen} at offset 2")
    if total > len(packet):
        raise PacketError(
            f"truncated IPv4 packet: total length {total} at offset 2, only {len(packet)} bytes"
        )
    frag = int.from_bytes(packet[6:8], "big")
    if not fragments_ok and frag & (_IP_MF | _IP_OFFSET_MASK):
        raise PacketError(
            f"IPv4 fragment (flags/offset 0x{frag:04x} at offset 6) cannot be handled"
        )
    return hlen, total, packet[9]


def ip_protocol(packet: bytes) -> int:
    """The IP protocol number of an IPv4 packet (fragments allowed)."""
    return _ipv4_header(packet, fragments_ok=True)[2]


def ip_checksum_ok(packet: bytes) -> bool:
    hlen, _, _ = _ipv4_header(packet, fragments_ok=True)
    return _sum_is_ffff(memoryview(packet)[:hlen])


def _pseudo_header(packet: bytes | bytearray, proto: int, length: int) -> bytes:
    return bytes(packet[12:20]) + struct.pack("!BBH", 0, proto, length)


def _transport_sum_ok(packet: bytes | bytearray, hlen: int, total: int, proto: int) -> bool:
    pseudo = _pseudo_header(packet, proto, total - hlen)
    return _sum_is_ffff(pseudo + bytes(packet[hlen:total]))


def tcp_checksum_ok(packet: bytes) -> bool:
    """Whether the TCP checksum (over pseudo-header and segment) is correct."""
    hlen, total, proto = _ipv4_header(packet)
    if proto != PROTO_TCP:
        raise PacketError(f"not TCP: protocol {proto} at offset 9")
    _tcp_header_len(packet, hlen, total)
    return _transport_sum_ok(packet, hlen, total, PROTO_TCP)


# -- TCP ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TcpSegment:
    src: bytes
    dst: bytes
    ihl: int  # in 32-bit words, as on the wire
    ip_id: int
    ttl: int
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    options: bytes
    payload: bytes
    tsval: int | None = None
    tsecr: int | None = None
    urgent: int = 0

    def has(self, flag: int) -> bool:
        return self.flags & flag == flag

    @property
    def is_syn(self) -> bool:
        """A connection request: SYN without ACK."""
        return self.flags & (SYN | ACK) == SYN

    @property
    def is_syn_ack(self) -> bool:
        return self.flags & (SYN | ACK) == SYN | ACK

    @property
    def is_fin(self) -> bool:
        return bool(self.flags & FIN)

    @property
    def is_rst(self) -> bool:
        return bool(self.flags & RST)

    @property
    def has_ack(self) -> bool:
        return bool(self.flags & ACK)

    @property
    def seq_len(self) -> int:
        """Sequence space the segment occupies: payload, plus one each for SYN and FIN."""
        return len(self.payload) + (1 if self.flags & SYN else 0) + (1 if self.flags & FIN else 0)


def _tcp_header_len(packet: bytes | bytearray, hlen: int, total: int) -> int:
    if total - hlen < 20:
        raise PacketError(f"truncated TCP header: {total - hlen} bytes, need 20 at offset {hlen}")
    doff = (packet[hlen + 12] >> 4) * 4
    if doff < 20:
        raise PacketError(f"TCP data offset {doff} < 20 at offset {hlen + 12}")
    if hlen + doff > total:
        raise PacketError(
            f"TCP data offset {doff} at offset {hlen + 12} runs past the IPv4 total length {total}"
        )
    return doff


def _options(packet: bytes | bytearray, start: int, end: int) -> list[tuple[int, int, int]]:
    """TCP options in [start, end) as (kind, offset, length); EOL ends the list."""
    found: list[tuple[int, int, int]] = []
    i = start
    while i < end:
        kind = packet[i]
        if kind == _OPT_EOL:
            break
        if kind == _OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            raise PacketError(f"TCP option {kind} without a length byte at offset {i}")
        length = packet[i + 1]
        if length < 2 or i + length > end:
            raise PacketError(f"TCP option {kind} with bad length {length} at offset {i + 1}")
        found.append((kind, i, length))
        i += length
    return found


def _timestamp_at(packet: bytes | bytearray, opts: list[tuple[int, int, int]]) -> int | None:
    for kind, off, length in opts:
        if kind == _OPT_TIMESTAMP:
            if length != 10:
                raise PacketError(f"TCP timestamp option with length {length} at offset {off + 1}")
            return off
    return None


def parse_tcp(packet: bytes) -> TcpSegment | None:
    """The TCP segment in an IPv4 packet; None if it is well-formed IPv4 but not TCP.

    Bytes past the IPv4 total length (Ethernet padding, capture slack) are ignored.
    """
    hlen, total, proto = _ipv4_header(packet)
    if proto != PROTO_TCP:
        return None
    doff = _tcp_header_len(packet, hlen, total)
    sport, dport, seq, ack, _, flags, window, _, urgent = struct.unpack_from(
        "!HHIIBBHHH", packet, hlen
    )
    opts = _options(packet, hlen + 20, hlen + doff)
    ts = _timestamp_at(packet, opts)
    tsval = tsecr = None
    if ts is not None:
        tsval, tsecr = struct.unpack_from("!II", packet, ts + 2)
    return TcpSegment(
        src=bytes(packet[12:16]),
        dst=bytes(packet[16:20]),
        ihl=hlen // 4,
        ip_id=int.from_bytes(packet[4:6], "big"),
        ttl=packet[8],
        sport=sport,
        dport=dport,
        seq=seq,
        ack=ack,
        flags=flags,
        window=window,
        options=bytes(packet[hlen + 20 : hlen + doff]),
        payload=bytes(packet[hlen + doff : total]),
        tsval=tsval,
        tsecr=tsecr,
        urgent=urgent,
    )


# -- recomputing checksums ------------------------------------------------------------


def _fix_ip_checksum(buf: bytearray, hlen: int) -> None:
    buf[10:12] = b"\0\0"
    struct.pack_into("!H", buf, 10, checksum(memoryview(buf)[:hlen]))


def _fix_tcp_checksum(buf: bytearray, hlen: int, total: int) -> None:
    buf[hlen + 16 : hlen + 18] = b"\0\0"
    pseudo = _pseudo_header(buf, PROTO_TCP, total - hlen)
    struct.pack_into("!H", buf, hlen + 16, checksum(pseudo + bytes(buf[hlen:total])))


def _fix_udp_checksum(buf: bytearray, hlen: int, total: int) -> None:
    if total - hlen < 8:
        raise PacketError(f"truncated UDP header: {total - hlen} bytes, need 8 at offset {hlen}")
    if buf[hlen + 6 : hlen + 8] == b"\0\0":
        return  # the sender chose no checksum (RFC 768); keep it that way
    buf[hlen + 6 : hlen + 8] = b"\0\0"
    pseudo = _pseudo_header(buf, PROTO_UDP, total - hlen)
    value = checksum(pseudo + bytes(buf[hlen:total]))
    # 0 on the wire means "no checksum", so a computed 0 is sent as its equal, 0xffff
    struct.pack_into("!H", buf, hlen + 6, value or 0xFFFF)


# -- rewriting ------------------------------------------------------------------------


def _check_addr(name: str, addr: bytes | None) -> None:
    if addr is not None and len(addr) != 4:
        raise ValueError(f"{name} must be 4 bytes, got {len(addr)}")


def rewrite(
    packet: bytes,
    *,
    src: bytes | None = None,
    dst: bytes | None = None,
    ack_delta: int = 0,
    tsecr_delta: int = 0,
) -> bytes:
    """A copy of ``packet`` with addresses replaced and ACK-side numbers shifted.

    For TCP with the ACK flag set, the acknowledgement number and the SACK block
    edges (both name bytes of the peer's sequence space) move by ``ack_delta``,
    and the timestamp option's TSecr (the peer's TSval echoed; meaningful only
    with ACK set, RFC 7323 3.2) moves by ``tsecr_delta``; all modulo 2**32.
    The IPv4 header checksum and the TCP or UDP checksum are recomputed from
    scratch. Bytes past the IPv4 total length are dropped.
    """
    _check_addr("src", src)
    _check_addr("dst", dst)
    hlen, total, proto = _ipv4_header(packet)
    buf = bytearray(packet[:total])
    if src is not None:
        buf[12:16] = src
    if dst is not None:
        buf[16:20] = dst
    if proto == PROTO_TCP:
        doff = _tcp_header_len(buf, hlen, total)
        opts = _options(buf, hlen + 20, hlen + doff)
        if buf[hlen + 13] & ACK:
            if ack_delta:
                _shift32(buf, hlen + 8, ack_delta)
                for kind, off, length in opts:
                    if kind == _OPT_SACK:
                        if (length - 2) % 8:
                            raise PacketError(
                                f"TCP SACK option with length {length} at offset {off + 1}"
                            )
                        for edge in range(off + 2, off + length, 4):
                            _shift32(buf, edge, ack_delta)
            if tsecr_delta:
                ts = _timestamp_at(buf, opts)
                if ts is not None:
                    _shift32(buf, ts + 6, tsecr_delta)
        _fix_tcp_checksum(buf, hlen, total)
    elif proto == PROTO_UDP:
        _fix_udp_checksum(buf, hlen, total)
    _fix_ip_checksum(buf, hlen)
    return bytes(buf)


def _shift32(buf: bytearray, off: int, delta: int) -> None:
    (value,) = struct.unpack_from("!I", buf, off)
    struct.pack_into("!I", buf, off, (value + delta) % _MOD32)


# -- segmentation ---------------------------------------------------------------------


def segment(packet: bytes, mtu: int) -> list[bytes]:
    """Split a TCP packet longer than ``mtu`` (a GSO/GRO super-packet) into MTU-sized ones.

    Each piece repeats the IP and TCP headers (options included, as GSO does),
    advances seq by the payload before it and the IP id by one per piece; FIN
    and PSH stay on the last piece only and CWR on the first only (the kernel's
    GSO does the same). A packet that fits, and any non-TCP packet (splitting
    one would need IP fragmentation, which is not ours to do), comes back as is.
    """
    hlen, total, proto = _ipv4_header(packet)
    if total <= mtu or proto != PROTO_TCP:
        return [packet]
    doff = _tcp_header_len(packet, hlen, total)
    header = hlen + doff
    mss = mtu - header
    if mss <= 0:
        raise ValueError(f"mtu {mtu} leaves no room for payload after {header} header bytes")
    payload = memoryview(packet)[header:total]
    seq = int.from_bytes(packet[hlen + 4 : hlen + 8], "big")
    ip_id = int.from_bytes(packet[4:6], "big")
    flags = packet[hlen + 13]
    pieces: list[bytes] = []
    starts = range(0, len(payload), mss)
    for i, start in enumerate(starts):
        chunk = payload[start : start + mss]
        buf = bytearray(packet[:header])
        buf += chunk
        struct.pack_into("!H", buf, 2, len(buf))
        struct.pack_into("!H", buf, 4, (ip_id + i) & 0xFFFF)
        struct.pack_into("!I", buf, hlen + 4, (seq + start) % _MOD32)
        piece_flags = flags
        if i != len(starts) - 1:
            piece_flags &= ~(FIN | PSH)
        if i != 0:
            piece_flags &= ~CWR
        buf[hlen + 13] = piece_flags
        _fix_tcp_checksum(buf, hlen, len(buf))
        _fix_ip_checksum(buf, hlen)
        pieces.append(bytes(buf))
    return pieces


# -- building -------------------------------------------------------------------------


def timestamp_option(tsval: int, tsecr: int = 0) -> bytes:
    """NOP, NOP, timestamps: the 12-byte form Linux sends."""
    return struct.pack("!BBBBII", _OPT_NOP, _OPT_NOP, _OPT_TIMESTAMP, 10, tsval, tsecr)


def sack_option(blocks: list[tuple[int, int]]) -> bytes:
    """NOP, NOP, SACK with (left, right) edges."""
    body = b"".join(struct.pack("!II", left, right) for left, right in blocks)
    return struct.pack("!BBBB", _OPT_NOP, _OPT_NOP, _OPT_SACK, 2 + len(body)) + body


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def build_ipv4(
    *,
    src: bytes,
    dst: bytes,
    proto: int,
    body: bytes,
    ip_id: int = 0,
    ttl: int = 64,
    tos: int = 0,
    df: bool = True,
    ip_options: bytes = b"",
    ihl: int | None = None,
) -> bytes:
    """An IPv4 packet around ``body`` with a correct header checksum."""
    _check_addr("src", src)
    _check_addr("dst", dst)
    opts = _pad4(ip_options)
    words = 5 + len(opts) // 4
    if ihl is not None:
        if ihl < words or ihl > 15:
            raise ValueError(f"ihl {ihl} cannot hold {len(opts)} option bytes (or exceeds 15)")
        opts += b"\0" * ((ihl - words) * 4)
        words = ihl
    if words > 15:
        raise ValueError(f"{len(opts)} IPv4 option bytes exceed the 40 an IHL can hold")
    total = words * 4 + len(body)
    if total > 0xFFFF:
        raise ValueError(f"IPv4 packet of {total} bytes exceeds 65535")
    buf = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | words,
            tos,
            total,
            ip_id & 0xFFFF,
            _IP_DF if df else 0,
            ttl,
            proto,
            0,
            src,
            dst,
        )
    )
    buf += opts
    buf += body
    _fix_ip_checksum(buf, words * 4)
    return bytes(buf)


def build_tcp(
    *,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int = 0,
    ack: int = 0,
    flags: int = ACK,
    window: int = 65535,
    options: bytes = b"",
    payload: bytes = b"",
    tsval: int | None = None,
    tsecr: int | None = None,
    urgent: int = 0,
    ip_id: int = 0,
    ttl: int = 64,
    ihl: int | None = None,
    ip_options: bytes = b"",
    df: bool = True,
) -> bytes:
    """A valid IPv4/TCP packet with correct checksums.

    ``tsval`` (with ``tsecr``, default 0) appends a timestamp option after
    ``options``; options are padded to a 32-bit boundary with EOL bytes.
    """
    opts = options
    if tsval is not None:
        opts += timestamp_option(tsval, tsecr or 0)
    elif tsecr is not None:
        raise ValueError("tsecr needs tsval")
    opts = _pad4(opts)
    if len(opts) > 40:
        raise ValueError(f"{len(opts)} TCP option bytes exceed the 40 a data offset can hold")
    doff = 5 + len(opts) // 4
    tcp = bytearray(
        struct.pack(
            "!HHIIBBHHH",
            sport,
            dport,
            seq % _MOD32,
            ack % _MOD32,
            doff << 4,
            flags,
            window,
            0,
            urgent,
        )
    )
    tcp += opts
    tcp += payload
    packet = bytearray(
        build_ipv4(
            src=src,
            dst=dst,
            proto=PROTO_TCP,
            body=bytes(tcp),
            ip_id=ip_id,
            ttl=ttl,
            df=df,
            ip_options=ip_options,
            ihl=ihl,
        )
    )
    hlen = (packet[0] & 0x0F) * 4
    _fix_tcp_checksum(packet, hlen, len(packet))
    return bytes(packet)


def build_udp(
    *,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    payload: bytes = b"",
    ip_id: int = 0,
    ttl: int = 64,
    with_checksum: bool = True,
) -> bytes:
    """A valid IPv4/UDP packet (checksum 0, meaning none, unless ``with_checksum``)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0xFFFF if with_checksum else 0)
    packet = bytearray(
        build_ipv4(src=src, dst=dst, proto=PROTO_UDP, body=udp + payload, ip_id=ip_id, ttl=ttl)
    )
    # a nonzero placeholder makes _fix_udp_checksum compute the real one
    _fix_udp_checksum(packet, 20, len(packet))
    return bytes(packet)
