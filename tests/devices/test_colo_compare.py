"""ippacket (parse, checksums, rewrite, segment) and colo_compare (comparer, rewriter)."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.devices import ippacket as ip
from orchestrator.devices.colo_compare import (
    Action,
    CheckpointNeeded,
    Inject,
    OutputComparer,
    Release,
    Report,
    Rewriter,
    RewriterAction,
    syn_ack_info,
)

CLIENT = bytes([192, 0, 2, 7])
GUEST = bytes([198, 51, 100, 10])
HOST = bytes([10, 255, 0, 1])  # the secondary host's end of the guest's /30
SGUEST = bytes([10, 255, 0, 2])
CPORT, GPORT = 40000, 80
KEY = (CPORT, GPORT)
MOD = 1 << 32

# -- reference checksum and real vectors ----------------------------------------------


def slow_checksum(data: bytes) -> int:
    """RFC 1071 done the long way: add 16-bit big-endian words, fold carries, invert."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        while total > 0xFFFF:
            total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# Captured from Linux 6.x: a socket in a private network namespace connected
# to 10.9.0.2:8080 through a TUN device (no offload, so the kernel computed
# every checksum in full), read from the TUN fd.
KERNEL_SYN = bytes.fromhex(
    "4500003cb1474000400675600a0900010a090002b92c1f90a1bf92f200000000"
    "a002faf040900000020405b40402080a4f169be2000000000103030a"
)
# The SYN-ACK written back into the TUN, made by build_tcp below; the kernel
# accepted it (a bad checksum is dropped silently) and answered with KERNEL_ACK.
ACCEPTED_SYN_ACK = bytes.fromhex(
    "4500003800004000400626ac0a0900020a0900011f90b92c000003e8a1bf92f3"
    "9012ffff4b910000020405b40101080a000003094f169be2"
)
KERNEL_ACK = bytes.fromhex(
    "45000034b1484000400675670a0900010a090002b92c1f90a1bf92f3000003e9"
    "8010faf0685c00000101080a4f169be300000309"
)
# odd TCP length (11 payload bytes): exercises the checksum's zero padding
KERNEL_DATA = bytes.fromhex(
    "4500003fb14940004006755b0a0900010a090002b92c1f90a1bf92f3000003e9"
    "8018faf04a7800000101080a4f169be30000030968656c6c6f20636f6c6f0a"
)
KERNEL_VECTORS = [KERNEL_SYN, ACCEPTED_SYN_ACK, KERNEL_ACK, KERNEL_DATA]


def test_rfc1071_worked_example() -> None:
    # RFC 1071 section 3: these bytes sum to 0xddf2, so the checksum is 0x220d
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert ip.checksum(data) == 0x220D == slow_checksum(data)


def test_ipv4_header_known_vector() -> None:
    # the widely quoted example header (192.168.0.1 -> 192.168.0.199, UDP): checksum 0xb861
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert ip.checksum(header) == 0xB861


@given(st.binary(max_size=3000))
def test_checksum_matches_reference(data: bytes) -> None:
    expected = slow_checksum(data)
    assert ip.checksum(data) == expected
    assert ip.checksum(bytearray(data)) == expected
    assert ip.checksum(memoryview(b"xx" + data)[2:]) == expected


def test_checksum_edge_cases() -> None:
    assert ip.checksum(b"") == 0xFFFF
    assert ip.checksum(b"\0" * 7) == 0xFFFF
    assert ip.checksum(b"\xff\xff") == slow_checksum(b"\xff\xff") == 0
    assert ip.checksum(b"\xff\xff" * 1000) == 0


