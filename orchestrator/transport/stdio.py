"""Both channels over one pipe pair: ``remusctl protect NAME --to HOST -s CMD``.

Why
---
``xl remus -s CMD HOST`` does not open its own connection: it runs
``sh -c "CMD HOST xl migrate-receive -r"`` (with an empty CMD, ``sh -c "HOST"``)
and sends the replication stream into that command's stdin and reads the
receiver's answers from its stdout. CMD is typically ``ssh``, so the
replication rides on whatever the administrator already trusts (keys, jump
hosts, ``ProxyCommand``) and no port has to be opened on the secondary. We
offer the same: the primary runs ``sh -c "CMD HOST remusctl receive --stdio"``.

We have two channels, though, not one: the *stream* (primary to secondary; a
plain blocking socket whose fd the save/restore helper reads or writes
directly) and the *control* connection (both ways; HELLO, ACK, HEARTBEAT, ...).
A command gives us exactly one pipe pair, so both travel multiplexed over it
in frames of ``u32 channel, u32 length, payload`` (little-endian; channel 1 is
the stream, 2 is control). A zero-length frame ends its channel (a
half-close: the other channel carries on), so that "the stream ended" and
"the control connection closed" stay distinct as they are over TCP. The
secondary never sends on channel 1.

The helper must still see an ordinary fd, and :class:`.controlio.Control`
an ordinary asyncio stream, so each side puts a ``socket.socketpair()`` per
channel between its users and the pipe, and pump threads move bytes between
the socketpairs and the pipes (blocking I/O in threads: simple, and the GIL
is released for every read and write, which is what bulk data wants).
:func:`open_command` is the primary's side, :func:`open_stdio` the
secondary's; :class:`MuxDecoder` and :func:`encode` are the codec, sans I/O.
The primary's pumps (:class:`PrimaryLink`) work over any duplex byte pipe:
:mod:`.ssh` runs them over an SSH channel (``protect --ssh``).

Head-of-line blocking
---------------------
Over TCP the control connection has its own socket; here a control frame
queues behind every stream byte already written into the pipe, the ssh
channel and its TCP connection. The primary's writer gives control frames
priority, but only at frame granularity (a stream frame is at most one read,
``STREAM_CHUNK``) and only for what has not left the process yet: the
kernel's pipe buffer (we ask for 1 MiB), ssh's channel window (megabytes in
OpenSSH) and the TCP send buffer all sit in front. While a checkpoint of
N bytes crosses a link of B bytes/s, a HEARTBEAT may therefore arrive up to
about (buffered bytes)/B late: over a 10 MB/s link, several hundred ms, more
than the default ``heartbeat_timeout`` (0.3 s). So on the secondary any byte
from the primary on *either* channel proves it is alive: a watchdog over
this transport must use ``max(control.last_heard, link.last_input)``
(:attr:`StdioLink.last_input`), not the heartbeats alone, or it will fail
over in the middle of every large checkpoint. The same holds the other way
round inside the secondary: channel 2 is demultiplexed by the thread that
feeds the stream socket, so while the stream's reader (the restore helper)
does not read, control frames behind the stream data wait too (and
``last_input`` stops advancing). That is only latency as long as nobody on
the secondary waits for a control frame before reading the stream data in
front of it (in Remus the primary writes nothing after CHECKPOINT_END until
the ACK, so a checkpoint's control frames, e.g. its disk blocks, must be sent
before its CHECKPOINT_END, not after). ACKs travel the other direction, where
there is no stream data, and are not delayed.

Stdout discipline on the secondary
----------------------------------
In ``--stdio`` mode fd 1 *is* the channel to the primary: a single stray
byte from anybody else (a ``print``, a child process that inherited fd 1)
corrupts the multiplexed stream and the primary drops the link. By default
:func:`open_stdio` therefore takes fds 0 and 1 for itself: it keeps private
(close-on-exec) duplicates, points fd 0 at ``/dev/null`` and fd 1 at fd 2,
so that later output to stdout, ours or a child's, lands on stderr. Only
processes that were started *before* the call and still hold the original
fd 1 can corrupt it; start none.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Final, NoReturn

from .control import Role
from .controlio import Control

log = logging.getLogger(__name__)

HEADER: Final = struct.Struct("<II")  # channel, payload length
STREAM: Final = 1
CONTROL: Final = 2
CHANNELS: Final = frozenset((STREAM, CONTROL))
MAX_PAYLOAD: Final = 4 << 20
STREAM_CHUNK: Final = 256 << 10  # one stream frame: one read of the stream socketpair
CONTROL_CHUNK: Final = 64 << 10
PIPE_READ: Final = 1 << 20  # one read of the pipe from the peer
PIPE_SIZE: Final = 1 << 20  # F_SETPIPE_SZ we ask for (Linux's default cap for non-root)
SOCKET_BUFFER: Final = 1 << 20  # SO_SNDBUF/SO_RCVBUF of the socketpairs
_COMPACT_AT: Final = 1 << 20

Buffer = bytes | bytearray | memoryview


# -- the codec, sans I/O ---------------------------------------------------------------------


class MuxError(Exception):
    """Bad multiplexed input: ``offset`` is where the offending frame starts."""

    def __init__(self, offset: int, message: str) -> None:
        self.offset = offset
        self.message = message
        super().__init__(f"stdio mux offset {offset}: {message}")


def encode_header(channel: int, length: int) -> bytes:
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel}")
    if not 0 <= length <= MAX_PAYLOAD:
        raise ValueError(f"payload of {length} bytes (at most {MAX_PAYLOAD})")
    return HEADER.pack(channel, length)


def encode(channel: int, payload: Buffer) -> bytes:
    """One frame. An empty payload is the end of ``channel`` (a half-close)."""
    return encode_header(channel, len(payload)) + payload


class MuxDecoder:
    """Bytes in, ``(channel, payload)`` frames out; tracks the input offset.

    ``channels`` restricts what the peer may send (the primary accepts only
    CONTROL from the secondary). A frame on a channel after that channel's
    end (its zero-length frame) is an error too. After a :class:`MuxError`
    every further call raises it again.
    """

    def __init__(self, channels: Iterable[int] = CHANNELS, max_payload: int = MAX_PAYLOAD) -> None:
        self.channels = frozenset(channels)
        self.max_payload = max_payload
        self.ended: set[int] = set()
        self._buf = bytearray()
        self._pos = 0  # start of the first undecoded frame in _buf
        self._base = 0  # input offset of _buf[0]
        self._error: MuxError | None = None

    @property
    def offset(self) -> int:
        """Input offset of the next frame (everything before it has been returned)."""
        return self._base + self._pos

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def receive_data(self, data: Buffer) -> None:
        if self._error is not None:
            raise self._error
        if self._pos and (self._pos >= _COMPACT_AT or self._pos * 2 >= len(self._buf)):
            del self._buf[: self._pos]
            self._base += self._pos
            self._pos = 0
        self._buf += data

    def next_frame(self) -> tuple[int, bytes] | None:
        """The next complete frame, or None until more bytes arrive."""
        if self._error is not None:
            raise self._error
        pos = self._pos
        if len(self._buf) - pos < HEADER.size:
            return None
        channel, length = HEADER.unpack_from(self._buf, pos)
        if channel not in self.channels:
            what = "unknown channel" if channel not in CHANNELS else "unexpected channel"
            self._fail(f"{what} {channel}")
        if length > self.max_payload:
            self._fail(f"channel {channel}: frame length {length} exceeds {self.max_payload}")
        if channel in self.ended:
            self._fail(f"channel {channel}: frame after the channel's end")
        end = pos + HEADER.size + length
        if len(self._buf) < end:
            return None
        with memoryview(self._buf) as view:
            payload = view[pos + HEADER.size : end].tobytes()
        if end == len(self._buf):  # the usual case for bulk data: nothing to move
            self._base += end
            self._buf.clear()
            self._pos = 0
        else:
            self._pos = end
        if not length:
            self.ended.add(channel)
        return channel, payload

    def end_of_input(self) -> None:
        """The input ended: an error if it ended inside a frame."""
        if self._error is not None:
            raise self._error
        if self.buffered:
            what = "header"
            if self.buffered >= HEADER.size:
                _, length = HEADER.unpack_from(self._buf, self._pos)
                what = f"{HEADER.size + length}-byte frame"
            self._fail(f"input ended inside a {what} ({self.buffered} bytes of it)")

    def _fail(self, message: str) -> NoReturn:
        self._error = MuxError(self.offset, message)
        raise self._error


# -- plumbing ---------------------------------------------------------------------------------


def _write_all(fd: int, data: Buffer) -> None:
    with memoryview(data) as view:
        while view:
            n = os.write(fd, view)
            view = view[n:]


def _grow_pipe(fd: int) -> None:
    """Ask for a bigger pipe buffer: fewer context switches per MB (best effort)."""
    with contextlib.suppress(OSError):
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid``, from /proc (best effort; empty without procfs)."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    ppid = int(f.read().rpartition(b")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def _socketpair() -> tuple[socket.socket, socket.socket]:
    """(user end, pump end), both blocking, with big buffers."""
    user, pump = socket.socketpair()
    for s in (user, pump):
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    return user, pump


class _Link:
    """What both sides share: the pump sockets, failure, thread bookkeeping."""

    def __init__(self, s_pump: socket.socket, c_pump: socket.socket) -> None:
        self._s_pump, self._c_pump = s_pump, c_pump
        self._lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}
        self._running = 0
        self._cleanup: list[Callable[[], None]] = []
        self._failed = False
        self._closing = False
        self._done = False
        self.error: str | None = None
        """Why the link broke, or None (a clean end or :meth:`close`)."""
        self.last_input = time.monotonic()
        """time.monotonic() of the last bytes read from the peer, on either channel."""

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        def run() -> None:
            try:
                target()
            except Exception:  # a bug: never leave the link half alive
                log.exception("stdio mux thread %s", name)
                self._fail(f"internal error in {name}")
            finally:
                self._thread_done()

        t = threading.Thread(target=run, name=f"stdio-mux-{name}", daemon=True)
        with self._lock:
            self._running += 1
            self._threads[name] = t
        t.start()

    def _thread_done(self) -> None:
        with self._lock:
            self._running -= 1
            if self._running:
                return
            self._done = True
            cleanup, self._cleanup = self._cleanup, []
            for s in (self._s_pump, self._c_pump):
                s.close()
        for fn in cleanup:
            with contextlib.suppress(OSError):
                fn()

    def _shutdown(self, sock: socket.socket, how: int) -> None:
        with self._lock, contextlib.suppress(OSError):
            if not self._done:
                sock.shutdown(how)

    def _fail(self, reason: str | None) -> None:
        """Break both channels for our users: the stream's writer gets EPIPE, the
        stream's reader and the Control get EOF. ``reason`` None: not an error."""
        with self._lock:
            if reason is not None and self.error is None and not self._closing:
                self.error = reason
                log.warning("stdio link: %s", reason)
            if self._failed:
                return
            self._failed = True
        self._shutdown(self._s_pump, socket.SHUT_RDWR)
        self._shutdown(self._c_pump, socket.SHUT_RDWR)

    @property
    def closed(self) -> bool:
        """All pump threads have ended and their fds are closed."""
        return self._done


