"""One run of the save helper, mediated the way libxl mediates it (asyncio adapter).

The session reads frames from the helper's stdout through
:class:`~.messages.ParentCodec`, turns ``log`` into log records and
``progress`` into progress events, answers callbacks with the caller's
coroutines (each within its bound), answers ``complete`` with 0, and takes
the result only when the child has exited (libxl_save_callout.c): exit 0
with ``complete`` seen (and, for a restore, ``restore_results``) is a
result; anything else is a :class:`HelperFailed` that says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from .bounded import Retained
from .messages import (
    DEFAULT_TABLE,
    XTL_ERROR,
    XTL_LEVELS,
    Message,
    MessageSpec,
    ParentCodec,
    ProtocolError,
    cbflags,
)
from .spawn import Mode, RestoreArgs, SaveArgs, SpawnedHelper, spawn_helper

log = logging.getLogger(__name__)

# A callback returns the int to answer, or an awaitable of it (a coroutine function).
Callback = Callable[..., Awaitable[int] | int]

# What libxl answers when its own work for a callback failed.
FAILURE_REPLY: Final = {
    "suspend": 0,
    "postcopy": 0,
    "checkpoint": 0,
    "wait_checkpoint": 0,
    "switch_qemu_logdirty": -1,
    "static_data_done": -1,
}

# xentoollog level -> logging level
_LEVELS: Final = {
    0: logging.NOTSET,
    1: logging.DEBUG,
    2: logging.DEBUG,
    3: logging.DEBUG,
    4: logging.INFO,
    5: logging.INFO,
    6: logging.INFO,
    7: logging.WARNING,
    8: logging.ERROR,
    9: logging.CRITICAL,
}


# What a result keeps of a run that may last months (a Remus save helper lives as
# long as its protection and adds about three trace entries per checkpoint):
# the start and the recent past. Trace entries are small tuples of interned
# names and cached ints, log records a line of text each: together well under
# a megabyte at these sizes, however long the run.
TRACE_HEAD: Final = 64  # the start-up callbacks (static_data_done, the first checkpoints)
TRACE_TAIL: Final = 1024  # the last ~340 checkpoints' callbacks
LOG_HEAD: Final = 64  # start-up lines: a helper that cannot start says why here
LOG_TAIL: Final = 256
LOG_ERRORS: Final = 32  # error lines kept past the head: callers report the first one
FRAMES_HEAD: Final = 256  # raw frames, only with record_frames (tests, debugging)
FRAMES_TAIL: Final = 256
# stderr is free text from a C program: a libxc assert comes last, so most
# of the bound goes to the tail
STDERR_HEAD: Final = 16 << 10
STDERR_TAIL: Final = 48 << 10

TraceEntry = tuple[str, tuple[int | str, ...], int | None]


@dataclass
class Callbacks:
    """The callbacks to install; a None one is left out of cbflags, as libxl does."""

    suspend: Callback | None = None
    postcopy: Callback | None = None
    checkpoint: Callback | None = None
    wait_checkpoint: Callback | None = None
    switch_qemu_logdirty: Callback | None = None
    static_data_done: Callback | None = None

    def get(self, name: str) -> Callback | None:
        cb: Callback | None = getattr(self, name, None)
        return cb

    def installed(self) -> list[str]:
        return [
            n
            for n in (
                "suspend",
                "postcopy",
                "checkpoint",
                "wait_checkpoint",
                "switch_qemu_logdirty",
                "static_data_done",
            )
            if self.get(n) is not None
        ]

    def cbflags(self, mode: Mode, table: Sequence[MessageSpec] = DEFAULT_TABLE) -> int:
        names = self.installed()
        if mode is Mode.RESTORE and any(s.name == "restore_results" and s.callback for s in table):
            names.append("restore_results")
        return cbflags(table, names)


@dataclass(frozen=True, slots=True)
class Progress:
    context: str
    doing_what: str
    done: int
    total: int


@dataclass(frozen=True, slots=True)
class LogRecord:
    level: int  # xentoollog level
    errnoval: int
    context: str
    text: str

    @property
    def level_name(self) -> str:
        return XTL_LEVELS[self.level] if 0 <= self.level < len(XTL_LEVELS) else str(self.level)


def _is_error(rec: LogRecord) -> bool:
    return rec.level >= XTL_ERROR


class Failure(Enum):
    EXIT_STATUS = "exited with an unexpected status"
    STDIN_CLOSED = "exited 254: its stdin closed or a reply read failed"
    STARTUP = "exited 255 before complete: it could not start (see its log)"
    SIGNALLED = "killed by a signal"
    NO_COMPLETE = "exited 0 without sending complete"
    NO_RESTORE_RESULTS = "exited without providing restore_results"
    CALLBACK_TIMEOUT = "a callback did not answer within its bound"
    CALLBACK_MISSING = "asked for a callback that was not installed"
    PROTOCOL = "broke the message protocol"
    ABORTED = "aborted"


@dataclass
class HelperResult:
    mode: Mode
    exit_status: int | None = None
    retval: int | None = None
    errnoval: int | None = None
    restore_results: tuple[int, int] | None = None
    restore_results_seen: int = 0
    # (name, args, reply): the first and the latest callbacks, complete and restore_results
    trace: Retained[TraceEntry] = field(
        default_factory=lambda: Retained(head=TRACE_HEAD, tail=TRACE_TAIL)
    )
    # every trace entry ever, per name: the trace itself forgets the middle of a long run
    counts: Counter[str] = field(default_factory=Counter)
    logs: Retained[LogRecord] = field(
        default_factory=lambda: Retained(
            head=LOG_HEAD, tail=LOG_TAIL, pinned=LOG_ERRORS, pin=_is_error
        )
    )
    # raw, when record_frames is set
    frames: Retained[bytes] = field(
        default_factory=lambda: Retained(head=FRAMES_HEAD, tail=FRAMES_TAIL)
    )
    stderr: str = ""  # its first STDERR_HEAD and last STDERR_TAIL bytes

    def record(self, name: str, args: tuple[int | str, ...], reply: int | None) -> None:
        self.trace.append((name, args, reply))
        self.counts[name] += 1

    @property
    def ok(self) -> bool:
        """The operation itself succeeded (libxc returned 0)."""
        return self.retval == 0

    def callbacks(self) -> list[str]:
        """The callback/frame sequence without log and progress noise, as far as the
        trace keeps it (``counts`` has the totals of a long run)."""
        return [name for name, _, _ in self.trace]


class HelperFailed(Exception):
    def __init__(self, failure: Failure, result: HelperResult, detail: str = "") -> None:
        self.failure = failure
        self.result = result
        self.detail = detail
        msg = f"libxl-save-helper ({result.mode.value}) {failure.value}"
        super().__init__(f"{msg}: {detail}" if detail else msg)


@dataclass
class SessionBounds:
    callback_timeout: float = 60.0
    per_callback: dict[str, float] = field(default_factory=dict)
    abort_grace: float = 5.0  # SIGTERM -> SIGKILL

    def for_callback(self, name: str) -> float:
        return self.per_callback.get(name, self.callback_timeout)


class HelperSession:
    def __init__(
        self,
        mode: Mode,
        callbacks: Callbacks,
        *,
        table: Sequence[MessageSpec] = DEFAULT_TABLE,
        bounds: SessionBounds | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        on_log: Callable[[LogRecord], None] | None = None,
        on_restore_results: Callable[[int, int], None] | None = None,
        logger: logging.Logger = log,
        record_frames: bool = False,
    ) -> None:
        self.mode = mode
        self.callbacks = callbacks
        self.table = table
        self.bounds = bounds or SessionBounds()
        self.on_progress = on_progress
        self.on_log = on_log
        self.on_restore_results = on_restore_results
        self.log = logger
        self.record_frames = record_frames
        self.result = HelperResult(mode)
        self.helper: SpawnedHelper | None = None
        self._complete = False
        self._failure: tuple[Failure, str] | None = None
        self._aborting = False
        self._cb_task: asyncio.Task[None] | None = None

    @property
    def cbflags(self) -> int:
        return self.callbacks.cbflags(self.mode, self.table)

    async def run(
        self,
        stream_fd: int,
        back_fd: int,
        args: SaveArgs | RestoreArgs,
        *,
        helper: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> HelperResult:
        self.helper = await spawn_helper(
            self.mode, stream_fd, back_fd, args, helper=helper, extra_env=extra_env
        )
        proc = self.helper.process
        self.log.debug("spawned %s (pid %d)", " ".join(self.helper.argv), proc.pid)
        try:
            stderr_task = asyncio.create_task(self._drain_stderr())
            try:
                await self._pump()
            except BaseException:
                # cancelled or failed here: a helper left blocked on a reply would hold
                # the stream fd forever (libxl's helper_failed kills it too)
                self._kill()
                await asyncio.shield(proc.wait())
                raise
            finally:
                if self._failure is not None and proc.returncode is None:
                    self._kill()
            status = await proc.wait()
            await stderr_task
            self.result.exit_status = status
            return self._conclude(status)
        finally:
            self.helper.close_parent_copies()
            if self._cb_task is not None and not self._cb_task.done():
                self._cb_task.cancel()
            transport = getattr(proc, "_transport", None)
            if transport is not None:
                transport.close()

    async def abort(self) -> None:
        """Stop the helper as libxl's helper_stop does: SIGTERM, then SIGKILL after a bound.

        A save helper answers SIGTERM by failing its stream and cleaning up,
        which may still call back (logdirty off) and sends complete: the
        session keeps answering until it exits.
        """
        if self.helper is None or self.helper.process.returncode is not None:
            return
        self._aborting = True
        proc = self.helper.process
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), self.bounds.abort_grace)
        except TimeoutError:
            self.log.warning("helper pid %d ignored SIGTERM; sending SIGKILL", proc.pid)
            self._kill()

    # -- internals ----------------------------------------------------------------

    def _kill(self) -> None:
        assert self.helper is not None
        with contextlib.suppress(ProcessLookupError):
            self.helper.process.kill()

    async def _drain_stderr(self) -> None:
        assert self.helper is not None and self.helper.process.stderr is not None
        head, tail = bytearray(), bytearray()
        total = 0
        while data := await self.helper.process.stderr.read(65536):
            total += len(data)
            room = STDERR_HEAD - len(head)
            head += data[:room]
            tail += data[room:] if room > 0 else data
            if len(tail) > STDERR_TAIL:
                del tail[: len(tail) - STDERR_TAIL]
            for line in data.decode(errors="replace").splitlines():
                self.log.warning("helper stderr: %s", line)
        gap = total - len(head) - len(tail)
        cut = f"\n[... {gap} bytes of stderr not kept ...]\n".encode() if gap else b""
        self.result.stderr = bytes(head + cut + tail).decode(errors="replace")

    def _write_reply(self, data: bytes) -> None:
        assert self.helper is not None
        if self.helper.replies_fd < 0:
            return
        # 4 bytes into an empty pipe never block; a gone helper's exit status says why
        with contextlib.suppress(BrokenPipeError):
            os.write(self.helper.replies_fd, data)

    async def _pump(self) -> None:
        """Read frames as they come and answer them, until stdout ends or the run fails.

        The helper is single-threaded and blocks on each reply, so at most one
        callback is ever outstanding. A callback that returns a plain int is
        answered in the event-loop turn that read its frame; a coroutine one
        runs as a task while stdout keeps being drained into the codec.
        """
        assert self.helper is not None
        loop = asyncio.get_running_loop()
        rfd = self.helper.messages_fd
        os.set_blocking(rfd, False)
        codec = ParentCodec(self.table)
        done: asyncio.Future[None] = loop.create_future()
        busy = False

        def finish() -> None:
            loop.remove_reader(rfd)
            if not done.done():
                done.set_result(None)

        def process() -> None:
            nonlocal busy
            try:
                while (msg := codec.next_message()) is not None:
                    if self.record_frames:
                        self.result.frames.append(codec.last_frame)
                    reply = self._handle(msg)
                    if isinstance(reply, Awaitable):
                        busy = True
                        self._cb_task = loop.create_task(answer_later(msg, reply))
                        return
                    if reply is not None:
                        self._write_reply(codec.reply(reply))
                    if self._failure is not None:
                        finish()
                        return
            except ProtocolError as exc:
                self._failure = (Failure.PROTOCOL, str(exc))
                finish()

        def readable() -> None:
            try:
                data = os.read(rfd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                if codec.unparsed and self._failure is None:
                    self._failure = (
                        Failure.PROTOCOL,
                        f"stdout ended inside a frame ({codec.unparsed} bytes)",
                    )
                finish()
                return
            codec.receive_data(data)
            if not busy:
                process()

        async def answer_later(msg: Message, pending: Awaitable[int]) -> None:
            nonlocal busy
            bound = self.bounds.for_callback(msg.name)
            task = asyncio.current_task()
            assert task is not None
            # a bare timer, not asyncio.timeout(): a third of the round-trip cost otherwise
            timer = loop.call_later(bound, task.cancel)
            try:
                reply: int | None = int(await pending)
                self.result.record(msg.name, msg.args, reply)
            except asyncio.CancelledError:
                if timer.cancelled() or loop.time() < timer.when():
                    raise  # cancelled from outside, not our bound
                self._failure = (
                    Failure.CALLBACK_TIMEOUT,
                    f"{msg.name} gave no answer in {bound:g} s",
                )
                self.result.record(msg.name, msg.args, None)
                reply = None
            except Exception as exc:
                reply = self._callback_failed(msg, exc)
            except BaseException:
                finish()
                raise
            finally:
                timer.cancel()
            if reply is not None:
                self._write_reply(codec.reply(reply))
            busy = False
            if self._failure is not None:
                finish()
            else:
                process()

        loop.add_reader(rfd, readable)
        try:
            await done
        finally:
            loop.remove_reader(rfd)

    def _handle(self, msg: Message) -> int | Awaitable[int] | None:
        """The reply to a frame: an int, None (no reply), or a callback still running."""
        name = msg.name
        if name == "log":
            level, errnoval, context, text = msg.args
            assert isinstance(level, int) and isinstance(errnoval, int)
            rec = LogRecord(level, errnoval, str(context), str(text))
            self.result.logs.append(rec)
            suffix = f" (errno {errnoval})" if errnoval not in (0, -1, 0xFFFFFFFF) else ""
            level_no = _LEVELS.get(level, logging.INFO)
            self.log.log(level_no, "helper [%s] %s%s", context, text, suffix)
            if self.on_log:
                self.on_log(rec)
            return None
        if name == "progress":
            context, doing, done, total = msg.args
            assert isinstance(done, int) and isinstance(total, int)
            if self.on_progress:
                self.on_progress(Progress(str(context), str(doing), done, total))
            return None
        if name == "restore_results":
            store, console = msg.args
            assert isinstance(store, int) and isinstance(console, int)
            self.result.restore_results = (store, console)
            self.result.restore_results_seen += 1
            self.result.record(name, msg.args, None)
            if self.on_restore_results:
                self.on_restore_results(store, console)
            return None
        if name == "complete":
            retval, errnoval = msg.args
            assert isinstance(retval, int) and isinstance(errnoval, int)
            self.result.retval, self.result.errnoval = retval, errnoval
            self._complete = True
            self.result.record(name, msg.args, 0)
            return 0
        cb = self.callbacks.get(name)
        if cb is None:
            self._failure = (Failure.CALLBACK_MISSING, name)
            self.result.record(name, msg.args, None)
            return None
        try:
            reply = cb(*msg.args)
        except Exception as exc:
            return self._callback_failed(msg, exc)
        if isinstance(reply, Awaitable):
            return reply
        self.result.record(name, msg.args, int(reply))
        return int(reply)

    def _callback_failed(self, msg: Message, exc: Exception) -> int:
        """A failing callback is answered as libxl answers its own failures."""
        reply = FAILURE_REPLY[msg.name]
        self.log.error("callback %s failed: %s; answering %d", msg.name, exc, reply)
        self.result.record(msg.name, msg.args, reply)
        return reply

    def _conclude(self, status: int) -> HelperResult:
        r = self.result
        if self._failure is not None:
            failure, detail = self._failure
            raise HelperFailed(failure, r, detail)
        if status < 0:
            sig = signal.Signals(-status).name
            detail = sig + (": a libxc assert? see stderr" if sig == "SIGABRT" else "")
            if self._aborting:
                raise HelperFailed(Failure.ABORTED, r, detail)
            raise HelperFailed(Failure.SIGNALLED, r, detail)
        if status == 254:
            raise HelperFailed(Failure.STDIN_CLOSED, r)
        if status == 255 and not self._complete:
            last = r.logs[-1].text if r.logs else ""
            raise HelperFailed(Failure.STARTUP, r, last)
        if status != 0:
            raise HelperFailed(Failure.EXIT_STATUS, r, f"status {status}")
        if not self._complete:
            raise HelperFailed(Failure.NO_COMPLETE, r)
        if self.mode is Mode.RESTORE and r.restore_results is None:
            raise HelperFailed(Failure.NO_RESTORE_RESULTS, r)
        return r