@pytest.mark.parametrize("packet", KERNEL_VECTORS)
def test_kernel_vectors_check(packet: bytes) -> None:
    assert ip.ip_checksum_ok(packet)
    assert ip.tcp_checksum_ok(packet)
    for bit in range(20 * 8, len(packet) * 8):  # any single-bit error in the segment shows
        broken = bytearray(packet)
        broken[bit // 8] ^= 1 << (bit % 8)
        # a flip in the data offset makes the packet malformed rather than miscounted
        with contextlib.suppress(ip.PacketError):
            assert not ip.tcp_checksum_ok(bytes(broken))


def test_kernel_vectors_parse() -> None:
    syn = ip.parse_tcp(KERNEL_SYN)
    assert syn is not None and syn.is_syn and not syn.is_syn_ack
    assert (syn.sport, syn.dport, syn.seq) == (0xB92C, 8080, 0xA1BF92F2)
    assert (syn.tsval, syn.tsecr) == (0x4F169BE2, 0)
    data = ip.parse_tcp(KERNEL_DATA)
    assert data is not None and data.payload == b"hello colo\n"
    assert data.flags == ip.ACK | ip.PSH and (data.tsval, data.tsecr) == (0x4F169BE3, 777)
    assert data.src == bytes([10, 9, 0, 1]) and data.ihl == 5 and data.ttl == 64


def test_build_tcp_reproduces_the_accepted_syn_ack() -> None:
    built = ip.build_tcp(
        src=bytes([10, 9, 0, 2]),
        dst=bytes([10, 9, 0, 1]),
        sport=8080,
        dport=0xB92C,
        seq=1000,
        ack=0xA1BF92F3,
        flags=ip.SYN | ip.ACK,
        options=bytes.fromhex("020405b4"),
        tsval=777,
        tsecr=0x4F169BE2,
    )
    assert built == ACCEPTED_SYN_ACK


# -- parsing errors -------------------------------------------------------------------


def _tcp(**kw: object) -> bytes:
    fields: dict[str, object] = {"src": CLIENT, "dst": GUEST, "sport": CPORT, "dport": GPORT}
    fields.update(kw)
    return ip.build_tcp(**fields)  # type: ignore[arg-type]


def test_parse_rejects_malformed() -> None:
    good = _tcp(payload=b"abc", seq=5)
    cases: list[tuple[bytes, str]] = [
        (good[:10], "truncated IPv4 header"),
        (b"\x60" + good[1:], "not IPv4: version 6 at offset 0"),
        (b"\x44" + good[1:], "header length 16"),
        (good[:2] + struct.pack("!H", len(good) + 1) + good[4:], "truncated IPv4 packet"),
        (good[:2] + struct.pack("!H", 19) + good[4:], "total length 19"),
        (good[:6] + b"\x20\x00" + good[8:], "fragment"),  # MF
        (good[:6] + b"\x00\x05" + good[8:], "fragment"),  # offset
        (good[:2] + struct.pack("!H", 30) + good[4:], "truncated TCP header"),
        (good[:32] + b"\x40" + good[33:], "TCP data offset 16 < 20 at offset 32"),
        (good[:32] + b"\xf0" + good[33:], "runs past"),
    ]
    for packet, message in cases:
        with pytest.raises(ip.PacketError, match=message):
            ip.parse_tcp(packet)


def test_parse_rejects_bad_options() -> None:
    for opts, message in [
        (b"\x01\x01\x01\x02", "without a length byte at offset 43"),
        (b"\x02\x01\x00\x00", "bad length 1 at offset 41"),
        (b"\x02\x08\x00\x00", "bad length 8"),
        (b"\x08\x06\x00\x00\x00\x00\x00\x00", "timestamp option with length 6"),
    ]:
        with pytest.raises(ip.PacketError, match=message):
            ip.parse_tcp(_tcp(options=opts))


def test_parse_trailing_bytes_non_tcp_and_protocol() -> None:
    packet = _tcp(payload=b"xyz")
    seg = ip.parse_tcp(packet + b"\0" * 6)  # Ethernet padding
    assert seg is not None and seg.payload == b"xyz"
    assert ip.tcp_checksum_ok(packet + b"junk")
    udp = ip.build_udp(src=CLIENT, dst=GUEST, sport=1, dport=2, payload=b"q")
    assert ip.parse_tcp(udp) is None
    assert ip.ip_protocol(udp) == ip.PROTO_UDP and ip.ip_protocol(packet) == ip.PROTO_TCP
    fragment = udp[:6] + b"\x20\x00" + udp[8:]
    assert ip.ip_protocol(fragment) == ip.PROTO_UDP
    with_ip_options = _tcp(ihl=6, payload=b"p")
    seg = ip.parse_tcp(with_ip_options)
    assert seg is not None and seg.ihl == 6 and seg.payload == b"p"
    assert ip.tcp_checksum_ok(with_ip_options) and ip.ip_checksum_ok(with_ip_options)


# -- build / parse / rewrite round trips ----------------------------------------------

u32 = st.integers(0, MOD - 1)
u16 = st.integers(0, 0xFFFF)
addr = st.binary(min_size=4, max_size=4)
flag_sets = st.integers(0, 0xFF)


@st.composite
def tcp_fields(draw: st.DrawFn) -> dict[str, object]:
    with_ts = draw(st.booleans())
    return {
        "src": draw(addr),
        "dst": draw(addr),
        "sport": draw(u16),
        "dport": draw(u16),
        "seq": draw(u32),
        "ack": draw(u32),
        "flags": draw(flag_sets),
        "window": draw(u16),
        "payload": draw(st.binary(max_size=300)),
        "tsval": draw(u32) if with_ts else None,
        "tsecr": draw(u32) if with_ts else None,
        "ip_id": draw(u16),
        "ttl": draw(st.integers(1, 255)),
        "options": draw(st.sampled_from([b"", bytes.fromhex("020405b4"), b"\x01\x01\x04\x02"])),
    }


@given(tcp_fields())
def test_build_parse_round_trip(fields: dict[str, object]) -> None:
    packet = ip.build_tcp(**fields)  # type: ignore[arg-type]
    assert ip.tcp_checksum_ok(packet) and ip.ip_checksum_ok(packet)
    seg = ip.parse_tcp(packet)
    assert seg is not None
    for name in ("src", "dst", "sport", "dport", "seq", "ack", "flags", "window", "payload"):
        assert getattr(seg, name) == fields[name], name
    assert (seg.tsval, seg.tsecr) == (fields["tsval"], fields["tsecr"])
    assert (seg.ip_id, seg.ttl) == (fields["ip_id"], fields["ttl"])
    assert ip.rewrite(packet) == packet  # nothing to change: same bytes back


@given(tcp_fields(), addr, addr, st.integers(-(2**33), 2**33), st.integers(-(2**33), 2**33))
def test_rewrite_shifts(
    fields: dict[str, object], src: bytes, dst: bytes, ack_delta: int, tsecr_delta: int
) -> None:
    packet = ip.build_tcp(**fields)  # type: ignore[arg-type]
    out = ip.rewrite(packet, src=src, dst=dst, ack_delta=ack_delta, tsecr_delta=tsecr_delta)
    assert ip.tcp_checksum_ok(out) and ip.ip_checksum_ok(out)
    before, after = ip.parse_tcp(packet), ip.parse_tcp(out)
    assert before is not None and after is not None
    assert (after.src, after.dst) == (src, dst)
    has_ack = before.flags & ip.ACK
    assert after.ack == ((before.ack + ack_delta) % MOD if has_ack else before.ack)
    if before.tsecr is not None:
        assert after.tsecr == ((before.tsecr + tsecr_delta) % MOD if has_ack else before.tsecr)
    assert (after.seq, after.payload, after.tsval) == (before.seq, before.payload, before.tsval)


def test_rewrite_shifts_sack_edges_and_fixes_offload_checksums() -> None:
    sack = ip.sack_option([(100, 200), (MOD - 10, 5)])
    packet = bytearray(_tcp(ack=50, options=sack, tsval=1, tsecr=MOD - 1, payload=b"data"))
    packet[36:38] = b"\x12\x34"  # a partial (offload) TCP checksum, as captured
    packet[10:12] = b"\0\0"
    out = ip.rewrite(bytes(packet), ack_delta=20, tsecr_delta=2)
    assert ip.tcp_checksum_ok(out) and ip.ip_checksum_ok(out)
    seg = ip.parse_tcp(out)
    assert seg is not None and seg.ack == 70 and seg.tsecr == 1
    edges = struct.unpack_from("!4I", seg.options, 4)
    assert edges == (120, 220, 10, 25)


def test_rewrite_udp_and_icmp() -> None:
    udp = ip.build_udp(src=CLIENT, dst=GUEST, sport=53, dport=5353, payload=b"hello")
    out = ip.rewrite(udp, src=HOST, dst=SGUEST)
    assert out[12:20] == HOST + SGUEST and ip.ip_checksum_ok(out)
    pseudo = HOST + SGUEST + struct.pack("!BBH", 0, ip.PROTO_UDP, len(out) - 20)
    assert slow_checksum(pseudo + out[20:]) == 0
    bare = ip.build_udp(src=CLIENT, dst=GUEST, sport=1, dport=2, payload=b"x", with_checksum=False)
    assert ip.rewrite(bare, dst=SGUEST)[26:28] == b"\0\0"  # "no checksum" stays so
    icmp_body = b"\x08\x00\xf7\xff\x00\x00\x00\x00"
    icmp = ip.build_ipv4(src=CLIENT, dst=GUEST, proto=ip.PROTO_ICMP, body=icmp_body)
    out = ip.rewrite(icmp, src=HOST, dst=SGUEST)
    assert out[20:] == icmp_body and ip.ip_checksum_ok(out) and out[12:20] == HOST + SGUEST


@given(
    st.integers(0, 5000),
    st.integers(100, 1600),
    u32,
    flag_sets,
    st.booleans(),
    u16,
)
def test_segment(length: int, mtu: int, seq: int, flags: int, with_ts: bool, ip_id: int) -> None:
    payload = bytes(i % 251 for i in range(length))
    packet = _tcp(seq=seq, flags=flags, payload=payload, tsval=7 if with_ts else None, ip_id=ip_id)
    pieces = ip.segment(packet, mtu)
    if len(packet) <= mtu:
        assert pieces == [packet] and pieces[0] is packet
        return
    segs = [ip.parse_tcp(p) for p in pieces]
    assert all(s is not None for s in segs)
    joined = b""
    for i, (piece, seg) in enumerate(zip(pieces, segs, strict=True)):
        assert seg is not None
        assert len(piece) <= mtu and ip.tcp_checksum_ok(piece) and ip.ip_checksum_ok(piece)
        assert seg.seq == (seq + len(joined)) % MOD
        assert seg.ip_id == (ip_id + i) & 0xFFFF
        last = i == len(pieces) - 1
        assert bool(seg.flags & ip.FIN) == (last and bool(flags & ip.FIN))
        assert bool(seg.flags & ip.PSH) == (last and bool(flags & ip.PSH))
        assert seg.tsval == (7 if with_ts else None)
        joined += seg.payload
    assert joined == payload


def test_segment_non_tcp_and_too_small_mtu() -> None:
    udp = ip.build_udp(src=CLIENT, dst=GUEST, sport=1, dport=2, payload=b"u" * 3000)
    assert ip.segment(udp, 1500) == [udp]
    with pytest.raises(ValueError, match="no room"):
        ip.segment(_tcp(payload=b"x" * 100), 40)


# -- the comparer ---------------------------------------------------------------------

P_ISN = 0xFFFF_FF00  # the primary's stream offsets wrap past 2**32 soon
S_ISN = 12345


def p_pkt(
    offset: int, payload: bytes = b"", flags: int = ip.ACK | ip.PSH, isn: int = P_ISN
) -> bytes:
    """A packet the primary guest sends at stream ``offset``."""
    return ip.build_tcp(
        src=GUEST, dst=CLIENT, sport=GPORT, dport=CPORT, seq=isn + 1 + offset, ack=1,
        flags=flags, payload=payload,
    )  # fmt: skip


def syn_ack(isn: int = P_ISN, key: tuple[int, int] = KEY, tsval: int | None = None) -> bytes:
    return ip.build_tcp(
        src=GUEST, dst=CLIENT, sport=key[1], dport=key[0], seq=isn, ack=1,
        flags=ip.SYN | ip.ACK, tsval=tsval, tsecr=0 if tsval is not None else None,
    )  # fmt: skip


def released(actions: list[Action]) -> list[object]:
    return [a.handle for a in actions if isinstance(a, Release)]


def checkpoints(actions: list[Action]) -> list[CheckpointNeeded]:
    return [a for a in actions if isinstance(a, CheckpointNeeded)]


def compared(hold: float = 1.0, **kw: int) -> OutputComparer:
    c = OutputComparer(hold, **kw)
    c.comparing = True
    assert released(c.primary_packet("sa", syn_ack(), 0.0)) == ["sa"]
    return c


def test_syn_ack_info() -> None:
    assert syn_ack_info(syn_ack(tsval=99)) == (KEY, P_ISN, 99)
    assert syn_ack_info(syn_ack()) == (KEY, P_ISN, None)
    assert syn_ack_info(p_pkt(0, b"x")) is None
    assert syn_ack_info(b"\x45junk") is None


def test_matching_output_released_in_order() -> None:
    c = compared()
    assert c.primary_packet("a", p_pkt(0, b"hello "), 0.1) == []
    assert c.primary_packet("b", p_pkt(6, b"world"), 0.1) == []
    assert c.held_packets == 2
    assert released(c.secondary_output(KEY, 0, b"hel", 0.2)) == []
    assert released(c.secondary_output(KEY, 3, b"lo wor", 0.2)) == ["a"]
    assert released(c.secondary_output(KEY, 9, b"ld", 0.2)) == ["b"]
    assert c.held_packets == 0 and c.matched_bytes == 11 and c.released_on_match == 2
    # each waited from its arrival (0.1) to the secondary bytes that matched it (0.2)
    assert [round(w, 6) for w in c.match_waits] == [0.1, 0.1]


def test_output_the_secondary_sent_first_waits_nothing() -> None:
    c = compared()
    assert released(c.secondary_output(KEY, 0, b"hi", 0.5)) == []
    assert released(c.primary_packet("a", p_pkt(0, b"hi"), 0.7)) == ["a"]
    assert list(c.match_waits) == [0.0]


def test_secondary_ahead_releases_at_once() -> None:
    c = compared()
    c.secondary_output(KEY, 0, b"abcdef", 0.0)
    assert released(c.primary_packet("a", p_pkt(0, b"abc"), 0.1)) == ["a"]
    assert released(c.primary_packet("b", p_pkt(3, b"def"), 0.1)) == ["b"]
    assert c.released_at_once == 3  # with the SYN-ACK


def test_pure_acks_wait_for_earlier_data() -> None:
    c = compared()
    assert released(c.primary_packet("ack0", p_pkt(0, flags=ip.ACK), 0.0)) == ["ack0"]
    c.primary_packet("d", p_pkt(0, b"xy"), 0.0)
    assert c.primary_packet("ack1", p_pkt(2, flags=ip.ACK), 0.0) == []
    assert released(c.secondary_output(KEY, 0, b"xy", 0.0)) == ["d", "ack1"]


def test_mismatch_one_checkpoint_then_nothing_until_done() -> None:
    c = compared()
    c.primary_packet("a", p_pkt(0, b"same"), 0.0)
    c.primary_packet("b", p_pkt(4, b"DIFF"), 0.0)
    out = c.secondary_output(KEY, 0, b"samediff", 0.0)
    assert released(out) == ["a"]
    assert checkpoints(out) == [CheckpointNeeded("divergence", KEY)]
    assert c.mismatches == 1
    later: list[Action] = []
    later += c.primary_packet("c", p_pkt(8, b"more"), 0.0)
    later += c.primary_packet("ack", p_pkt(12, flags=ip.ACK), 0.0)
    later += c.secondary_output(KEY, 8, b"more", 0.0)
    later += c.primary_packet("retx", p_pkt(0, b"same"), 0.0)
    assert later == []
    out = c.checkpoint_done()
    assert released(out) == ["b", "c", "ack", "retx"] and checkpoints(out) == []
    # comparing resumes at the highest primary offset (12); the old secondary bytes are gone
    assert c.primary_packet("d", p_pkt(12, b"!"), 1.0) == []
    assert released(c.secondary_output(KEY, 12, b"!", 1.0)) == ["d"]


def test_hold_bound_via_tick() -> None:
    c = compared(hold=0.5)
    c.primary_packet("a", p_pkt(0, b"x"), 10.0)
    assert c.tick(10.4) == []
    assert c.oldest_held_age(10.4) == pytest.approx(0.4)
    assert c.tick(10.6) == [CheckpointNeeded("held", None)]
    assert c.tick(11.0) == []  # once until the checkpoint
    assert released(c.checkpoint_done()) == ["a"]
    assert c.released_at_checkpoint == 1 and c.oldest_held_age(12.0) == 0.0
    c.primary_packet("b", p_pkt(1, b"y"), 12.0)
    assert c.tick(13.0) == [CheckpointNeeded("held", None)]


def test_max_buffer_asks_for_checkpoint() -> None:
    c = compared(max_buffer=1000)
    out = c.secondary_output(KEY, 0, b"s" * 900, 0.0)
    assert out == []
    out = c.secondary_output(KEY, 900, b"s" * 200, 0.0)
    assert checkpoints(out) == [CheckpointNeeded("held", None)]
    out = c.primary_packet("a", p_pkt(0, b"p" * 10), 0.0)  # differs, too
    assert checkpoints(out) == [CheckpointNeeded("divergence", KEY)]


def test_uncompared_connections_and_non_tcp_held_until_checkpoint() -> None:
    c = OutputComparer(1.0)
    udp = ip.build_udp(src=GUEST, dst=CLIENT, sport=53, dport=999, payload=b"dns")
    assert c.primary_packet("sa", syn_ack(), 0.0) == []  # not comparing yet
    c.comparing = True
    assert c.primary_packet("d", p_pkt(0, b"data"), 0.0) == []
    assert c.primary_packet("u", udp, 0.0) == []
    assert c.primary_packet("bad", b"\x45\x00garbage", 0.0) == []
    c.secondary_output(KEY, 0, b"data", 0.0)  # ignored: not a compared connection
    assert c.held_packets == 4
    assert released(c.checkpoint_done()) == ["sa", "d", "u", "bad"]
    assert c.primary_packet("d2", p_pkt(4, b"more"), 1.0) == []  # still not compared


def test_retransmission_below_matched_released_at_once() -> None:
    c = compared()
    c.secondary_output(KEY, 0, b"0123456789", 0.0)
    c.primary_packet("a", p_pkt(0, b"01234"), 0.0)
    c.primary_packet("b", p_pkt(5, b"56789"), 0.0)
    c.primary_packet("held", p_pkt(10, b"AB"), 0.0)
    assert released(c.primary_packet("rx", p_pkt(2, b"234"), 0.0)) == ["rx"]
    # overlapping old and new bytes: held until the new ones match
    assert c.primary_packet("ov", p_pkt(8, b"89AB"), 0.0) == []
    assert released(c.secondary_output(KEY, 10, b"AB", 0.0)) == ["held", "ov"]


def test_out_of_order_primary_and_secondary_gaps() -> None:
    c = compared()
    c.primary_packet("b", p_pkt(3, b"def"), 0.0)
    c.primary_packet("a", p_pkt(0, b"abc"), 0.0)
    assert c.secondary_output(KEY, 3, b"def", 0.0) == []  # gap in the secondary's bytes
    assert released(c.secondary_output(KEY, 0, b"abc", 0.0)) == ["b", "a"]
    assert c.secondary_output(KEY, 1, b"bc", 0.0) == []  # below the decided position


def test_offsets_wrap_around_2_32() -> None:
    c = compared()
    data = bytes(range(256)) * 2  # P_ISN + 1 + 512 crosses 2**32
    for i in range(0, len(data), 100):
        c.primary_packet(i, p_pkt(i, data[i : i + 100]), 0.0)
    out = c.secondary_output(KEY, 0, data, 0.0)
    assert released(out) == list(range(0, len(data), 100)) and not checkpoints(out)


def test_connection_forgotten_after_fin_and_rst() -> None:
    c = compared()
    c.primary_packet("d", p_pkt(0, b"bye"), 0.0)
    c.primary_packet("fin", p_pkt(3, flags=ip.FIN | ip.ACK), 0.0)
    assert released(c.secondary_output(KEY, 0, b"bye", 0.0)) == ["d", "fin"]
    assert c.connections == 0
    # the last ACK (seq after the FIN) and a retransmitted FIN pass at once
    assert released(c.primary_packet("ack", p_pkt(4, flags=ip.ACK), 0.0)) == ["ack"]
    assert released(c.primary_packet("fin2", p_pkt(3, flags=ip.FIN | ip.ACK), 0.0)) == ["fin2"]
    assert c.primary_packet("new", p_pkt(4, b"?"), 0.0) == []  # data after the end: held
    other = (40001, GPORT)
    c.primary_packet("sa2", syn_ack(key=other), 0.0)
    rst = ip.build_tcp(src=GUEST, dst=CLIENT, sport=GPORT, dport=40001, seq=P_ISN + 1, flags=ip.RST)
    assert released(c.primary_packet("rst", rst, 0.0)) == ["rst"]
    assert c.connections == 0


def test_idle_connections_expire_and_close() -> None:
    c = compared()
    c.tick(100.0)
    assert c.connections == 1
    c.tick(10_000.0)
    assert c.connections == 0
    c = compared()
    c.close(KEY)
    assert c.connections == 0


def test_syn_ack_retransmit_and_port_reuse() -> None:
    c = compared()
    c.primary_packet("a", p_pkt(0, b"x"), 0.0)
    assert released(c.primary_packet("sa-again", syn_ack(), 0.0)) == ["sa-again"]
    assert c.held_packets == 1
    new_isn = 777
    assert released(c.primary_packet("sa-new", syn_ack(new_isn), 0.0)) == ["sa-new"]
    c.secondary_output(KEY, 0, b"y", 0.0)
    # the old connection's packet waits for the checkpoint; the new one compares
    assert released(c.primary_packet("b", p_pkt(0, b"y", isn=new_isn), 0.0)) == ["b"]
    assert released(c.checkpoint_done()) == ["a"]


# -- the rewriter ---------------------------------------------------------------------

C_ISN = 5000
S_TS, P_TS = 1_000_000, 3_000_000_000


def c_pkt(
    seq_off: int, ack_off: int, payload: bytes = b"", flags: int = ip.ACK, tsecr: int = P_TS
) -> bytes:
    """A client packet to the primary guest, acking its stream offset ``ack_off``."""
    return ip.build_tcp(
        src=CLIENT, dst=GUEST, sport=CPORT, dport=GPORT, seq=C_ISN + 1 + seq_off,
        ack=P_ISN + 1 + ack_off, flags=flags, payload=payload, tsval=42, tsecr=tsecr,
    )  # fmt: skip


def c_syn() -> bytes:
    return ip.build_tcp(
        src=CLIENT, dst=GUEST, sport=CPORT, dport=GPORT, seq=C_ISN, flags=ip.SYN, tsval=41,
        tsecr=0,
    )  # fmt: skip


def s_pkt(offset: int, payload: bytes = b"", flags: int = ip.ACK | ip.PSH) -> bytes:
    """A packet the secondary guest sends to the host at stream ``offset``."""
    return ip.build_tcp(
        src=SGUEST, dst=HOST, sport=GPORT, dport=CPORT, seq=S_ISN + 1 + offset,
        ack=C_ISN + 1, flags=flags, payload=payload, tsval=S_TS + 5, tsecr=42,
    )  # fmt: skip


def s_syn_ack() -> bytes:
    return ip.build_tcp(
        src=SGUEST, dst=HOST, sport=GPORT, dport=CPORT, seq=S_ISN, ack=C_ISN + 1,
        flags=ip.SYN | ip.ACK, tsval=S_TS, tsecr=41,
    )  # fmt: skip


def injected(actions: list[RewriterAction]) -> list[ip.TcpSegment]:
    segs = []
    for a in actions:
        assert isinstance(a, Inject)
        assert ip.ip_checksum_ok(a.packet)
        seg = ip.parse_tcp(a.packet)
        if seg is not None:
            assert ip.tcp_checksum_ok(a.packet)
            assert (seg.src, seg.dst) == (HOST, SGUEST)
            segs.append(seg)
    return segs


def test_rewriter_shifts_acks_and_timestamps() -> None:
    r = Rewriter(SGUEST, HOST)
    syn = injected(r.mirrored(c_syn()))
    assert len(syn) == 1 and syn[0].seq == C_ISN and syn[0].tsecr == 0
    assert r.mirrored(c_pkt(0, 0)) == []  # neither ISN known yet
    assert r.primary_syn_ack(KEY, P_ISN, P_TS) == []
    assert r.pending == 1
    flushed = injected(r.secondary_output(s_syn_ack()))
    assert r.pending == 0 and len(flushed) == 1
    assert flushed[0].ack == S_ISN + 1 and flushed[0].tsecr == S_TS
    r.secondary_output(s_pkt(0, b"0123456789"))  # it sent what the client acks next
    later = injected(r.mirrored(c_pkt(0, 10, b"GET", tsecr=P_TS + 7)))
    assert later[0].ack == S_ISN + 11 and later[0].tsecr == S_TS + 7
    assert later[0].payload == b"GET" and later[0].seq == C_ISN + 1
    assert r.injected == 3


def test_rewriter_primary_info_before_syn_and_no_timestamps() -> None:
    r = Rewriter(SGUEST, HOST)
    r.primary_syn_ack(KEY, P_ISN, None)  # before the mirrored SYN; no timestamps
    r.mirrored(c_syn())
    r.secondary_output(s_syn_ack())
    r.secondary_output(s_pkt(0, b"OK\n"))
    seg = injected(r.mirrored(c_pkt(0, 3, tsecr=P_TS)))[0]
    assert seg.ack == S_ISN + 4 and seg.tsecr == P_TS


def test_rewriter_reports_secondary_output() -> None:
    r = Rewriter(SGUEST, HOST)
    r.mirrored(c_syn())
    assert r.secondary_output(s_pkt(0, b"early")) == []  # no SYN-ACK seen: nothing to report
    r.secondary_output(s_syn_ack())
    assert r.secondary_output(s_pkt(0, b"hello")) == [Report(KEY, 0, b"hello")]
    assert r.secondary_output(s_pkt(5, flags=ip.ACK)) == []
    udp = ip.build_udp(src=SGUEST, dst=HOST, sport=1, dport=2, payload=b"x")
    assert r.secondary_output(udp) == []
    assert r.reported_bytes == 5


def test_rewriter_unknown_non_tcp_and_segmentation() -> None:
    r = Rewriter(SGUEST, HOST, mtu=576)
    assert r.mirrored(c_pkt(0, 0)) == [] and r.dropped_unknown == 1
    icmp = ip.build_ipv4(src=CLIENT, dst=GUEST, proto=ip.PROTO_ICMP, body=b"\x08\0\xf7\xff\0\0\0\0")
    (act,) = r.mirrored(icmp)
    assert isinstance(act, Inject) and act.packet[12:20] == HOST + SGUEST
    r.mirrored(c_syn())
    r.primary_syn_ack(KEY, P_ISN, P_TS)
    r.secondary_output(s_syn_ack())
    big = bytes(range(256)) * 8
    segs = injected(r.mirrored(c_pkt(0, 0, big, flags=ip.ACK | ip.PSH)))
    assert len(segs) == 4 and b"".join(s.payload for s in segs) == big
    assert all(s.ack == S_ISN + 1 for s in segs)


def test_rewriter_forgets_after_fins_and_rst() -> None:
    r = Rewriter(SGUEST, HOST)
    r.mirrored(c_syn())
    r.primary_syn_ack(KEY, P_ISN, P_TS)
    r.secondary_output(s_syn_ack())
    r.mirrored(c_pkt(0, 0, flags=ip.FIN | ip.ACK))
    r.secondary_output(s_pkt(0, flags=ip.FIN | ip.ACK))
    assert r.connections == 1
    assert len(injected(r.mirrored(c_pkt(1, 1)))) == 1  # the last ACK still goes in
    assert r.connections == 0
    r.mirrored(c_syn())
    r.secondary_output(s_syn_ack())
    r.secondary_output(s_pkt(0, flags=ip.RST))
    assert r.connections == 0


def test_rewriter_pending_is_bounded() -> None:
    r = Rewriter(SGUEST, HOST, max_pending=3)
    r.mirrored(c_syn())
    for i in range(5):
        r.mirrored(c_pkt(i, 0, b"x"))
    assert r.pending == 3 and r.dropped_pending == 2


def test_rewriter_never_acknowledges_more_than_the_secondary_sent() -> None:
    """The primary sent more than the secondary (longer replies): the client's ACK,
    shifted, would cover bytes the secondary never sent, and Linux would discard the
    segment with its data; the rewriter acknowledges only what the secondary sent."""
    r = Rewriter(SGUEST, HOST)
    r.mirrored(c_syn())
    r.primary_syn_ack(KEY, P_ISN, P_TS)
    r.secondary_output(s_syn_ack())
    seg = injected(r.mirrored(c_pkt(0, 0)))[0]
    assert seg.ack == (S_ISN + 1) % MOD  # nothing sent yet by either
    data = ip.build_tcp(
        src=SGUEST, dst=HOST, sport=GPORT, dport=CPORT, seq=S_ISN + 1, payload=b"OK\n"
    )
    r.secondary_output(data)
    # the client acknowledges 10 bytes of the primary's; the secondary sent 3
    seg = injected(r.mirrored(c_pkt(0, 10, payload=b"GET k\n")))[0]
    assert seg.ack == (S_ISN + 4) % MOD and seg.payload == b"GET k\n"
    # an ACK within what it sent is shifted as usual
    seg = injected(r.mirrored(c_pkt(6, 2)))[0]
    assert seg.ack == (S_ISN + 3) % MOD


# -- end to end: random segmentation and interleaving ---------------------------------


def _cuts(draw: st.DrawFn, n: int, most: int) -> list[tuple[int, int]]:
    """Random [start, end) pieces covering [0, n), each 1..most bytes."""
    pieces, pos = [], 0
    while pos < n:
        size = draw(st.integers(1, most))
        pieces.append((pos, min(n, pos + size)))
        pos += size
    return pieces


@st.composite
def scenario(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, int, int]], int | None]:
    data = draw(st.binary(min_size=1, max_size=600))
    p_cuts = _cuts(draw, len(data), 120)
    s_cuts = _cuts(draw, len(data), 200)
    # a random merge of the two event sequences, each kept in its own order
    events: list[tuple[str, int, int]] = []
    i = j = 0
    while i < len(p_cuts) or j < len(s_cuts):
        take_p = j == len(s_cuts) or (i < len(p_cuts) and draw(st.booleans()))
        if take_p:
            events.append(("p", *p_cuts[i]))
            i += 1
        else:
            events.append(("s", *s_cuts[j]))
            j += 1
    # a few extra secondary pieces anywhere (duplicates, overlaps, or ahead of a gap)
    for _ in range(draw(st.integers(0, 4))):
        start = draw(st.integers(0, len(data) - 1))
        end = draw(st.integers(start + 1, len(data)))
        events.insert(draw(st.integers(0, len(events))), ("s", start, end))
    flip = draw(st.none() | st.integers(0, len(data) - 1))
    return data, events, flip


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(scenario())
def test_end_to_end_random_segmentation(
    case: tuple[bytes, list[tuple[str, int, int]], int | None],
) -> None:
    data, events, flip = case
    s_data = bytearray(data)
    if flip is not None:
        s_data[flip] ^= 0x01
    comparer = OutputComparer(10.0)
    comparer.comparing = True
    rewriter = Rewriter(SGUEST, HOST, mtu=100)
    # the handshake: primary SYN-ACK (released at once), its numbers to the
    # secondary, the mirrored SYN and the secondary's own SYN-ACK
    out: list[Action] = comparer.primary_packet("syn-ack", syn_ack(tsval=P_TS), 0.0)
    assert released(out) == ["syn-ack"]
    info = syn_ack_info(syn_ack(tsval=P_TS))
    assert info is not None
    rewriter.primary_syn_ack(*info)
    rewriter.mirrored(c_syn())
    rewriter.secondary_output(s_syn_ack())

    handles = [start for kind, start, _ in events if kind == "p"]  # primary pieces are unique
    got: list[object] = []
    signals: list[CheckpointNeeded] = []
    for kind, start, end in events:
        if kind == "p":
            out = comparer.primary_packet(start, p_pkt(start, data[start:end]), 1.0)
        else:
            out = []
            for report in rewriter.secondary_output(s_pkt(start, bytes(s_data[start:end]))):
                assert isinstance(report, Report)
                out += comparer.secondary_output(report.key, report.offset, report.payload, 1.0)
        got += released(out)
        signals += checkpoints(out)
        assert comparer.tick(2.0) == []  # within the bound: never a "held" checkpoint

    if flip is None:
        assert signals == []
        assert got == handles  # each once, in order
        assert comparer.held_packets == 0 and comparer.matched_bytes == len(data)
        return
    assert signals == [CheckpointNeeded("divergence", KEY)]
    # only packets wholly before the flipped byte went out before the checkpoint
    ends = {start: end for kind, start, end in events if kind == "p"}
    assert all(ends[h] <= flip for h in got if isinstance(h, int))
    assert got == handles[: len(got)]
    rest = released(comparer.checkpoint_done())
    assert got + rest == handles


