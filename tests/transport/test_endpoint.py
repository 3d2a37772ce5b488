"""The replication endpoint (transport/endpoint.py): pairs handed over as fds with
nothing read past the preamble, PROBEs answered, and no table that grows without bound."""

from __future__ import annotations

import asyncio
import socket
import uuid

from orchestrator.transport.channels import CONTROL, MAGIC, PREAMBLE, STREAM, probe
from orchestrator.transport.endpoint import Endpoint
from orchestrator.transport.tls import PLAIN


def _connect(port: int, kind: int, pid: bytes, after: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(PREAMBLE.pack(MAGIC, kind, pid) + after)
    return s


def _closed_by_peer(s: socket.socket) -> bool:
    s.settimeout(0.5)
    try:
        while s.recv(4096):  # past the verdict, if one came
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def _started(**bounds: float) -> Endpoint:
    describe = lambda: {"backend": "sim", "domains": ["vm0"]}  # noqa: E731
    ep = Endpoint("127.0.0.1", 0, describe, link=PLAIN, **bounds)  # type: ignore[arg-type]
    await ep.start()
    return ep


def test_a_pair_keeps_every_byte_after_the_preamble() -> None:
    async def main() -> None:
        ep = await _started()
        pid = uuid.uuid4()
        try:
            # the primary's HELLO follows its preamble at once: it is the worker's to read
            ctl = await asyncio.to_thread(_connect, ep.port, CONTROL, pid.bytes, b"HELLO...")
            stream = await asyncio.to_thread(_connect, ep.port, STREAM, pid.bytes, b"stream")
            pair = await asyncio.wait_for(ep.next_pair(), 5)
            assert pair.protection == str(pid)
            assert pair.control.recv(64) == b"HELLO..."
            assert pair.stream.recv(64) == b"stream"
            assert pair.stream.getblocking() and pair.control.getblocking()
            pair.close()
            ctl.close()
            stream.close()
        finally:
            await ep.close()

    asyncio.run(main())


def test_a_probe_is_answered_with_this_hosts_description() -> None:
    async def main() -> None:
        ep = await _started()
        try:
            hello = await probe(f"127.0.0.1:{ep.port}", PLAIN, timeout=5)
        finally:
            await ep.close()
        assert hello.config == {"backend": "sim", "domains": ["vm0"]}
        assert "ack" in hello.capabilities

    asyncio.run(main())


def test_half_pairs_are_bounded_and_expire() -> None:
    async def main() -> None:
        ep = await _started(max_half_pairs=3)
        socks = []
        try:
            for _ in range(6):  # six primaries that died between their two connects
                socks.append(await asyncio.to_thread(_connect, ep.port, STREAM, uuid.uuid4().bytes))
            for _ in range(100):
                await asyncio.sleep(0.01)
                if len(ep._half) == 3 and not ep._handshakes:
                    break
            assert len(ep._half) == 3
            assert sum(_closed_by_peer(s) for s in socks) == 3  # the newest were refused
            ep._expire(float("inf"))  # past the time-to-live of all of them
            assert not ep._half
        finally:
            for s in socks:
                s.close()
            await ep.close()

    asyncio.run(main())


def test_garbage_is_closed_without_a_pair() -> None:
    async def main() -> None:
        ep = await _started()
        try:
            s = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", ep.port))
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            # closed with our bytes unread, so the kernel may say it with a reset
            assert await asyncio.to_thread(_closed_by_peer, s)
            s.close()
            assert ep._ready.empty() and not ep._half
        finally:
            await ep.close()

    asyncio.run(main())
