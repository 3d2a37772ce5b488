"""The endpoint's bounds, over real sockets on 127.0.0.1: half-open pairs are
capped and time out (the peer sees EOF), complete pairs still come through."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from orchestrator.transport.channels import CONTROL, MAGIC, PREAMBLE, STREAM, connect
from orchestrator.transport.control import Hello
from orchestrator.transport.endpoint import Endpoint, control_of
from orchestrator.transport.tls import PLAIN

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _open(port: int, kind: int, pid: uuid.UUID) -> Conn:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(PREAMBLE.pack(MAGIC, kind, pid.bytes))
    await writer.drain()
    return reader, writer


async def _sees_eof(reader: asyncio.StreamReader, within: float) -> bool:
    """True if the listener closed this connection within ``within`` seconds (its verdict,
    ACCEPT or REFUSE and why, may come first)."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


async def _until(cond: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not cond():
            await asyncio.sleep(0.01)


def _run(factory: Callable[[Endpoint], Awaitable[None]], **bounds: Any) -> None:
    async def go() -> None:
        # plain TCP: these are the bounds of the table; tests/transport/test_tls.py has TLS's
        listener = Endpoint("127.0.0.1", 0, link=PLAIN, **bounds)
        await listener.start()
        try:
            await factory(listener)
        finally:
            await listener.close()

    asyncio.run(go())


def test_half_open_pairs_do_not_grow_past_the_bound() -> None:
    async def go(listener: Endpoint) -> None:
        conns = [await _open(listener.port, STREAM, uuid.uuid4()) for _ in range(40)]
        await _until(lambda: listener.pending + listener.refused == 40)
        assert listener.pending == 4
        assert listener.refused == 36
        # the refused ones were closed at once; the four held ones are still open
        eofs = await asyncio.gather(*(_sees_eof(r, 2.0) for r, _ in conns[4:]))
        assert all(eofs)
        held = await asyncio.gather(*(_sees_eof(r, 0.2) for r, _ in conns[:4]))
        assert not any(held)
        for _, w in conns:
            w.close()

    _run(go, max_half_pairs=4, half_pair_ttl=60.0)


def test_a_half_open_pair_is_closed_after_its_timeout() -> None:
    async def go(listener: Endpoint) -> None:
        stream_only = await _open(listener.port, STREAM, uuid.uuid4())
        control_only = await _open(listener.port, CONTROL, uuid.uuid4())
        await _until(lambda: listener.pending == 2)
        assert not await _sees_eof(stream_only[0], 0.1)  # well before its timeout
        t0 = asyncio.get_running_loop().time()
        assert await _sees_eof(stream_only[0], 5.0)
        assert await _sees_eof(control_only[0], 5.0)
        assert asyncio.get_running_loop().time() - t0 < 3.0
        assert listener.pending == 0 and listener.expired == 2
        for _, w in (stream_only, control_only):
            w.close()

    _run(go, half_pair_ttl=0.5)


def test_a_complete_pair_comes_through_a_full_table() -> None:
    async def go(listener: Endpoint) -> None:
        pid = uuid.uuid4()
        # its stream half arrives first and takes a slot ...
        first = await _open(listener.port, STREAM, pid)
        await _until(lambda: listener.pending == 1)
        # ... then the table fills with strangers, and the control half still joins it
        strangers = [await _open(listener.port, STREAM, uuid.uuid4()) for _ in range(5)]
        await _until(lambda: listener.pending + listener.refused == 6)
        assert listener.pending == 2
        ctl_r, ctl_w = await _open(listener.port, CONTROL, pid)
        pair = await asyncio.wait_for(listener.next_pair(), 5)
        assert pair.protection == str(pid) and listener.pending == 1
        try:
            first[1].write(b"page data")
            await first[1].drain()
            assert await asyncio.to_thread(pair.stream.recv, 100) == b"page data"
        finally:
            pair.close()
        for _, w in [first, (ctl_r, ctl_w), *strangers]:
            w.close()

    _run(go, max_half_pairs=2, half_pair_ttl=60.0)


def test_connect_pairs_after_half_open_ones_expired() -> None:
    async def go(listener: Endpoint) -> None:
        stale = [await _open(listener.port, CONTROL, uuid.uuid4()) for _ in range(2)]
        await _until(lambda: listener.pending == 2)
        await _until(lambda: listener.pending == 0)  # expired: room again
        pid = str(uuid.uuid4())
        stream, ctl = await connect(f"127.0.0.1:{listener.port}", pid, PLAIN, timeout=5)
        try:
            pair = await asyncio.wait_for(listener.next_pair(), 5)
            plain, theirs = pair.stream, await control_of(pair)
            assert pair.protection == pid
            ctl.send(Hello("primary"))
            assert await asyncio.wait_for(theirs.next(), 5) == Hello("primary")
            stream.sendall(b"x")
            assert await asyncio.to_thread(plain.recv, 10) == b"x"
            plain.close()
            theirs.close()
        finally:
            stream.close()
            ctl.close()
        for _, w in stale:
            w.close()

    _run(go, max_half_pairs=2, half_pair_ttl=0.3)


def test_pairs_nobody_takes_are_bounded() -> None:
    async def go(listener: Endpoint) -> None:
        halves: list[Conn] = []
        for _ in range(3):
            pid = uuid.uuid4()
            halves.append(await _open(listener.port, STREAM, pid))
            halves.append(await _open(listener.port, CONTROL, pid))
        await _until(lambda: listener.queued + listener.refused == 3)
        assert listener.queued == 1 and listener.refused == 2
        # the queued pair stays open; the two refused ones were closed on both halves
        assert not await _sees_eof(halves[0][0], 0.2)
        assert all(await asyncio.gather(*(_sees_eof(r, 2.0) for r, _ in halves[2:])))
        (await listener.next_pair()).close()
        for _, w in halves:
            w.close()

    _run(go, max_ready=1)


def test_stream_socket_handed_out_is_blocking() -> None:
    async def go(listener: Endpoint) -> None:
        pid = str(uuid.uuid4())
        stream, ctl = await connect(f"127.0.0.1:{listener.port}", pid, PLAIN, timeout=5)
        pair = await asyncio.wait_for(listener.next_pair(), 5)
        try:
            assert isinstance(pair.stream, socket.socket) and pair.stream.getblocking()
        finally:
            pair.close()
            stream.close()
            ctl.close()

    _run(go)


def test_close_ends_half_open_and_untaken_pairs() -> None:
    async def go() -> None:
        listener = Endpoint("127.0.0.1", 0, link=PLAIN)
        await listener.start()
        pid = uuid.uuid4()
        halves = [await _open(listener.port, STREAM, pid), await _open(listener.port, CONTROL, pid)]
        lonely = await _open(listener.port, STREAM, uuid.uuid4())
        await _until(lambda: listener.queued == 1 and listener.pending == 1)
        await listener.close()
        assert all(await asyncio.gather(*(_sees_eof(r, 2.0) for r, _ in [*halves, lonely])))
        assert listener.pending == 0 and listener.queued == 0
        for _, w in [*halves, lonely]:
            w.close()

    asyncio.run(go())
