"""TCP channels between the two orchestrators: the stream and the control connection.

Each connection opens with a 24-byte preamble, ``XRMS``, u32 kind (1 stream,
2 control) and the 16-byte protection UUID, so that one listening port
serves both and pairs them (the receiving end: :mod:`.endpoint`). The
receiver answers the preamble with one verdict byte (ACCEPT, or REFUSE and a
line saying why), so that a refused primary says why rather than finding a
closed socket later. The stream socket stays a plain blocking socket: its fd
is handed to the save/restore helper.

With a TLS link (the default) each connection is mutual TLS first
(:mod:`.tls`), the preamble inside it, and the stream and control the
caller gets are the plain ends of a :class:`~.relay.Relay`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import uuid
from typing import Final

import tenacity

from .control import ControlConnection, Hello
from .controlio import Control
from .relay import Relay
from .tls import Link, LinkRefused, check_server, refused_by_server

log = logging.getLogger(__name__)

MAGIC: Final = b"XRMS"
PREAMBLE: Final = struct.Struct("<4sI16s")
# PROBE: a pre-flight question, answered with one HELLO describing the receiver
STREAM, CONTROL, PROBE = 1, 2, 3
KIND_NAMES: Final = {STREAM: "stream", CONTROL: "control", PROBE: "probe"}
# the verdict (ACK, CAN: neither is a TLS record's first byte)
ACCEPT, REFUSE = b"\x06", b"\x18"  # REFUSE is followed by a line of UTF-8


class ChannelError(Exception):
    pass


def parse_addr(addr: str, default_port: int = 8002) -> tuple[str, int]:
    host, _, port = addr.rpartition(":") if ":" in addr else (addr, "", "")
    return host or "127.0.0.1", int(port) if port else default_port


async def connect(
    addr: str, protection: str, link: Link, timeout: float = 10.0, attempts: int = 4
) -> tuple[socket.socket, Control]:
    """Both connections to a receiver; a refused or failed connect is tried again with
    exponential backoff (a receiver that is restarting, a link that flaps), then raised.
    A refused certificate is tried again too: the receiver may have just learnt it
    (a fingerprint-only pin, :mod:`.tls`)."""
    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception_type((OSError, LinkRefused)),
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential(multiplier=0.2, max=2.0),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await _connect_once(addr, protection, link, timeout)
    raise AssertionError("unreachable: tenacity reraises the last error")


async def _connect_once(
    addr: str, protection: str, link: Link, timeout: float
) -> tuple[socket.socket, Control]:
    pid = uuid.UUID(protection).bytes
    stream = await asyncio.to_thread(open_channel, addr, STREAM, pid, link, timeout)
    try:
        control = await asyncio.to_thread(open_channel, addr, CONTROL, pid, link, timeout)
    except BaseException:
        stream.close()
        raise
    control.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=control)
    return stream, Control(reader, writer)


def open_channel(addr: str, kind: int, pid: bytes, link: Link, timeout: float) -> socket.socket:
    """One connection, past its preamble and the receiver's ACCEPT, as a blocking socket
    (blocking: it runs in a thread). Nothing of ours but the TLS handshake crosses the
    wire before the receiver's certificate has been checked against our pins."""
    host, port = parse_addr(addr)
    # no identity yet: said before anything is connected
    ctx = link.client_context() if link.identity is not None else None
    raw = socket.create_connection((host, port), timeout)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        preamble = PREAMBLE.pack(MAGIC, kind, pid)
        if ctx is None:
            raw.sendall(preamble)
            _verdict(raw, addr, link)
            raw.settimeout(None)
            return raw
        tls = ctx.wrap_socket(raw, do_handshake_on_connect=False)
    except BaseException:
        raw.close()
        raise
    try:
        try:
            tls.do_handshake()
        except (ssl.SSLEOFError, ConnectionError) as exc:
            raise LinkRefused(
                f"{addr} closed the connection inside the TLS handshake ({exc}): a receiver "
                "on plain TCP (--insecure-link, replication.insecure)?"
            ) from exc
        check_server(tls, link, addr)
        try:
            tls.sendall(preamble)
            _verdict(tls, addr, link)
        except (ssl.SSLError, ConnectionError) as exc:
            # TLS 1.3: the client's handshake ends before the server has checked our
            # certificate; its refusal is the alert that comes instead of the verdict
            raise refused_by_server(exc, link, addr) from exc
        tls.settimeout(None)
        return Relay(tls, f"{KIND_NAMES[kind]}-{addr}").local
    except BaseException:
        tls.close()
        raise


def _verdict(sock: socket.socket, addr: str, link: Link) -> None:
    first = sock.recv(1)
    if first == ACCEPT:
        return
    if first == REFUSE:
        why = b""
        while not why.endswith(b"\n") and len(why) < 1024:
            chunk = sock.recv(1)
            if not chunk:
                break
            why += chunk
        raise LinkRefused(f"{addr} refused the connection: {why.decode(errors='replace').strip()}")
    if not first:
        raise ChannelError(f"{addr} closed the connection before accepting it")
    if link.identity is None and first in (b"\x15", b"\x16"):  # a TLS alert or handshake
        raise LinkRefused(f"{addr} answered with TLS: drop --insecure-link")
    raise ChannelError(f"{addr}: {first!r} where the receiver's verdict belongs")


async def probe(addr: str, link: Link, timeout: float = 5.0) -> Hello:
    """Ask a receiver who it is: protocol version, capabilities, free memory, domains.
    Asked once more on a refused certificate (the receiver may have just learnt it)."""
    try:
        return await asyncio.to_thread(_probe, addr, link, timeout)
    except LinkRefused:
        return await asyncio.to_thread(_probe, addr, link, timeout)


def _probe(addr: str, link: Link, timeout: float) -> Hello:
    sock = open_channel(addr, PROBE, bytes(16), link, timeout)
    try:
        sock.settimeout(timeout)
        conn = ControlConnection()
        while True:
            event = conn.next_event()
            if event is not None:
                if not isinstance(event, Hello):  # the codec allows only HELLO first
                    raise ChannelError(f"probe of {addr}: {type(event).__name__} before HELLO")
                return event
            data = sock.recv(65536)
            if not data:
                raise ChannelError(f"probe of {addr}: connection closed without an answer")
            conn.receive_data(data)
    finally:
        sock.close()
