"""The simulated guest's per-connection positions, which live in guest memory as a
real guest's TCP state does: after a COLO checkpoint replaced the secondary's
memory, its copy carries on at the primary's stream offsets, whether it was
behind (it skips) or ahead (it replays from its input history)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from orchestrator.guest.kv import PAGE, GuestKV
from orchestrator.guest.simguest import Connection, HistoryLost


class Wire:
    """The socket's sending side: what the guest wrote, in order."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


class Copy:
    """One copy of the guest: memory, a store and one connection."""

    def __init__(self, pages: int = 64) -> None:
        self.mem = bytearray(pages * PAGE)
        self.dirty = bytearray(pages)
        self.kv = GuestKV(memoryview(self.mem), memoryview(self.dirty))
        self.wire = Wire()
        w: Any = self.wire
        self.conn = Connection(self.kv, w, 40000, 7000)

    def serve(self, answer: Any) -> int:
        n = 0
        while (line := self.conn.next_request()) is not None:
            self.conn.reply(answer(line))
            n += 1
        return n

    def take_checkpoint_from(self, primary: Copy) -> None:
        self.mem[:] = primary.mem
        self.kv.reload()
        self.conn.realign()


def reply_for(line: bytes, token: str = "") -> bytes:
    return b"R " + line + (b" " + token.encode() if token else b"") + b"\n"


def requests(n: int) -> bytes:
    return b"".join(f"PUT k{i} v{i}\n".encode() for i in range(n))


def test_positions_are_in_memory_and_a_checkpoint_carries_them() -> None:
    p = Copy()
    p.conn.received(requests(3))
    assert p.serve(reply_for) == 3
    slot = p.kv.conn_find(40000, 7000)
    assert slot is not None
    assert p.kv.conn_positions(slot) == (len(requests(3)), len(p.wire.data))
    assert p.dirty[0] == 1  # page 0 holds the table: the next checkpoint sends it


@pytest.mark.parametrize("secondary_done", [0, 1, 3, 5])
def test_secondary_carries_on_from_the_primary_positions(secondary_done: int) -> None:
    """The primary answered 3 requests before the checkpoint; the secondary 0-5 of
    them (behind, level, ahead), with longer replies (it had diverged). After the
    checkpoint its output continues the primary's: what it sends from then on is
    byte for byte what the primary sends from its checkpoint position on (the
    rewriter shifts the sequence numbers by what each had sent before)."""
    stream = requests(8)
    done_p, done_s = len(requests(3)), len(requests(secondary_done))
    p, s = Copy(), Copy()
    p.conn.received(stream[:done_p])
    p.serve(reply_for)
    s.conn.received(stream[:done_s])
    s.serve(lambda line: reply_for(line, "token"))
    at_checkpoint_p, at_checkpoint_s = len(p.wire.data), len(s.wire.data)
    s.take_checkpoint_from(p)
    # the mirror goes on feeding both copies the same input
    p.conn.received(stream[done_p:])
    s.conn.received(stream[done_s:])
    p.serve(reply_for)
    s.serve(reply_for)
    assert bytes(s.wire.data[at_checkpoint_s:]) == bytes(p.wire.data[at_checkpoint_p:])
    assert len(p.wire.data) > at_checkpoint_p
    slot_p, slot_s = p.kv.conn_find(40000, 7000), s.kv.conn_find(40000, 7000)
    assert slot_p is not None and slot_s is not None
    assert s.kv.conn_positions(slot_s) == p.kv.conn_positions(slot_p)


def test_a_primary_never_replays_or_skips() -> None:
    p = Copy()
    rng = random.Random(7)
    data = requests(50)
    at = 0
    while at < len(data):  # arbitrary segmentation of the input
        n = rng.randrange(1, 40)
        p.conn.received(data[at : at + n])
        at += n
        p.serve(reply_for)
        p.take_checkpoint_from(p)  # its own memory: nothing changes
    assert bytes(p.wire.data) == b"".join(reply_for(f"PUT k{i} v{i}".encode()) for i in range(50))


def test_a_connection_the_checkpoint_does_not_know_starts_from_zero() -> None:
    p, s = Copy(), Copy()
    p.conn.close()  # the primary has not taken this connection (yet)
    s.conn.received(requests(2))
    s.serve(reply_for)
    out = bytes(s.wire.data)
    s.take_checkpoint_from(p)
    s.serve(reply_for)  # replays both requests from its history, answering again
    assert bytes(s.wire.data) == out + out
    slot = s.kv.conn_find(40000, 7000)
    assert slot is not None and s.kv.conn_positions(slot) == (len(requests(2)), len(out))


def test_history_lost_is_an_error_not_a_wrong_answer() -> None:
    s = Copy()
    s.conn.received(requests(2))
    s.serve(reply_for)
    s.conn.base = len(requests(2))  # as if everything consumed had been trimmed
    slot = s.kv.conn_find(40000, 7000)
    assert slot is not None
    s.kv.conn_advance(slot, 0, 0)
    with pytest.raises(HistoryLost):
        s.conn.next_request()


def test_a_restarted_guest_forgets_the_connections_of_its_image() -> None:
    p = Copy()
    p.conn.received(requests(1))
    p.serve(reply_for)
    restored = GuestKV(memoryview(p.mem), memoryview(p.dirty))
    assert restored.conn_find(40000, 7000) is not None
    restored.conn_forget_all()
    assert restored.conn_find(40000, 7000) is None
