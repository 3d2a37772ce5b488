"""The control-channel codec: round trips, the transition table, bad input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.transport.control import (
    TRANSITIONS,
    Ack,
    ConnInfo,
    ControlConnection,
    ControlError,
    DiskWrites,
    Failover,
    Heartbeat,
    Hello,
    Mirror,
    NetSync,
    Role,
    Shutdown,
    State,
    SvmOutput,
    Switchover,
    encode_event,
)

HELLO = Hello("web@hostA", {"c_info": {"name": "web"}}, ("ack-digest", "netbuf-nfqueue"))


def established(role: Role = Role.SECONDARY) -> ControlConnection:
    c = ControlConnection(role)
    c.receive_data(encode_event(HELLO))
    assert c.next_event() == HELLO
    return c


@given(
    st.one_of(
        st.builds(Heartbeat, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
        st.builds(Mirror, st.binary(min_size=20, max_size=200).map(lambda b: b"\x45" + b[1:])),
        st.builds(
            ConnInfo,
            st.integers(0, 65535),
            st.integers(0, 65535),
            st.integers(0, 2**32 - 1),
            st.integers(0, 2**32 - 1),
        ),
        st.builds(
            NetSync,
            st.integers(0, 2**64 - 1),
            st.lists(
                st.tuples(st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 2**32 - 1)),
                max_size=20,
            ).map(tuple),
        ),
    )
)
def test_round_trip_byte_by_byte(event: object) -> None:
    c = established()
    wire = encode_event(event)  # type: ignore[arg-type]
    assert len(wire) % 8 == 0
    for i in range(len(wire) - 1):
        c.receive_data(wire[i : i + 1])
        assert c.next_event() is None
    c.receive_data(wire[-1:])
    assert c.next_event() == event


@given(
    st.one_of(
        st.builds(Failover, st.text()),
        st.builds(
            SvmOutput,
            st.integers(0, 65535),
            st.integers(0, 65535),
            st.integers(0, 2**32 - 1),
            st.integers(0, 2**64 - 1),
            st.binary(max_size=3000),
        ),
    )
)
def test_round_trip_to_the_primary(event: object) -> None:
    c = established(Role.PRIMARY)
    c.receive_data(encode_event(event))  # type: ignore[arg-type]
    assert c.next_event() == event


@given(st.integers(1, 2**64 - 2), st.binary(min_size=32, max_size=32))
def test_ack_round_trip_for_the_checkpoint_in_flight(seq: int, digest: bytes) -> None:
    c = established(Role.PRIMARY)
    c.sent_seq = seq - 1
    c.checkpoint_sent(seq)
    c.receive_data(encode_event(Ack(seq, digest)))
    assert c.next_event() == Ack(seq, digest)
    assert c.state is State.ESTABLISHED and c.acked == seq


def test_ack_for_another_checkpoint_than_the_one_in_flight_is_refused() -> None:
    c = established(Role.PRIMARY)
    c.checkpoint_sent(1)
    c.receive_data(encode_event(Ack(2, bytes(32))))
    with pytest.raises(ControlError, match="ACK: for checkpoint 2, 1 is in flight"):
        c.next_event()
    assert c.state is State.CLOSED


def test_ack_with_no_checkpoint_in_flight_is_refused() -> None:
    c = established(Role.PRIMARY)
    c.receive_data(encode_event(Ack(1, bytes(32))))
    with pytest.raises(ControlError, match="not allowed in state established of the primary"):
        c.next_event()


def test_disk_blocks_of_an_acked_checkpoint_are_refused() -> None:
    c = established(Role.SECONDARY)
    c.send(Ack(1, bytes(32)))
    c.receive_data(encode_event(DiskWrites(1, 8, ((0, bytes(4096)),), last=True)))
    with pytest.raises(ControlError, match="DISK: blocks of checkpoint 1, which was already ACKed"):
        c.next_event()


def test_the_primary_sends_no_disk_blocks_after_the_checkpoint_end() -> None:
    c = established(Role.PRIMARY)
    c.send(DiskWrites(1, 8, (), last=True))  # before CHECKPOINT_END: fine
    c.checkpoint_sent(1)
    with pytest.raises(ControlError, match="blocks of checkpoint 1 after its CHECKPOINT_END"):
        c.send(DiskWrites(1, 8, (), last=True))


def test_a_side_sends_only_its_own_frames_and_acks_in_order() -> None:
    primary, secondary = established(Role.PRIMARY), established(Role.SECONDARY)
    with pytest.raises(ControlError, match="the primary does not send it"):
        primary.send(Ack(1, bytes(32)))
    with pytest.raises(ControlError, match="the secondary does not send it"):
        secondary.send(Mirror(b"\x45" + bytes(19)))
    secondary.send(Ack(1, bytes(32)))
    with pytest.raises(ControlError, match="checkpoint 1 after 1 was ACKed"):
        secondary.send(Ack(1, bytes(32)))
    with pytest.raises(ControlError, match="out of order after 0"):
        primary.checkpoint_sent(2)


def test_ack_layout_is_libxl_record_framing() -> None:
    wire = encode_event(Ack(7, b"\xaa" * 32))
    assert struct.unpack_from("<II", wire) == (2, 40)
    assert struct.unpack_from("<Q", wire, 8) == (7,)
    assert len(wire) == 48


def test_shutdown_closes_and_nothing_after_is_processed() -> None:
    c = established()
    c.receive_data(encode_event(Shutdown("unprotect")) + encode_event(Heartbeat(1, 2)))
    assert c.next_event() == Shutdown("unprotect")
    assert c.state is State.CLOSED and c.next_event() is None


def test_ack_before_hello_is_refused() -> None:
    c = ControlConnection()
    c.receive_data(encode_event(Ack(1, bytes(32))))
    with pytest.raises(ControlError, match="offset 0: ACK: not allowed in state await-hello"):
        c.next_event()
    assert c.state is State.CLOSED


def test_wrong_version_hello() -> None:
    c = ControlConnection()
    c.receive_data(encode_event(Hello("x", version=99)))
    with pytest.raises(ControlError, match="peer speaks control protocol version 99, we speak 1"):
        c.next_event()
    assert c.peer is None


@pytest.mark.parametrize(
    ("garbage", "message"),
    [
        (struct.pack("<II", 42, 0), "type 42: unknown frame type"),
        (struct.pack("<II", 2, 3) + b"abc" + bytes(5), "ACK body of 3 bytes"),
        (struct.pack("<II", 3, 16) + bytes(16) + b"", None),  # a valid heartbeat
        (struct.pack("<II", 6, 2) + b"{}" + bytes(6), "type 6: unknown frame type"),
        (struct.pack("<II", 5, 1) + b"\xff" + bytes(7), "SHUTDOWN"),
        (struct.pack("<II", 3, 1 << 30), "exceeds"),
        (struct.pack("<II", 5, 1) + b"a" + b"\x01" + bytes(6), "non-zero padding"),
    ],
)
def test_garbage_after_hello(garbage: bytes, message: str | None) -> None:
    c = established()
    offset = len(encode_event(HELLO))
    c.receive_data(garbage)
    if message is None:
        assert isinstance(c.next_event(), Heartbeat)
        return
    with pytest.raises(ControlError, match=message) as info:
        c.next_event()
    assert info.value.offset == offset


def test_every_row_and_every_missing_row() -> None:
    samples = [
        HELLO,
        Ack(1, bytes(32)),
        Heartbeat(1, 1),
        Failover("x"),
        Shutdown("x"),
        DiskWrites(1, 8, (), last=True),
        Mirror(b"\x45" + bytes(19)),
        ConnInfo(40000, 7000, 1, 2),
        SvmOutput(40000, 7000, 2, 5, b"OK\n"),
        NetSync(3, ((40000, 7000, 12),)),
        Switchover(1, '{"name": "web"}'),
    ]
    for role in Role:
        for state in State:
            for ev in samples:
                c = ControlConnection(role)
                c.state, c.in_flight = state, 1
                if isinstance(ev, Switchover):  # only from the last ACKed checkpoint
                    c.acked = 1
                c.receive_data(encode_event(ev))
                row = TRANSITIONS[role][state].get(type(ev))
                if state is State.CLOSED:
                    assert c.next_event() is None
                elif row is None:
                    with pytest.raises(ControlError, match="not allowed"):
                        c.next_event()
                else:
                    assert c.next_event() == ev and c.state is row


@pytest.mark.parametrize(
    ("ftype", "body", "message"),
    [
        (8, b"\x60" + bytes(39), "MIRROR of 40 bytes is not an IPv4 packet"),
        (9, bytes(8), "CONN body of 8 bytes"),
        (10, bytes(10), "SVM_OUTPUT body of 10 bytes is shorter than its header"),
        (11, bytes(16) + bytes(4), "NETSYNC body of 20 bytes for 0 connections"),
    ],
)
def test_bad_colo_frames_name_the_frame(ftype: int, body: bytes, message: str) -> None:
    c = established(Role.PRIMARY if ftype == 10 else Role.SECONDARY)
    pad = bytes(-len(body) % 8)
    c.receive_data(struct.pack("<II", ftype, len(body)) + body + pad)
    with pytest.raises(ControlError, match=message):
        c.next_event()


@given(st.integers(1, 2**64 - 1), st.text(max_size=2000))
def test_switchover_round_trip_from_the_last_acked_checkpoint(seq: int, doc: str) -> None:
    primary, secondary = established(Role.PRIMARY), established()
    primary.acked = secondary.acked = seq
    wire = primary.send(Switchover(seq, doc))
    secondary.receive_data(wire)
    assert secondary.next_event() == Switchover(seq, doc)
    assert secondary.state is State.HANDED_OVER
    # the secondary answers FAILOVER once the guest runs there; the primary is done
    primary.receive_data(secondary.send(Failover("switched over")))
    assert primary.next_event() == Failover("switched over")
    assert primary.state is State.CLOSED


def test_a_switchover_is_only_from_the_last_acked_checkpoint_with_none_in_flight() -> None:
    primary = established(Role.PRIMARY)
    with pytest.raises(ControlError, match="only the last ACKed one"):
        primary.send(Switchover(0))  # nothing ACKed yet: nothing to take over from
    primary.checkpoint_sent(1)
    with pytest.raises(ControlError, match="checkpoint-in-flight"):
        primary.send(Switchover(1))  # its ACK is not in
    secondary = established()
    secondary.acked = 4
    secondary.receive_data(encode_event(Switchover(3)))  # an older one than we hold
    with pytest.raises(ControlError, match="SWITCHOVER: from checkpoint 3, but 4 is the last"):
        secondary.next_event()
    short = established()
    short.receive_data(struct.pack("<II", 12, 4) + bytes(4) + bytes(4))
    with pytest.raises(ControlError, match="SWITCHOVER body of 4 bytes"):
        short.next_event()
    # after the hand-over nothing but proof of life may come
    handed = established()
    handed.acked = 1
    handed.receive_data(encode_event(Switchover(1)) + encode_event(DiskWrites(2, 8, (), True)))
    assert handed.next_event() == Switchover(1)
    with pytest.raises(ControlError, match="not allowed in state handed-over"):
        handed.next_event()
