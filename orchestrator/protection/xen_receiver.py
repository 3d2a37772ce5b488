"""The Remus secondary on real Xen: Xen's own restore behind a checkpoint gate.

We do not build Xen domains ourselves. The secondary runs `xl migrate-receive
-r -e` (what `xl remus` runs over ssh on the backup host) and feeds its stdin
through a :class:`~orchestrator.streams.gate.CheckpointGate`:

* xl writes its banner (``xl migration receiver ready, send binary domain
  data.\\n``, ``tools/xl/xl.h``) and then reads an xl savefile header with
  the domain's JSON configuration followed by the libxl stream, restoring
  with libxl's checkpointed-stream (REMUS) reader;
* the gate releases bytes to xl only up to the end of a complete
  checkpoint, and each released checkpoint is ACKed to the primary over our
  control channel as soon as it is whole here, before xl has read it (xl
  acknowledges nothing; the primary's output for that epoch is released on
  our ACK); xl is fed from a queue, so the stream is read on while xl
  restores (see :meth:`XenRemusSecondary._send_acks`);
* on failover (heartbeats stop, the stream breaks, or an administrator
  forces it) the gate drops the partial checkpoint it holds and xl's stdin
  is closed. Its input thus ends exactly at a checkpoint boundary: libxl
  and libxc treat that as the primary's failure and build the domain from
  the last complete checkpoint; with ``-e`` xl unpauses it ("migration
  target: Remus Failover for domain N") and exits.

The heartbeat watch, the forced failover and the control handling are every
secondary's (:class:`~.session.Secondary`); only the restore differs.

Status: the gate is tested on its own (``tests/streams/test_gate.py``); this
adapter needs a running Xen (xl cannot start without xenstored and privcmd)
and runs in the nested lab (``tests/nested``, issue 8).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import socket
from collections.abc import Callable
from typing import Final

from ..hypervisors.base import DomainInfo, Hypervisor
from ..streams import xl
from ..streams.errors import Layer, StreamError
from ..streams.gate import CheckpointComplete, CheckpointGate, Release
from ..transport.control import Hello
from ..transport.controlio import Control
from .session import ReplicationError, Secondary, ack_digest
from .spec import ProtectionSpec
from .xl_guard import XlGuard

BANNER: Final = b"xl migration receiver ready, send binary domain data.\n"
_FAILOVER_RE: Final = re.compile(rb"Remus Failover for domain (\d+)")


class XlReceiveError(ReplicationError):
    pass


class XlMigrateReceive:
    """`xl migrate-receive -r -e` as a child process with its stdin and stdout ours.

    With ``guard`` (the backend's name), an :class:`~.xl_guard.XlGuard` holds xl's
    input open too, so that our death never reaches xl as the end of input that it
    would take for a failover."""

    def __init__(
        self,
        xl_path: str | None = None,
        timeout: float = 30.0,
        *,
        guard: str | None = None,
    ) -> None:
        # $REMUS_XL: another xl (a wrapper that logs or copies its input, say)
        self.xl_path = xl_path or os.environ.get("REMUS_XL", "xl")
        self.timeout = timeout
        self.proc: asyncio.subprocess.Process | None = None
        self._guard_backend = guard
        self.guard: XlGuard | None = None

    async def start(self, incoming: str = "") -> None:
        """``incoming``: the domain xl restores (NAME--incoming), which a guard
        destroys if we die."""
        # REMUS_XL_VERBOSE=1: libxl's and libxc's debug log on xl's stderr
        verbose = ["-vvv"] if os.environ.get("REMUS_XL_VERBOSE") == "1" else []
        self.proc = await asyncio.create_subprocess_exec(
            self.xl_path,
            *verbose,
            "migrate-receive",
            "-r",  # Remus: a checkpointed stream
            "-e",  # exit after the failover instead of waiting for the domain's death
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        if self._guard_backend is not None:
            pipe = self.proc.stdin.transport.get_extra_info("pipe")
            self.guard = XlGuard(self._guard_backend, self.proc.pid, pipe.fileno(), incoming)
        try:
            async with asyncio.timeout(self.timeout):
                banner = await self.proc.stdout.readexactly(len(BANNER))
        except (TimeoutError, asyncio.IncompleteReadError) as exc:
            err = await self._stderr()
            raise XlReceiveError(f"xl migrate-receive did not start: {err or exc}") from None
        if banner != BANNER:
            raise XlReceiveError(f"xl migrate-receive said {banner!r}, not its banner")

    async def send(self, data: bytes) -> None:
        self.write(data)
        await self.drain()

    def write(self, data: bytes) -> None:
        """Queue bytes for xl's stdin; :meth:`drain` waits until xl has taken them."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(data)

    async def drain(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        await self.proc.stdin.drain()

    async def finish(self) -> tuple[int, int | None, str]:
        """Close xl's input (at a checkpoint boundary) and wait: (exit status, domid, stderr)."""
        assert self.proc is not None and self.proc.stdin is not None
        with contextlib.suppress(ConnectionError):
            await self.drain()  # all released checkpoints, the ACKed ones among them
            await self._let_go()  # the guard's end first: ours is then the last
            self.proc.stdin.close()
        err = await self._stderr()
        rc = await self.proc.wait()
        m = _FAILOVER_RE.search(err.encode())
        return rc, int(m.group(1)) if m else None, err

    async def _stderr(self) -> str:
        if self.proc is None or self.proc.stderr is None:
            return ""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.timeout):
                return (await self.proc.stderr.read()).decode(errors="replace")
        return ""

    async def _let_go(self) -> None:
        guard, self.guard = self.guard, None
        if guard is not None:
            await asyncio.to_thread(guard.let_go)

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
        guard, self.guard = self.guard, None
        if guard is not None:
            guard.let_go()  # xl is killed already: nothing left to guard


class XenRemusSecondary(Secondary):
    """The secondary of one protection on a Xen host (dom0, root)."""

    def __init__(
        self,
        hv: Hypervisor,
        stream: socket.socket,
        control: Control,
        spec: ProtectionSpec,
        xl_path: str | None = None,
        last_input: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(hv, stream, control, spec, last_input=last_input)
        # xl's restore of a big first checkpoint takes a while under TCG: no hurry
        self.xl = XlMigrateReceive(
            xl_path, timeout=max(30.0, 4 * spec.ack_timeout_s), guard=hv.name
        )
        self.gate = CheckpointGate(Layer.LIBXL)
        self.domid: int | None = None
        self._to_xl: collections.deque[bytes] = collections.deque()
        self._xl_wakeup = asyncio.Event()
        self._xl_closing = False
        # stream bytes released for xl, and those of them the feeder has begun writing
        self._queued = self._taken = 0
        # complete checkpoints not yet ACKed: (seq, _queued at their end)
        self._unacked: collections.deque[tuple[int, int]] = collections.deque()
        self._feeder: asyncio.Task[None] | None = None
        self._dropped = 0

    max_backlog = 256 << 20

    def capabilities(self) -> tuple[str, ...]:
        return ("ack",)

    def complete_checkpoints(self) -> int:
        return self.gate.seq

    async def _open(self, peer: Hello) -> DomainInfo:
        c_info = peer.config.get("c_info", {})
        # what is coming: xl names it NAME--incoming until the failover
        target = DomainInfo(
            domid=-1,
            name=str(c_info.get("name", "incoming")),
            uuid=str(c_info.get("uuid", peer.protection)),
            domain_type=str(c_info.get("type", "pv")),
            memory_bytes=int(peer.config.get("b_info", {}).get("max_memkb", 0)) * 1024,
            state="incoming",
            config=peer.config,
        )
        await self.xl.start(incoming=f"{target.name}--incoming")
        try:
            await self.xl.send(xl.SavefileHeader(json.dumps(peer.config).encode()).encode())
        except BaseException:
            self.xl.kill()
            raise
        return target

    async def _restore(self) -> None:
        self.start_link()
        try:
            await self._pump()
        except (OSError, StreamError) as exc:  # a malformed stream: the error says where
            self.figures.fail(f"stream: {exc}")
        self._dropped = self.gate.end_of_stream()

    async def _drop(self) -> None:
        self.xl.kill()
        self._stop_feeding()

    async def _take_over(self) -> DomainInfo:
        try:
            await self._flush_xl()
            rc, domid, err = await self.xl.finish()
            if rc != 0 or domid is None:
                raise XlReceiveError(f"xl migrate-receive failed over badly (status {rc}): {err}")
        finally:
            self._stop_feeding()
        self.domid = domid
        if self._dropped:
            self.figures.reason += f" ({self._dropped} bytes of an incomplete checkpoint dropped)"
        return self.hv.lookup(domid)

    async def _pump(self) -> None:
        """Stream -> gate -> xl; ACK each checkpoint once it is whole here.

        The stream is read on without waiting for xl: released checkpoints
        queue for :meth:`_feed_xl`. A reader that stopped while xl restores
        the first checkpoint would stop hearing the primary too (over ``-s``
        its heartbeats queue behind the stream data, see
        ``transport/stdio.py``) and fail over in the middle of it.
        """
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.run_in_executor(None, self.stream.recv, 1 << 20)
            if not data:  # the primary is gone, or we broke the stream to fail over
                self.figures.fail("the primary's stream ended")
                return
            if self._feeder is not None and self._feeder.done():
                self._feeder.result()  # xl stopped reading: why
                raise XlReceiveError("xl migrate-receive stopped reading its input")
            for event in self.gate.receive_data(data):
                if isinstance(event, Release):
                    self._queue_for_xl(event.data)
                elif isinstance(event, CheckpointComplete):
                    self.figures.checkpoint_done(event.seq)
                    self._unacked.append((event.seq, self._queued))
                    await self._send_acks()

    def _queue_for_xl(self, data: bytes) -> None:
        if self._feeder is None:
            self._feeder = asyncio.create_task(self._feed_xl())
        self._to_xl.append(data)
        self._queued += len(data)
        self._xl_wakeup.set()

    async def _feed_xl(self) -> None:
        """Write the released checkpoints to xl's stdin, in order, as fast as it reads."""
        while True:
            while not self._to_xl:
                if self._xl_closing:
                    return
                self._xl_wakeup.clear()
                await self._xl_wakeup.wait()
            data = self._to_xl.popleft()
            self._taken += len(data)
            await self._send_acks()  # those the backlog held back, if any
            await self.xl.send(data)

    async def _send_acks(self) -> None:
        """ACK the complete checkpoints, unless too much waits for xl already.

        A checkpoint is ACKed when it is whole here, before xl has read it:
        like the simulated secondary, which ACKs a buffered checkpoint before
        libxc applies it; a failover writes every released byte to xl before
        closing its input, so it reaches the ACKed checkpoint. Waiting for xl
        instead made the first ACK take as long as xl's restore of the whole
        memory (longer than the ACK timeout for a 96 MiB guest under TCG,
        and than the default 5 s for a big guest anywhere). A checkpoint
        with more than ``max_backlog`` bytes of it or before it still
        waiting for the feeder is ACKed only once xl catches up: the
        primary's ACK wait then holds it back. No disk is replicated on Xen,
        so the digest covers the sequence number alone.
        """
        while self._unacked and self._unacked[0][1] - self._taken <= self.max_backlog:
            seq, _end = self._unacked.popleft()
            await self.link.ack(seq, ack_digest(seq, None))

    async def _flush_xl(self) -> None:
        """Every released byte to xl (the failover's checkpoint is among them).

        If xl stopped reading, :meth:`XlMigrateReceive.finish` says why.
        """
        self._xl_closing = True
        self._xl_wakeup.set()
        if self._feeder is not None:
            with contextlib.suppress(ConnectionError):
                await self._feeder

    def _stop_feeding(self) -> None:
        if self._feeder is not None:
            self._feeder.cancel()