# -- memory bounds over a long run --------------------------------------------------------


def test_comparer_connection_table_is_capped_least_recently_active_first() -> None:
    c = OutputComparer(1.0, max_conns=8)
    c.comparing = True
    for i in range(100):
        c.primary_packet(f"sa{i}", syn_ack(key=(50000 + i, GPORT)), float(i))
    assert c.connections == 8 and c.evicted_connections == 92
    # the newest are the ones kept, and they still compare
    newest = (50099, GPORT)
    data = ip.build_tcp(
        src=GUEST, dst=CLIENT, sport=GPORT, dport=newest[0], seq=P_ISN + 1, ack=1,
        flags=ip.ACK | ip.PSH, payload=b"hi",
    )  # fmt: skip
    c.primary_packet("d", data, 100.0)
    assert released(c.secondary_output(newest, 0, b"hi", 100.0)) == ["d"]
    # an evicted one's output waits for the checkpoint (Remus's rule), never lost
    old = ip.build_tcp(
        src=GUEST, dst=CLIENT, sport=GPORT, dport=50000, seq=P_ISN + 1, ack=1,
        flags=ip.ACK | ip.PSH, payload=b"late",
    )  # fmt: skip
    assert c.primary_packet("old", old, 101.0) == []
    assert released(c.checkpoint_done()) == ["old"]


