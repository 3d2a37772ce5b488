"""TCP channels between the two orchestrators: the stream and the control connection.

Each connection opens with a 24-byte preamble, ``XRMS``, u32 kind (1 stream,
2 control) and the 16-byte protection UUID, so that one listening port
serves both and pairs them (the receiving end: :mod:`.endpoint`). The
stream socket stays a plain blocking socket: its fd is handed to the
save/restore helper.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import uuid
from typing import Final

import tenacity

from .control import ControlConnection, Hello
from .controlio import Control

log = logging.getLogger(__name__)

MAGIC: Final = b"XRMS"
PREAMBLE: Final = struct.Struct("<4sI16s")
# PROBE: a pre-flight question, answered with one HELLO describing the receiver
STREAM, CONTROL, PROBE = 1, 2, 3


class ChannelError(Exception):
    pass


def parse_addr(addr: str, default_port: int = 8002) -> tuple[str, int]:
    host, _, port = addr.rpartition(":") if ":" in addr else (addr, "", "")
    return host or "127.0.0.1", int(port) if port else default_port


async def connect(
    addr: str, protection: str, timeout: float = 10.0, attempts: int = 4
) -> tuple[socket.socket, Control]:
    """Both connections to a receiver; a refused or failed connect is tried again with
    exponential backoff (a receiver that is restarting, a link that flaps), then raised."""
    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception_type(OSError),
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential(multiplier=0.2, max=2.0),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await _connect_once(addr, protection, timeout)
    raise AssertionError("unreachable: tenacity reraises the last error")


async def _connect_once(
    addr: str, protection: str, timeout: float
) -> tuple[socket.socket, Control]:
    host, port = parse_addr(addr)
    pid = uuid.UUID(protection).bytes
    stream = await asyncio.to_thread(socket.create_connection, (host, port), timeout)
    try:
        stream.settimeout(None)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream.sendall(PREAMBLE.pack(MAGIC, STREAM, pid))
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
    except BaseException:
        stream.close()
        raise
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writer.write(PREAMBLE.pack(MAGIC, CONTROL, pid))
    await writer.drain()
    return stream, Control(reader, writer)


async def probe(addr: str, timeout: float = 5.0) -> Hello:
    """Ask a receiver who it is: protocol version, capabilities, free memory, domains."""
    host, port = parse_addr(addr)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(PREAMBLE.pack(MAGIC, PROBE, bytes(16)))
        conn = ControlConnection()
        while True:
            event = conn.next_event()
            if event is not None:
                if not isinstance(event, Hello):  # the codec allows only HELLO first
                    raise ChannelError(f"probe of {addr}: {type(event).__name__} before HELLO")
                return event
            data = await asyncio.wait_for(reader.read(65536), timeout)
            if not data:
                raise ChannelError(f"probe of {addr}: connection closed without an answer")
            conn.receive_data(data)
    finally:
        writer.close()
