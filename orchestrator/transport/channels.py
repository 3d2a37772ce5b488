"""TCP channels between the two orchestrators: the stream and the control connection.

Each connection opens with a 24-byte preamble, ``XRMS``, u32 kind (1 stream,
2 control) and the 16-byte protection UUID, so that one listening port
serves both and pairs them. The stream socket stays a plain blocking
socket: its fd is handed to the save/restore helper.

A listener may run as long as the host does, so what it holds for
connections nobody completes is bounded: a handful of half-open pairs, each
for a few seconds, and a short queue of complete ones.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Final

import tenacity

from .control import ControlConnection, Hello, Role
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


@dataclass(eq=False)
class _HalfOpen:
    """One protection's connections while the other one has not come yet."""

    expiry: asyncio.TimerHandle
    stream: socket.socket | None = None
    control: Control | None = None

    def close(self) -> None:
        self.expiry.cancel()
        if self.stream is not None:
            self.stream.close()
        if self.control is not None:
            self.control.writer.close()


@dataclass
class Listener:
    """Accepts connections and hands out (stream, control) pairs of one protection.

    Bounds, so that a port scanner, a primary that dies between its two
    connects, or one that reconnects over and over cannot grow us:
    ``max_pending`` half-open protections at a time (a connection for
    another one past that is closed at once), each closed after
    ``pair_timeout`` seconds without its other half (a primary opens both
    back to back, well within it); ``max_connecting`` connections at a time
    that have not said what they are yet, each for ``preamble_timeout``; and
    at most ``max_queued`` complete pairs waiting for whoever takes them
    (further ones are closed: the primary retries).
    """

    host: str
    port: int
    max_pending: int = 16
    pair_timeout: float = 5.0
    preamble_timeout: float = 10.0
    max_queued: int = 4
    max_connecting: int = 64
    pairs: asyncio.Queue[tuple[str, socket.socket, Control]] = field(init=False)
    server: asyncio.base_events.Server | None = None
    refused: int = 0  # connections closed because a max_* bound was reached
    expired: int = 0  # half-open pairs closed after pair_timeout
    _partial: dict[bytes, _HalfOpen] = field(default_factory=dict, init=False, repr=False)
    _connecting: int = field(default=0, init=False, repr=False)
    _refusal_logged: float = field(default=float("-inf"), init=False, repr=False)
    _refused_unlogged: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.pairs = asyncio.Queue(maxsize=self.max_queued)

    @property
    def pending(self) -> int:
        """Half-open protections held now."""
        return len(self._partial)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._connecting >= self.max_connecting:
            writer.close()
            self._refuse(f"{self._connecting} connections still in their preamble")
            return
        self._connecting += 1
        try:
            raw = await asyncio.wait_for(reader.readexactly(PREAMBLE.size), self.preamble_timeout)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        finally:
            self._connecting -= 1
        magic, kind, pid = PREAMBLE.unpack(raw)
        if magic != MAGIC or kind not in (STREAM, CONTROL):
            writer.close()
            return
        slot = self._partial.get(pid)
        if slot is None:
            if len(self._partial) >= self.max_pending:
                writer.close()
                self._refuse(f"{len(self._partial)} half-open pairs already")
                return
            loop = asyncio.get_running_loop()
            slot = _HalfOpen(loop.call_later(self.pair_timeout, self._expire, pid))
            self._partial[pid] = slot
        if kind == STREAM:
            # the helper needs a plain blocking fd: take the socket away from asyncio
            sock: socket.socket = writer.get_extra_info("socket")
            plain = sock.dup()
            plain.setblocking(True)
            writer.transport.abort()
            if slot.stream is not None:
                slot.stream.close()  # a primary that connected again: the newer one counts
            slot.stream = plain
        else:
            if slot.control is not None:
                slot.control.writer.close()
            # the accepting side is the secondary: it receives the checkpoints
            slot.control = Control(reader, writer, Role.SECONDARY)
        if slot.stream is None or slot.control is None:
            return
        del self._partial[pid]
        slot.expiry.cancel()
        try:
            self.pairs.put_nowait((str(uuid.UUID(bytes=pid)), slot.stream, slot.control))
        except asyncio.QueueFull:
            slot.close()
            self._refuse(f"{self.pairs.qsize()} complete pairs not taken yet")

    def _expire(self, pid: bytes) -> None:
        slot = self._partial.pop(pid, None)
        if slot is None:
            return
        self.expired += 1
        have = "stream" if slot.stream is not None else "control"
        log.warning(
            "protection %s: only its %s connection came within %g s; closing it",
            uuid.UUID(bytes=pid),
            have,
            self.pair_timeout,
        )
        slot.close()

    def _refuse(self, why: str) -> None:
        self.refused += 1
        self._refused_unlogged += 1
        # one line a second at most: a flood of connections must not become a flood of logs
        now = time.monotonic()
        if now - self._refusal_logged >= 1.0:
            log.warning(
                "listener %s:%d: closed %d new connection(s): %s",
                self.host,
                self.port,
                self._refused_unlogged,
                why,
            )
            self._refusal_logged = now
            self._refused_unlogged = 0

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for slot in self._partial.values():
            slot.close()
        self._partial.clear()
        # pairs nobody took by now never will be: their primaries see EOF and retry
        while not self.pairs.empty():
            _, stream, ctl = self.pairs.get_nowait()
            stream.close()
            ctl.writer.close()


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