class _Uplink:
    """Frames into one byte pipe from two threads; a waiting control frame goes first.

    ``send`` writes all of a frame (into a pipe's fd, onto an SSH channel)."""

    def __init__(self, send: Callable[[Buffer], None]) -> None:
        self._send = send
        self._cond = threading.Condition()
        self._busy = False
        self._urgent = 0
        self._closed = False

    def write(self, frame: Buffer, urgent: bool) -> None:
        with self._cond:
            if urgent:
                self._urgent += 1
            try:
                while self._busy or (not urgent and self._urgent):
                    self._cond.wait()
            finally:
                if urgent:
                    self._urgent -= 1
            if self._closed:
                raise BrokenPipeError("uplink closed")
            self._busy = True
        try:
            self._send(frame)
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def close(self) -> None:
        """No more writes (called once no thread writes any more)."""
        with self._cond:
            self._closed = True

    def end(self, channel: int) -> None:
        """Send ``channel``'s end (a zero-length frame)."""
        self.write(encode(channel, b""), urgent=channel == CONTROL)


# -- the primary: one duplex byte pipe to the secondary ---------------------------------------


class PrimaryLink(_Link, abc.ABC):
    """The primary's pumps over one duplex byte pipe to the secondary: the stream
    and control go out multiplexed, control comes back.

    What :class:`CommandLink` (a command's stdin and stdout) and
    ``ssh.SshLink`` (an SSH session's channel) share; a subclass gives the pipe:
    :meth:`_send`, :meth:`_recv`, :meth:`_end_output`, and the names its errors
    use (``OUT``, ``IN``, ``PEER``, ``CLOSED``).
    """

    OUT = "command's stdin"
    IN = "command's stdout"
    PEER = "the command"
    CLOSED = "the command closed its stdout"

    def __init__(self, s_pump: socket.socket, c_pump: socket.socket) -> None:
        super().__init__(s_pump, c_pump)
        self._uplink = _Uplink(self._send)
        self._clean = False  # the secondary ended control before its output
        self._up_running = 2  # the threads writing to the peer: the last one out ends it

    @abc.abstractmethod
    def _send(self, data: Buffer) -> None:
        """All of ``data`` to the secondary (blocking)."""

    @abc.abstractmethod
    def _recv(self) -> bytes:
        """The next bytes from the secondary (blocking); b"" at the end."""

    @abc.abstractmethod
    def _end_output(self) -> None:
        """Nothing more goes to the secondary: it sees the end of its input."""

    @abc.abstractmethod
    def close(self, grace: float = 3.0) -> None:
        """End both channels; the secondary gets ``grace`` seconds to exit on the EOF
        before it is made to. Does not block."""

    def _start_pumps(self) -> None:
        self._spawn("stream-up", self._stream_up)
        self._spawn("control-up", self._control_up)
        self._spawn("down", self._down)

    def _up_done(self) -> None:
        with self._lock:
            self._up_running -= 1
            last = not self._up_running
        if last:
            self._uplink.close()
            self._end_output()  # the secondary sees EOF (ssh passes it on): time to exit

    def _stream_up(self) -> None:
        buf = bytearray(HEADER.size + STREAM_CHUNK)
        frame = memoryview(buf)
        body = frame[HEADER.size :]
        try:
            while n := self._s_pump.recv_into(body):
                HEADER.pack_into(buf, 0, STREAM, n)
                self._uplink.write(frame[: HEADER.size + n], urgent=False)
            if not self._failed:
                self._uplink.end(STREAM)
        except OSError as exc:
            self._fail(f"{self.OUT}: {exc}")
        finally:
            self._up_done()

    def _control_up(self) -> None:
        try:
            while data := self._c_pump.recv(CONTROL_CHUNK):
                self._uplink.write(encode(CONTROL, data), urgent=True)
            if not self._failed:
                self._uplink.end(CONTROL)
        except OSError as exc:
            self._fail(f"{self.OUT}: {exc}")
        finally:
            self._up_done()

    def _down(self) -> None:
        decoder = MuxDecoder(channels=(CONTROL,))
        consumer = True  # somebody still reads the Control
        try:
            while data := self._recv():
                self.last_input = time.monotonic()
                decoder.receive_data(data)
                while (frame := decoder.next_frame()) is not None:
                    if not frame[1]:
                        self._shutdown(self._c_pump, socket.SHUT_WR)
                        self._clean = True
                    elif consumer:
                        try:
                            self._c_pump.sendall(frame[1])
                        except OSError:
                            consumer = False  # the Control was closed: drop the rest
            decoder.end_of_input()
            if not self._clean:
                self._fail(self.CLOSED)
        except MuxError as exc:
            self._fail(f"from {self.PEER}: {exc}")
        except OSError as exc:
            self._fail(f"{self.IN}: {exc}")


