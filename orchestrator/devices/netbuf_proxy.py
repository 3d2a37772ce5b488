"""Network output buffering in a userspace TCP proxy, for unprivileged runs.

Clients connect to the proxy instead of the guest. What they send goes to
the guest at once; what the guest answers is read, tagged with the current
output epoch and held until the secondary has acknowledged that epoch's
checkpoint. Bytes read after a new epoch starts are tagged with the new one
even if the guest wrote them a moment before it stopped: that only delays
them, it never releases anything early. If the primary dies, held bytes die
with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field

from .base import CheckpointDevice


@dataclass
class _Flow:
    writer: asyncio.StreamWriter
    held: deque[tuple[int, bytes]] = field(default_factory=deque)


class ProxyNetbuf(CheckpointDevice):
    name = "netbuf-proxy"

    def __init__(self, guest_address: str, listen: str = "127.0.0.1:0") -> None:
        self.guest_host, port = guest_address.rsplit(":", 1)
        self.guest_port = int(port)
        host, lport = listen.rsplit(":", 1)
        self.listen_host, self.listen_port = host, int(lport)
        self.epoch = 0
        self.flows: list[_Flow] = []
        self.released_bytes = 0
        self.server: asyncio.base_events.Server | None = None
        self.passthrough = False  # replication over: the guest's output flows freely
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"

    @property
    def held_bytes(self) -> int:
        return sum(len(b) for f in self.flows for _, b in f.held)

    async def setup(self) -> None:
        self.server = await asyncio.start_server(self._client, self.listen_host, self.listen_port)
        self.listen_port = self.server.sockets[0].getsockname()[1]

    async def _client(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            g_reader, g_writer = await asyncio.open_connection(self.guest_host, self.guest_port)
        except OSError:
            c_writer.close()
            return
        flow = _Flow(c_writer)
        self.flows.append(flow)

        async def inbound() -> None:  # client -> guest: never held
            with contextlib.suppress(ConnectionError):
                while data := await c_reader.read(65536):
                    g_writer.write(data)
                    await g_writer.drain()
            g_writer.close()

        task = asyncio.create_task(inbound())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        with contextlib.suppress(ConnectionError):
            while data := await g_reader.read(65536):
                if self.passthrough:
                    c_writer.write(data)
                else:
                    flow.held.append((self.epoch, data))
        c_writer.close()

    async def postsuspend(self, epoch: int) -> None:
        self.epoch = epoch

    async def preresume(self) -> None:
        pass

    async def commit(self, epoch: int) -> None:
        for flow in self.flows:
            while flow.held and flow.held[0][0] <= epoch:
                _, data = flow.held.popleft()
                flow.writer.write(data)
                self.released_bytes += len(data)

    async def teardown(self, release: bool) -> None:
        if release:
            # the guest runs on here: what was held goes out, and clients keep the proxy
            await self.commit(1 << 62)
            self.passthrough = True
            return
        for flow in self.flows:
            flow.held.clear()
            flow.writer.close()
        if self.server is not None:
            self.server.close()
            self.server = None
