"""The control connection's asyncio adapter over the sans-I/O codec (:mod:`.control`).

I/O only: bytes from the socket go into :class:`~.control.ControlConnection`,
its events come out; what may come when is the codec's table, not ours.
Also here: the heartbeat sender and the non-blocking write of the stream
socket, which every mode uses.
"""

from __future__ import annotations

import asyncio
import socket
import time

from .control import ControlConnection, Event, Heartbeat, Hello, Role


class Control:
    """One control connection: send events, await the next one."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        role: Role = Role.PRIMARY,
    ) -> None:
        self.reader, self.writer = reader, writer
        self.conn = ControlConnection(role)
        self.last_heard = time.monotonic()
        self._peer_hello: Hello | None = None

    def set_role(self, role: Role) -> None:
        """Accepted connections learn their side only once the listener hands them out."""
        self.conn.set_role(role)

    def send(self, event: Event) -> None:
        self.writer.write(self.conn.send(event))

    async def drain(self) -> None:
        await self.writer.drain()

    async def next(self) -> Event:
        """The next event; ConnectionError when the peer closes, ControlError on a
        frame the codec refuses (the connection is closed then)."""
        while True:
            event = self.conn.next_event()
            if event is not None:
                self.last_heard = time.monotonic()
                return event
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("control connection closed by the peer")
            self.conn.receive_data(data)

    async def hello(self, ours: Hello, timeout: float) -> Hello:
        self.send(ours)
        await self.writer.drain()
        return await self.receive_hello(timeout)

    async def receive_hello(self, timeout: float) -> Hello:
        """The peer's HELLO; a secondary reads it before answering, to learn what the
        primary asks for (Remus or COLO), and :meth:`hello` then returns the same."""
        if self._peer_hello is None:
            peer = await asyncio.wait_for(self.next(), timeout)
            assert isinstance(peer, Hello)  # the codec's table allows nothing else first
            self._peer_hello = peer
        return self._peer_hello

    def close(self) -> None:
        self.writer.close()


async def heartbeats(ctl: Control, every: float) -> None:
    """HEARTBEAT every ``every`` seconds until the connection closes."""
    seq = 0
    while not ctl.writer.is_closing():
        seq += 1
        ctl.send(Heartbeat(seq, time.monotonic_ns()))
        try:
            await ctl.writer.drain()
        except ConnectionError:
            return  # the peer is gone; the control reader reports why
        await asyncio.sleep(every)


def _send_all(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)


async def send_nowait(sock: socket.socket, data: bytes) -> None:
    """Send on the blocking stream socket without blocking the event loop.

    The socket stays blocking (the helper needs it so); a non-blocking
    attempt first covers the usual case of room in the send buffer, and only
    the rest, if any, waits in a thread.
    """
    try:
        sent = sock.send(data, socket.MSG_DONTWAIT)
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        await asyncio.to_thread(_send_all, sock, data[sent:])