class CommandLink(PrimaryLink):
    """The primary's end of ``sh -c COMMAND``: pumps and the process.

    Built by :func:`open_command`. When the command exits, its stdin breaks
    or it sends something invalid, both channels break at once (see
    :meth:`_Link._fail`); :attr:`error` says why.
    """

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        s_pump: socket.socket,
        c_pump: socket.socket,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.process = process
        assert process.stdin is not None and process.stdout is not None
        self._stdin, self._stdout = process.stdin, process.stdout
        super().__init__(s_pump, c_pump)
        self._exited = threading.Event()
        self._loop = loop
        self._exit: asyncio.Future[int] = loop.create_future()
        self._cleanup.append(self._stdout.close)

    def _start(self) -> None:
        self._start_pumps()
        self._spawn("wait", self._wait)

    def _send(self, data: Buffer) -> None:
        _write_all(self._stdin.fileno(), data)

    def _recv(self) -> bytes:
        return os.read(self._stdout.fileno(), PIPE_READ)

    def _end_output(self) -> None:
        self._stdin.close()

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def wait(self) -> int:
        """The command's exit status, once it has exited."""
        return await asyncio.shield(self._exit)

    def close(self, grace: float = 3.0) -> None:
        """End both channels, give the command ``grace`` seconds to exit on the EOF,
        then SIGTERM, ``grace`` more, then SIGKILL. Does not block."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._shutdown(self._s_pump, socket.SHUT_RDWR)
        self._shutdown(self._c_pump, socket.SHUT_RDWR)
        threading.Thread(
            target=self._reap, args=(grace,), name="stdio-mux-reap", daemon=True
        ).start()

    def terminate(self) -> None:
        """SIGTERM to the command and its descendants (``sh -c`` may not exec ssh)."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self._exited.is_set():
            return
        for pid in [*_descendants(self.process.pid), self.process.pid]:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)

    def _reap(self, grace: float) -> None:
        for sig in (self.terminate, self.kill):
            if self._exited.wait(grace):
                return
            sig()

    def _wait(self) -> None:
        rc = self.process.wait()
        self._exited.set()
        if rc == 0:  # let the last of its output in before calling the end unclean
            self._threads["down"].join(1.0)
        self._fail(None if rc == 0 and self._clean else f"command exited with status {rc}")

        def resolve() -> None:
            if not self._exit.done():
                self._exit.set_result(rc)

        with contextlib.suppress(RuntimeError):  # the loop is gone
            self._loop.call_soon_threadsafe(resolve)


