"""The secondary's end for tests/transport/test_stdio.py: ``python stdio_peer.py MODE``.

Run by the primary's :func:`open_command` as ``sh -c "<python> stdio_peer.py MODE"``.
Every mode answers the primary's HELLO, then:

- ``echo``: reads the stream socket to its end and sends ``Ack(1, sha256)`` of
  it (with a ``report`` of the byte count first), echoes every HEARTBEAT; when the
  primary's control ends, sends ``report(control_eof=True)`` and exits.
- ``failover``: reads 1 MiB of the stream, then ``stream.shutdown(SHUT_RDWR)``
  as the secondary does to fail over, and echoes HEARTBEATs as above.
- ``rogue``: writes a channel-1 frame to the primary, which it must reject.

A ``print`` after ``open_stdio`` checks that stdout was taken away from us.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import sys

from orchestrator.transport.control import Ack, Heartbeat, Hello, Role, SvmOutput
from orchestrator.transport.controlio import Control
from orchestrator.transport.stdio import STREAM, encode, open_stdio


def _digest(stream: socket.socket, limit: int | None) -> tuple[int, bytes]:
    h, total = hashlib.sha256(), 0
    while limit is None or total < limit:
        data = stream.recv(1 << 20 if limit is None else min(1 << 20, limit - total))
        if not data:
            break
        h.update(data)
        total += len(data)
    return total, h.digest()


def report(**values: object) -> SvmOutput:
    """A note to the test, in a frame a secondary may send at any time (its payload JSON)."""
    return SvmOutput(0, 0, 0, 0, json.dumps(values, sort_keys=True).encode())


async def _echo(ctl: Control) -> None:
    """Echo HEARTBEATs until the primary's control ends; then say so and close."""
    try:
        while True:
            event = await ctl.next()
            if isinstance(event, Heartbeat):
                ctl.send(Heartbeat(event.seq, event.sent_ns))
    except ConnectionError:
        with contextlib.suppress(ConnectionError):
            ctl.send(report(control_eof=True))
            await ctl.writer.drain()
        ctl.close()


async def main(mode: str) -> None:
    stream, ctl, link = await open_stdio()
    ctl.set_role(Role.SECONDARY)
    print("stray output that must not reach the primary", flush=True)
    os.system("echo stray output from a child process")
    await ctl.hello(Hello("secondary", {}, ("ack",)), 10)
    if mode == "rogue":
        await asyncio.sleep(0.3)  # let our HELLO through its pump first
        os.write(link.out_fd, encode(STREAM, b"not allowed"))
        await asyncio.sleep(30)
        return
    echo = asyncio.create_task(_echo(ctl))
    if mode == "echo":
        total, digest = await asyncio.to_thread(_digest, stream, None)
        ctl.send(report(stream_bytes=total))
        ctl.send(Ack(1, digest))
    elif mode == "failover":
        total, _ = await asyncio.to_thread(_digest, stream, 1 << 20)
        stream.shutdown(socket.SHUT_RDWR)
        ctl.send(report(failed_over_after=total))
    with contextlib.suppress(ConnectionError):  # the primary may be gone already
        await ctl.writer.drain()
    await echo
    link.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "echo"))