def _syn(cport: int) -> bytes:
    return ip.build_tcp(
        src=CLIENT, dst=GUEST, sport=cport, dport=GPORT, seq=C_ISN, flags=ip.SYN,
    )  # fmt: skip


def test_rewriter_connection_table_is_capped() -> None:
    r = Rewriter(SGUEST, HOST, max_conns=8)
    for i in range(100):
        r.mirrored(_syn(50000 + i))
    assert r.connections == 8 and r.expired_connections == 92


def test_rewriter_forgets_idle_connections_on_tick() -> None:
    r = Rewriter(SGUEST, HOST, idle_timeout=60.0)
    r.mirrored(_syn(50000))  # before the first tick: used "now" at that tick
    r.tick(1000.0)
    assert r.connections == 1
    r.tick(1030.0)
    r.mirrored(_syn(50001))  # stamped 1030
    r.tick(1061.0)
    assert r.connections == 1 and r.expired_connections == 1
    r.tick(1091.0)
    assert r.connections == 0 and r.expired_connections == 2
    ack = ip.build_tcp(
        src=CLIENT, dst=GUEST, sport=50000, dport=GPORT, seq=C_ISN + 1, ack=1, flags=ip.ACK,
    )  # fmt: skip
    assert r.mirrored(ack) == [] and r.dropped_unknown == 1


def test_rewriter_early_syn_acks_are_capped() -> None:
    r = Rewriter(SGUEST, HOST, max_early=4)
    for i in range(50):
        r.primary_syn_ack((50000 + i, GPORT), P_ISN, None)
    assert len(r._early) == 4
    # the newest still pairs with its SYN
    r.mirrored(_syn(50049))
    assert r._conns[(50049, GPORT)].primary is not None