async def open_command(command: str) -> tuple[socket.socket, Control, CommandLink]:
    """Run ``sh -c command`` and carry the stream and control channels over its
    stdin and stdout (stderr is inherited).

    Returns the stream socket (blocking; hand its fd to the save helper, which
    writes the stream into it), the :class:`Control` and the link. The command
    must run :func:`open_stdio` on its other end (``remusctl receive --stdio``).
    """
    loop = asyncio.get_running_loop()
    process = subprocess.Popen(
        ["sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    )
    assert process.stdin is not None and process.stdout is not None
    _grow_pipe(process.stdin.fileno())
    _grow_pipe(process.stdout.fileno())
    stream, s_pump = _socketpair()
    c_user, c_pump = _socketpair()
    link = CommandLink(process, s_pump, c_pump, loop)
    link._start()
    reader, writer = await asyncio.open_connection(sock=c_user)
    return stream, Control(reader, writer), link


# -- the secondary: our own stdin and stdout ---------------------------------------------------


class StdioLink(_Link):
    """The secondary's end: ``in_fd`` from the primary, ``out_fd`` to it.

    Built by :func:`open_stdio`. :attr:`last_input` is the liveness signal
    to use (see the module's notes on head-of-line blocking).
    """

    def __init__(
        self, in_fd: int, out_fd: int, s_pump: socket.socket, c_pump: socket.socket
    ) -> None:
        super().__init__(s_pump, c_pump)
        self.in_fd, self.out_fd = in_fd, out_fd
        self.eof = False
        """The primary's output ended (cleanly or not)."""

    def _start(self) -> None:
        self._spawn("down", self._down)
        self._spawn("control-up", self._control_up)

    def close(self, flush: float = 2.0) -> None:
        """End both channels (the primary sees control end). Waits up to ``flush``
        seconds for what the Control wrote to reach ``out_fd`` (the pumps are daemon
        threads: a process exiting right after close() would otherwise cut off its
        last frames, the end of control among them); the thread reading ``in_fd``
        ends when the primary closes its side."""
        with self._lock:
            self._closing = True
            up = self._threads.get("control-up")
        self._shutdown(self._s_pump, socket.SHUT_RDWR)
        # SHUT_WR, not RDWR, on the control pump first: the pump still reads what the
        # Control wrote before closing, then sees EOF and sends the end frame
        self._shutdown(self._c_pump, socket.SHUT_WR)
        if up is not None and up is not threading.current_thread():
            up.join(flush)
        self._shutdown(self._c_pump, socket.SHUT_RDWR)

    def _down(self) -> None:
        decoder = MuxDecoder()
        pumps = {STREAM: self._s_pump, CONTROL: self._c_pump}
        gone: set[int] = set()  # channels whose user shut its socket: drop their data
        try:
            while data := os.read(self.in_fd, PIPE_READ):
                self.last_input = time.monotonic()
                decoder.receive_data(data)
                while (frame := decoder.next_frame()) is not None:
                    channel, payload = frame
                    if not payload:
                        self._shutdown(pumps[channel], socket.SHUT_WR)
                    elif channel not in gone:
                        try:
                            pumps[channel].sendall(payload)
                        except OSError:  # e.g. stream.shutdown(SHUT_RDWR) to fail over
                            gone.add(channel)
            self.eof = True  # before anything shuts a pump: users may look on EOF
            decoder.end_of_input()
        except MuxError as exc:
            self.eof = True
            self._fail(f"from the primary: {exc}")
        except OSError as exc:
            self.eof = True
            self._fail(f"reading from the primary: {exc}")
        finally:
            self.eof = True
            self._shutdown(self._s_pump, socket.SHUT_WR)
            self._shutdown(self._c_pump, socket.SHUT_WR)

    def _control_up(self) -> None:
        try:
            while data := self._c_pump.recv(CONTROL_CHUNK):
                _write_all(self.out_fd, encode(CONTROL, data))
            if not self._failed:
                _write_all(self.out_fd, encode(CONTROL, b""))
        except OSError as exc:
            self._fail(f"writing to the primary: {exc}")


def _take_over(fd: int, replacement: int) -> int:
    """A private close-on-exec copy of ``fd``; ``fd`` itself now means ``replacement``."""
    private = os.dup(fd)
    os.dup2(replacement, fd)
    return private


async def open_stdio(
    in_fd: int = 0, out_fd: int = 1, *, take_std: bool = True
) -> tuple[socket.socket, Control, StdioLink]:
    """The secondary's side of :func:`open_command`: the channels over ``in_fd``
    (from the primary) and ``out_fd`` (to it).

    Returns the stream socket (blocking; the restore helper reads the stream
    from its fd; ``shutdown(SHUT_RDWR)`` on it is the way to fail over), the
    :class:`Control` and the link. With ``take_std`` (the default), fd 0 and
    fd 1, if those are the ones given, are taken over as the module's notes
    describe: fd 0 becomes /dev/null, fd 1 a copy of fd 2. Nothing else may
    write to ``out_fd``.
    """
    cleanup: list[Callable[[], None]] = []
    if take_std and in_fd == 0:
        devnull = os.open(os.devnull, os.O_RDONLY)
        try:
            in_fd = _take_over(0, devnull)
        finally:
            os.close(devnull)
        cleanup.append(partial(os.close, in_fd))
    if take_std and out_fd == 1:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        out_fd = _take_over(1, 2)
        cleanup.append(partial(os.close, out_fd))
    _grow_pipe(in_fd)
    _grow_pipe(out_fd)
    stream, s_pump = _socketpair()
    c_user, c_pump = _socketpair()
    link = StdioLink(in_fd, out_fd, s_pump, c_pump)
    link._cleanup += cleanup
    link._start()
    reader, writer = await asyncio.open_connection(sock=c_user)
    # `receive --stdio` is the secondary of its protection
    return stream, Control(reader, writer, Role.SECONDARY), link
