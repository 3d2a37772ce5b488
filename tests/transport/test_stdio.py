"""Both channels multiplexed over one pipe pair: the codec, and real processes.

The end-to-end tests run ``sh -c "<python> stdio_peer.py MODE"`` through
:func:`open_command`; the peer is the secondary's side (:func:`open_stdio`).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shlex
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.transport.control import Ack, Heartbeat, Hello, encode_event
from orchestrator.transport.controlio import Control
from orchestrator.transport.stdio import (
    CONTROL,
    MAX_PAYLOAD,
    STREAM,
    CommandLink,
    MuxDecoder,
    MuxError,
    encode,
    open_command,
    open_stdio,
)

from .stdio_peer import report

PEER = Path(__file__).with_name("stdio_peer.py")
MIB = 1 << 20


def peer(mode: str) -> str:
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(PEER))} {mode}"


# -- the codec -------------------------------------------------------------------------------


def test_encode_vectors() -> None:
    assert encode(STREAM, b"abc") == b"\x01\x00\x00\x00\x03\x00\x00\x00abc"
    assert encode(CONTROL, b"") == b"\x02\x00\x00\x00\x00\x00\x00\x00"
    assert encode(CONTROL, memoryview(b"xy")) == b"\x02\0\0\0\x02\0\0\0xy"
    with pytest.raises(ValueError):
        encode(3, b"x")


def test_decode_vectors() -> None:
    d = MuxDecoder()
    d.receive_data(b"\x01\x00\x00\x00\x03\x00\x00\x00abc\x02\x00\x00")
    assert d.next_frame() == (STREAM, b"abc")
    assert d.offset == 11
    assert d.next_frame() is None
    d.receive_data(b"\x00\x00\x00\x00\x00")
    assert d.next_frame() == (CONTROL, b"")  # control ended; the stream goes on
    assert d.ended == {CONTROL}
    d.receive_data(encode(STREAM, b"more"))
    assert d.next_frame() == (STREAM, b"more")
    assert d.next_frame() is None
    d.end_of_input()
    assert d.offset == 11 + 8 + 12


frames = st.lists(
    st.tuples(st.sampled_from([STREAM, CONTROL]), st.binary(min_size=1, max_size=300)),
    max_size=30,
)


@given(frames, st.sets(st.sampled_from([STREAM, CONTROL])), st.data())
def test_round_trip_split_anywhere(
    sent: list[tuple[int, bytes]], ended: set[int], data: st.DataObject
) -> None:
    sent = sent + [(c, b"") for c in sorted(ended)]
    wire = b"".join(encode(c, p) for c, p in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=20)))
    d, got = MuxDecoder(), []
    for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        d.receive_data(wire[a:b])
        while (frame := d.next_frame()) is not None:
            got.append(frame)
    d.end_of_input()
    assert got == sent
    assert d.offset == len(wire)
    assert d.ended == ended


def test_large_frames_in_pieces() -> None:
    payload = os.urandom(MAX_PAYLOAD)
    wire = encode(STREAM, payload) * 3
    d, got = MuxDecoder(), []
    for i in range(0, len(wire), 300_000):
        d.receive_data(wire[i : i + 300_000])
        while (frame := d.next_frame()) is not None:
            got.append(frame)
    assert got == [(STREAM, payload)] * 3
    assert d.buffered == 0


def test_unknown_channel_names_its_offset() -> None:
    d = MuxDecoder()
    d.receive_data(encode(CONTROL, b"hello") + b"\x07\x00\x00\x00\x01\x00\x00\x00x")
    assert d.next_frame() == (CONTROL, b"hello")
    with pytest.raises(MuxError, match="offset 13: unknown channel 7") as err:
        d.next_frame()
    assert err.value.offset == 13
    with pytest.raises(MuxError):  # and it stays broken
        d.receive_data(encode(CONTROL, b"x"))


def test_channel_not_allowed_from_this_peer() -> None:
    d = MuxDecoder(channels=(CONTROL,))
    d.receive_data(encode(CONTROL, b"ok") + encode(STREAM, b"no"))
    assert d.next_frame() == (CONTROL, b"ok")
    with pytest.raises(MuxError, match="unexpected channel 1") as err:
        d.next_frame()
    assert err.value.offset == 10


def test_oversize_frame_is_refused_from_its_header() -> None:
    d = MuxDecoder()
    d.receive_data(encode(STREAM, b"ab") + (STREAM).to_bytes(4, "little"))
    d.receive_data((MAX_PAYLOAD + 1).to_bytes(4, "little"))  # no body needed to refuse it
    assert d.next_frame() == (STREAM, b"ab")
    with pytest.raises(MuxError, match="exceeds") as err:
        d.next_frame()
    assert err.value.offset == 10


def test_truncation_at_end_of_input() -> None:
    d = MuxDecoder()
    d.receive_data(encode(STREAM, b"whole") + encode(CONTROL, b"cut short")[:-3])
    assert d.next_frame() == (STREAM, b"whole")
    assert d.next_frame() is None
    with pytest.raises(MuxError, match="inside a 17-byte frame") as err:
        d.end_of_input()
    assert err.value.offset == 13
    d = MuxDecoder()
    d.receive_data(b"\x01\x00")
    with pytest.raises(MuxError, match="offset 0: input ended inside a header"):
        d.end_of_input()


def test_frame_after_the_channels_end() -> None:
    d = MuxDecoder()
    d.receive_data(encode(STREAM, b"") + encode(CONTROL, b"fine") + encode(STREAM, b"late"))
    assert d.next_frame() == (STREAM, b"")
    assert d.next_frame() == (CONTROL, b"fine")
    with pytest.raises(MuxError, match="offset 20: channel 1: frame after the channel's end"):
        d.next_frame()


# -- the secondary's adapter in this process, over plain pipes -------------------------------


def test_stdio_link_eof_and_truncation_over_pipes() -> None:
    async def go() -> None:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        stream, ctl, link = await open_stdio(in_r, out_w)
        try:
            os.write(in_w, encode(CONTROL, encode_event(Hello("primary"))))
            os.write(in_w, encode(STREAM, b"checkpoint") + encode(STREAM, b"cut")[:-1])
            assert await asyncio.wait_for(ctl.next(), 5) == Hello("primary")
            assert await asyncio.to_thread(stream.recv, 100) == b"checkpoint"
            assert link.last_input > time.monotonic() - 5
            os.close(in_w)  # the primary is gone, in the middle of a frame
            assert await asyncio.to_thread(stream.recv, 100) == b""
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(ctl.next(), 5)
            assert link.eof
            assert link.error is not None and "inside a 11-byte frame" in link.error
        finally:
            ctl.close()
            stream.close()
            link.close()
            for fd in (in_r, out_r, out_w):
                os.close(fd)

    asyncio.run(go())


# -- end to end: a real command ---------------------------------------------------------------


class Events:
    """Everything the secondary sends, in a queue; echoed HEARTBEATs as round trips."""

    def __init__(self, ctl: Control) -> None:
        self.ctl = ctl
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.rtts: list[float] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                event = await self.ctl.next()
                if isinstance(event, Heartbeat):
                    self.rtts.append((time.monotonic_ns() - event.sent_ns) / 1e9)
                else:
                    await self.queue.put(event)
        except ConnectionError as exc:
            await self.queue.put(exc)

    async def get(self, timeout: float = 10) -> Any:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def heartbeats(self, until: threading.Event | asyncio.Task[Any]) -> None:
        seq = 0
        while not (until.is_set() if isinstance(until, threading.Event) else until.done()):
            seq += 1
            self.ctl.send(Heartbeat(seq, time.monotonic_ns()))
            await self.ctl.writer.drain()
            await asyncio.sleep(0.01)


def _push(stream: socket.socket, blocks: int, shut: bool = True) -> tuple[bytes, float]:
    base = os.urandom(MIB)
    h = hashlib.sha256()
    t0 = time.monotonic()
    for i in range(blocks):
        block = i.to_bytes(8, "little") + base[8:]
        h.update(block)
        stream.sendall(block)
    if shut:
        stream.shutdown(socket.SHUT_WR)
    return h.digest(), time.monotonic() - t0


async def _start(mode: str) -> tuple[socket.socket, Control, CommandLink, Events]:
    stream, ctl, link = await open_command(peer(mode))
    peer_hello = await ctl.hello(Hello("primary", {"c_info": {"name": "web"}}), 10)
    assert peer_hello.protection == "secondary"
    ctl.conn.checkpoint_sent(1)  # the echo peer ACKs the whole stream as checkpoint 1
    return stream, ctl, link, Events(ctl)


async def _finish_cleanly(ctl: Control, events: Events, link: CommandLink) -> None:
    """Our control ends -> the peer answers and ends its own -> the command exits 0."""
    ctl.writer.write_eof()
    assert await events.get() == report(control_eof=True)
    assert isinstance(await events.get(), ConnectionError)
    assert await asyncio.wait_for(link.wait(), 10) == 0
    assert link.error is None, link.error


def test_64_mib_through_the_mux_and_eof_both_ways(capsys: pytest.CaptureFixture[str]) -> None:
    async def go() -> None:
        stream, ctl, link, events = await _start("echo")
        try:
            t0 = time.monotonic()
            push = asyncio.create_task(asyncio.to_thread(_push, stream, 64))
            beats = asyncio.create_task(events.heartbeats(push))
            digest, _ = await push
            # the stream's end (our SHUT_WR) reached the peer's reader: it sent the digest
            assert await events.get(30) == report(stream_bytes=64 * MIB)
            assert await events.get() == Ack(1, digest)
            elapsed = time.monotonic() - t0
            await beats
            assert events.rtts, "no heartbeat came back during the transfer"
            with capsys.disabled():
                print(
                    f"\n64 MiB through the stdio mux: {64 * MIB / elapsed / 1e6:.0f} MB/s; "
                    f"heartbeat round trip during it: max {max(events.rtts) * 1e3:.1f} ms, "
                    f"{len(events.rtts)} echoed"
                )
            await _finish_cleanly(ctl, events, link)
        finally:
            link.close()
            stream.close()

    asyncio.run(go())


def test_secondary_shutting_its_stream_down_leaves_the_pumps_working() -> None:
    async def go() -> None:
        stream, ctl, link, events = await _start("failover")
        try:
            push = asyncio.create_task(asyncio.to_thread(_push, stream, 16))
            beats = asyncio.create_task(events.heartbeats(push))
            assert await events.get() == report(failed_over_after=MIB)
            await push  # the rest went in (and was dropped over there) without an error
            await beats
            n = len(events.rtts)
            ctl.send(Heartbeat(99, time.monotonic_ns()))
            await ctl.writer.drain()
            for _ in range(100):
                if len(events.rtts) > n:
                    break
                await asyncio.sleep(0.02)
            assert len(events.rtts) > n, "control stopped after the stream's shutdown"
            await _finish_cleanly(ctl, events, link)
        finally:
            link.close()
            stream.close()

    asyncio.run(go())


def test_killed_command_breaks_both_channels_promptly() -> None:
    async def go() -> None:
        stream, _ctl, link, events = await _start("echo")
        failed: list[tuple[BaseException, float]] = []

        def write_forever() -> None:
            block = os.urandom(MIB)
            try:
                while True:
                    stream.sendall(block)
            except OSError as exc:
                failed.append((exc, time.monotonic()))

        writer = threading.Thread(target=write_forever, daemon=True)
        writer.start()
        try:
            await asyncio.sleep(0.3)  # data in flight, buffers full or filling
            killed = time.monotonic()
            link.process.kill()
            assert isinstance(await events.get(3), ConnectionError)
            await asyncio.to_thread(writer.join, 3)
            assert failed, "the stream's writer did not notice the command's death"
            exc, when = failed[0]
            assert isinstance(exc, BrokenPipeError | ConnectionResetError), exc
            assert when - killed < 2.0
            assert await asyncio.wait_for(link.wait(), 5) != 0
            assert link.error is not None
        finally:
            link.close()
            stream.close()

    asyncio.run(go())


def test_secondary_sending_on_the_stream_channel_is_a_protocol_error() -> None:
    async def go() -> None:
        stream, _ctl, link, events = await _start("rogue")
        try:
            assert isinstance(await events.get(5), ConnectionError)
            assert link.error is not None and "unexpected channel 1" in link.error
            with pytest.raises(OSError):
                stream.sendall(b"x" * MIB)
        finally:
            link.close(grace=0.3)
            stream.close()
        assert await asyncio.wait_for(link.wait(), 5) != 0  # SIGTERM after the grace

    asyncio.run(go())
