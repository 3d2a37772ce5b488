"""The receiving end of replication: incoming (stream, control) pairs as plain fds, and PROBEs.

A primary opens two connections to the peer's replication port, each starting
with the channel preamble (``XRMS``, kind, protection UUID); a pre-flight opens
a third kind, PROBE, answered with one HELLO describing this host. The one
accept of the project: remusd hands each complete pair to a secondary worker
process as two inherited fds, and `remusctl receive` runs the secondary on
the pair itself (:func:`control_of` wraps its control socket).

Nothing may read one byte past the 24-byte preamble (the primary's HELLO
follows at once and belongs to whoever runs the secondary, maybe another
process), so the sockets are raw and every read asks for exactly what is
left of the preamble; an asyncio stream would read ahead.

Nothing here grows without a bound: at most ``max_handshakes`` connections
may be inside their preamble at once (others are closed at accept), a half
pair waits ``half_pair_ttl`` seconds at most for its other half, at most
``max_half_pairs`` of them are kept (a connection for yet another protection
is refused: the halves already held are real primaries more likely than not),
and complete pairs wait in a queue of ``max_ready`` (past it a pair is closed
and its primary retries).

With a TLS link (the default) every connection is mutual TLS before its
preamble is read: nothing is answered, paired or handed on before the peer's
certificate is one this host pinned (:mod:`.tls`), and the handshake counts
against the preamble's timeout. A pair's sockets are then the plain ends of
:class:`~.relay.Relay`s, whose threads live in this process. Each connection
that passes gets one ACCEPT byte; one that is refused after its preamble gets
REFUSE and why (:mod:`.channels`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from .channels import ACCEPT, CONTROL, MAGIC, PREAMBLE, PROBE, REFUSE, STREAM
from .control import PROTOCOL_VERSION, Hello, Role, encode_event
from .controlio import Control
from .relay import Relay
from .tls import Link, LinkRefused, accept_refusal, check_client, looks_like_tls, peer_name

log = logging.getLogger(__name__)

PREAMBLE_TIMEOUT: Final = 10.0  # s: a connection that has not said what it is by then goes
HALF_PAIR_TTL: Final = 30.0  # s: a primary connects its two channels back to back
MAX_HANDSHAKES: Final = 64
MAX_HALF_PAIRS: Final = 64
MAX_READY: Final = 16
_REFUSAL_LOG_EVERY: Final = 1.0  # s: a flood is one line a second, not one per connection
# what a HELLO to a PROBE says this receiver can do (the secondary worker's own)
CAPABILITIES: Final = ("ack", "disk")


@dataclass
class IncomingPair:
    """One primary's two channels, blocking sockets, each past its preamble and no further."""

    protection: str  # the UUID the primary chose for this protection
    stream: socket.socket
    control: socket.socket

    def close(self) -> None:
        self.stream.close()
        self.control.close()


async def control_of(pair: IncomingPair) -> Control:
    """The pair's control socket as the secondary's :class:`Control` in this process."""
    pair.control.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=pair.control)
    return Control(reader, writer, Role.SECONDARY)


