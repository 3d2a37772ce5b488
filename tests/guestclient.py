"""A blocking client of the simulated guest's key-value service, for tests."""

from __future__ import annotations

import socket


def kv(address: str, lines: list[bytes]) -> list[bytes]:
    """Send request lines to the guest at ``HOST:PORT``; its reply line to each."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        f = s.makefile("rwb")
        f.write(b"".join(line + b"\n" for line in lines))
        f.flush()
        return [f.readline().rstrip(b"\n") for _ in lines]
