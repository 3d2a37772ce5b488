"""A TLS connection as a plain fd: a socketpair end, with a pump thread behind it.

The save/restore helpers read and write the stream's fd themselves, and
remusd hands a secondary's two fds to a worker process: neither can speak TLS
through an SSL object. Kernel TLS would keep the fd a socket, but it needs the
kernel's ``tls`` module (and ``SSL_OP_ENABLE_KTLS``, in Python's ssl from
3.12 on, with TLS 1.3 receive only from OpenSSL 3.2 on); where it is missing
the bytes go through here: the caller gets one end of a socketpair, and one
thread moves bytes between the other end and the TLS socket, both ways (the
COLO back channel runs on the stream fd too).

One thread per connection, driving both directions on non-blocking sockets
with ``poll``: an SSL object must not be used from two threads at once. The
thread holds the GIL only between system calls and OpenSSL calls, which
release it.

Ends: the local side's EOF (a helper that closed its fd, a ``shutdown``) ends
our sending half at the TCP level; the peer's EOF ends the local side's
receiving half. Any error on the TLS side closes the local end outright, so
that whoever reads it sees the link gone at once.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
from typing import Final

log = logging.getLogger(__name__)

CHUNK: Final = 256 * 1024  # what one read moves; TLS records are 16 KiB, many per read
# socketpair buffers large enough that the helper rarely waits on the pump
_SOCKBUF: Final = 4 * 1024 * 1024


class Relay:
    """The pump of one TLS connection; :attr:`local` is what the caller uses."""

    def __init__(self, tls: ssl.SSLSocket, name: str) -> None:
        self.local, self._near = socket.socketpair()
        for s in (self.local, self._near):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKBUF)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKBUF)
        self._tls = tls
        self.sent = self.received = 0  # plaintext bytes, each way
        self._thread = threading.Thread(target=self._run, name=f"tls-relay-{name}", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._pump()
        except (OSError, ValueError) as exc:
            log.debug("relay %s ends: %s", self._thread.name, exc)
        finally:
            self._near.close()
            with contextlib.suppress(OSError):
                self._tls.close()

    @staticmethod
    def _read_records(tls: ssl.SSLSocket) -> bytes | None:
        """What the TLS socket has now, up to CHUNK: b"" at its end, None if nothing.
        One SSL read returns one record (16 KiB) at most: gathering many before one
        local send halves the system calls and the loop's turns."""
        buf = bytearray(CHUNK)
        view, got = memoryview(buf), 0
        while got < CHUNK:
            try:
                n = tls.recv_into(view[got:], CHUNK - got)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except ssl.SSLZeroReturnError:
                n = 0
            if n == 0:
                if got == 0:
                    return b""
                break  # the end comes on the next call, after these bytes
            got += n
        if got == 0:
            return None
        return bytes(view[:got]) if got < CHUNK else bytes(buf)

    def _pump(self) -> None:
        tls, near = self._tls, self._near
        tls.setblocking(False)
        near.setblocking(False)
        up: memoryview | None = None  # local -> TLS, not yet written
        down: memoryview | None = None  # TLS -> local, not yet written
        local_eof = tls_eof = False
        local_gone = False  # closed outright (no reader left): what it sent is still sent
        # an SSL write may need the socket readable (and a read writable): remembered
        up_wants: int = select.POLLOUT
        poller = select.poll()
        while True:
            if local_eof and up is None and (local_gone or (tls_eof and down is None)):
                return
            # -- move what can move without waiting --
            progressed = False
            if down is None and not tls_eof:
                data = self._read_records(tls)
                if data is not None:
                    progressed = True
                    if not data:
                        tls_eof = True
                        with contextlib.suppress(OSError):
                            near.shutdown(socket.SHUT_WR)
                    else:
                        down = memoryview(data)
                        self.received += len(data)
            if down is not None and local_gone:
                down = None  # nobody reads it any more
            if down is not None:
                try:
                    n = near.send(down)
                except BlockingIOError:
                    n = 0
                if n:
                    progressed = True
                    down = down[n:] if n < len(down) else None
            if up is None and not local_eof:
                try:
                    data = near.recv(CHUNK)
                except BlockingIOError:
                    data = None
                except ConnectionResetError:
                    data = b""
                if data is not None:
                    progressed = True
                    if not data:
                        local_eof = True
                        # the peer reads an EOF where our plaintext ends; the records
                        # before it are authenticated, so a cut link cannot pass for data
                        socket.socket.shutdown(tls, socket.SHUT_WR)
                    else:
                        up = memoryview(data)
            if up is not None:
                try:
                    # all or nothing (OpenSSL without partial writes): retried as it is
                    n = tls.send(up)
                except ssl.SSLWantWriteError:
                    n, up_wants = 0, select.POLLOUT
                except ssl.SSLWantReadError:
                    n, up_wants = 0, select.POLLIN
                if n:
                    progressed = True
                    self.sent += n
                    up = up[n:] if n < len(up) else None
            if progressed or (down is None and not tls_eof and tls.pending()):
                continue
            # -- wait for either socket --
            tls_events = 0
            if down is None and not tls_eof:
                tls_events |= select.POLLIN
            if up is not None:
                tls_events |= up_wants
            near_events = 0
            if down is not None:
                near_events |= select.POLLOUT
            if up is None and not local_eof:
                near_events |= select.POLLIN
            for sock, events, on in ((tls, tls_events, True), (near, near_events, not local_gone)):
                with contextlib.suppress(KeyError):
                    poller.unregister(sock)
                # the local end is watched even with nothing to move: its hang-up (closed
                # outright, not only shut for writing) ends a relay whose peer stays silent
                if events or (on and sock is near):
                    poller.register(sock, events)
            for fd, ev in poller.poll():
                if fd == near.fileno() and ev & (select.POLLHUP | select.POLLERR):
                    local_gone = True
                elif ev & (select.POLLERR | select.POLLNVAL):
                    raise ConnectionError("the TLS connection failed")