class Endpoint:
    """A replication port: ``await next_pair()``; PROBEs are answered within.

    ``describe`` gives the HELLO's config for a PROBE (called in a thread: it may
    list domains through the hypervisor); None answers with an empty one.
    """

    def __init__(
        self,
        host: str,
        port: int,
        describe: Callable[[], dict[str, Any]] | None = None,
        *,
        link: Link,
        max_handshakes: int = MAX_HANDSHAKES,
        max_half_pairs: int = MAX_HALF_PAIRS,
        half_pair_ttl: float = HALF_PAIR_TTL,
        max_ready: int = MAX_READY,
        preamble_timeout: float = PREAMBLE_TIMEOUT,
    ) -> None:
        self.host, self.port = host, port
        self.link = link
        self._describe = describe or dict
        self.max_handshakes, self.max_half_pairs = max_handshakes, max_half_pairs
        self.half_pair_ttl, self.preamble_timeout = half_pair_ttl, preamble_timeout
        self._listener: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        # protection id -> (first seen, {kind: socket}); insertion order is age order
        self._half: OrderedDict[bytes, tuple[float, dict[int, socket.socket]]] = OrderedDict()
        self._ready: asyncio.Queue[IncomingPair] = asyncio.Queue(max_ready)
        # what the bounds did, for the log and the tests
        self.refused = 0
        self.expired = 0
        self.unauthenticated = 0  # connections refused for their certificate, or for no TLS
        self._refusal_logged = 0.0

    @property
    def pending(self) -> int:
        """Half pairs waiting for their other half."""
        return len(self._half)

    @property
    def queued(self) -> int:
        """Complete pairs nobody has taken yet."""
        return self._ready.qsize()

    async def start(self) -> None:
        # a raw listening socket, not asyncio.start_server: see the module docstring
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        lsock = socket.socket(family, socket.SOCK_STREAM)
        try:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind((self.host, self.port))
            lsock.listen(128)
            lsock.setblocking(False)
        except BaseException:
            lsock.close()
            raise
        self._listener = lsock
        self.port = lsock.getsockname()[1]
        self._acceptor = asyncio.create_task(self._accept_forever(lsock))
        self._reaper = asyncio.create_task(self._reap_forever())

    async def next_pair(self) -> IncomingPair:
        """The next primary's complete pair; the caller owns (and must close) its sockets."""
        return await self._ready.get()

    async def close(self) -> None:
        for task in (self._acceptor, self._reaper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for task in list(self._handshakes):
            task.cancel()
        if self._listener is not None:
            self._listener.close()
        for _, slot in self._half.values():
            for s in slot.values():
                s.close()
        self._half.clear()
        while not self._ready.empty():
            self._ready.get_nowait().close()

    async def _accept_forever(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(lsock)
            if len(self._handshakes) >= self.max_handshakes:
                # a flood of connections that never say what they are: refuse more
                # rather than hold a task and an fd for each
                self._refuse(conn, "connections inside their preamble")
                continue
            conn.setblocking(False)
            task = asyncio.create_task(self._handshake(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        raw = b""
        peer = peer_name(conn)
        tls: ssl.SSLSocket | None = None
        try:
            async with asyncio.timeout(self.preamble_timeout):
                if self.link.identity is not None:
                    tls = await self._authenticate(conn, peer)
                    if tls is None:
                        return
                    raw = await _tls_read(tls, PREAMBLE.size)
                    conn, tls = Relay(tls, peer).local, None  # the relay owns it now
                while len(raw) < PREAMBLE.size:
                    # exactly what is left of the preamble, never more
                    chunk = await loop.sock_recv(conn, PREAMBLE.size - len(raw))
                    if not chunk:
                        raise ConnectionError("closed inside the preamble")
                    raw += chunk
        except (OSError, TimeoutError):
            if tls is not None:
                tls.close()
            conn.close()
            return
        magic, kind, pid = PREAMBLE.unpack(raw)
        if magic != MAGIC or kind not in (STREAM, CONTROL, PROBE):
            if looks_like_tls(raw):
                self._unauthenticated(
                    f"refused {peer}: it speaks TLS, and this receiver runs on plain TCP "
                    "(--insecure-link, replication.insecure)"
                )
            conn.close()
            return
        conn.setblocking(True)
        if kind == PROBE:
            await asyncio.to_thread(self._answer_probe, conn)
            return
        await self._pair(pid, kind, conn)

    async def _authenticate(self, conn: socket.socket, peer: str) -> ssl.SSLSocket | None:
        """The TLS handshake, the peer's certificate checked: None (and ``conn`` closed)
        when it is refused. A plain-TCP primary is told so, in plain text: that says
        nothing about this host but that it wants TLS."""
        await _wait(conn, write=False)
        first = conn.recv(len(MAGIC), socket.MSG_PEEK)
        if first == MAGIC:
            self._unauthenticated(f"refused {peer}: plain TCP, and this receiver requires TLS")
            with contextlib.suppress(OSError):
                conn.send(REFUSE + b"this receiver requires TLS (mutual, pinned certificates)\n")
            conn.close()
            return None
        if not looks_like_tls(first):
            conn.close()
            return None
        try:
            ctx, presented = self.link.server_context()
        except Exception:
            conn.close()
            raise
        tls = ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        try:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await _wait(tls, write=False)
                except ssl.SSLWantWriteError:
                    await _wait(tls, write=True)
            check_client(tls, self.link, presented, peer)
        except ssl.SSLError as exc:
            self._unauthenticated(str(accept_refusal(exc, tls, self.link, presented, peer)))
            tls.close()
            return None
        except LinkRefused as exc:
            self._unauthenticated(str(exc))
            tls.close()
            return None
        except BaseException:
            tls.close()
            raise
        return tls

    def _unauthenticated(self, message: str) -> None:
        self.unauthenticated += 1
        log.warning("replication endpoint: %s", message)

    async def _pair(self, pid: bytes, kind: int, conn: socket.socket) -> None:
        self._expire(time.monotonic())
        if pid not in self._half and len(self._half) >= self.max_half_pairs:
            with contextlib.suppress(OSError):
                conn.send(REFUSE + b"too many half-open pairs here; try again later\n")
            self._refuse(conn, "half-open pairs")
            return
        try:
            conn.sendall(ACCEPT)
        except OSError:
            conn.close()
            return
        now = time.monotonic()
        first, slot = self._half.pop(pid, (now, {}))
        old = slot.pop(kind, None)
        if old is not None:  # a primary that reconnected one channel: the newer one wins
            old.close()
        slot[kind] = conn
        if STREAM in slot and CONTROL in slot:
            pair = IncomingPair(str(uuid.UUID(bytes=pid)), slot[STREAM], slot[CONTROL])
            try:
                self._ready.put_nowait(pair)
            except asyncio.QueueFull:  # nobody takes pairs: the primary will retry
                pair.close()
                self.refused += 1
                log.warning("replication endpoint: %d pairs already wait", self._ready.qsize())
            return
        # kept in age order: a half pair is as old as its first half
        self._half[pid] = (first, slot)

    def _refuse(self, conn: socket.socket, what: str) -> None:
        conn.close()
        self.refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= _REFUSAL_LOG_EVERY:
            self._refusal_logged = now
            log.warning(
                "replication endpoint: too many %s; refused (%d so far)", what, self.refused
            )

    async def _reap_forever(self) -> None:
        """Half pairs time out even when nobody else connects."""
        while True:
            await asyncio.sleep(min(1.0, self.half_pair_ttl / 4))
            self._expire(time.monotonic())

    def _expire(self, now: float) -> None:
        while self._half:
            pid, (first, slot) = next(iter(self._half.items()))
            if now - first < self.half_pair_ttl:
                return
            del self._half[pid]
            self.expired += 1
            log.info("dropping half a pair of protection %s", uuid.UUID(bytes=pid))
            for s in slot.values():
                s.close()

    def _answer_probe(self, sock: socket.socket) -> None:
        try:
            hello = Hello("probe", self._describe(), CAPABILITIES, PROTOCOL_VERSION)
            sock.sendall(ACCEPT + encode_event(hello))
        except OSError:
            pass  # the prober went away: its pre-flight reports that on its side
        except Exception:
            log.exception("answering a probe")
        finally:
            sock.close()


async def _wait(sock: socket.socket, *, write: bool) -> None:
    """Until ``sock`` is readable (or writable): a non-blocking SSL socket in the loop."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def _tls_read(tls: ssl.SSLSocket, n: int) -> bytes:
    """Exactly ``n`` bytes of plaintext; what OpenSSL decrypted past them stays in the
    SSL object for the relay to pass on."""
    raw = b""
    while len(raw) < n:
        try:
            chunk = tls.recv(n - len(raw))
        except ssl.SSLWantReadError:
            await _wait(tls, write=False)
            continue
        if not chunk:
            raise ConnectionError("closed inside the preamble")
        raw += chunk
    return raw
