"""What every mode of protection shares, written once.

A protection is one of four drivers (Remus or COLO, primary or secondary; the
Xen receiver is a Remus secondary), and they differ only in their helper
callbacks and the steps of their own mode. Everything else lives here:

* :class:`PrimaryLink`: the primary's side of the control connection. One
  reader task routes each ACK (Remus) or LOADED (COLO) to the future of its
  checkpoint sequence number, as qemu.qmp routes replies into ``_pending``;
  when the connection is lost every waiter gets :class:`PeerLost` at once and
  the helper is stopped. Heartbeats go out from the HELLO on.
* :class:`SecondaryLink`: the secondary's side: the reader that hands the
  mode's frames to it, notices the primary's SHUTDOWN, the heartbeat watchdog
  and the forced failover, any of which breaks the stream so that the helper
  (or xl) finishes from the last complete checkpoint.
* :class:`Watchdog`: a primary whose checkpoints make no progress (a stuck
  link) ends replication rather than hanging.
* :class:`Primary` and :class:`Secondary`: the run of a protection around the
  save or restore helper: HELLO, the libxl prelude, the helper session, and
  every way out (a suspended guest resumed, devices torn down, the fence
  disarmed).
* :class:`Figures`: the live numbers, bounded (recent samples in deques,
  cumulative counters), from which the worker's
  :class:`~.status.ProtectionStatus` is filled.

The rules of what frame may come when are the control codec's table
(``transport/control.py``), not ``isinstance`` chains here.
"""

from __future__ import annotations

import abc
import asyncio
import bisect
import contextlib
import hashlib
import logging
import socket
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..coordination import LeaseKeeper, WitnessError
from ..hypervisors.base import DomainInfo, Hypervisor, HypervisorError
from ..savehelper import Callbacks, HelperFailed, HelperSession, Mode, SaveArgs, StreamType
from ..streams import libxl
from ..transport.control import (
    Ack,
    ControlError,
    Event,
    Failover,
    Hello,
    Role,
    Shutdown,
    Switchover,
)
from ..transport.controlio import Control, heartbeats, send_nowait
from .spec import ProtectionSpec
from .status import PAUSE_BUCKETS, ProtectionStatus, State

log = logging.getLogger(__name__)

RECENT = 256  # samples kept for medians: a protection runs for months


class Unprotected(Exception):
    """The primary ended replication on purpose: no failover, the copy is dropped."""


class ReplicationError(Exception):
    """Replication cannot go on; the message says why. The primary's guest runs on."""


class PeerLost(ReplicationError):
    """The control connection closed, broke, or the peer said it is done."""


class AckTimeout(ReplicationError):
    pass


class DigestMismatch(ReplicationError):
    """The secondary applied something other than what we sent: its copy is not ours."""


def ack_digest(seq: int, disk: bytes | None) -> bytes:
    """What a Remus ACK of checkpoint ``seq`` carries, and what the primary expects.

    Both sides can compute it: ``disk`` is the digest of the checkpoint's disk
    blocks (:func:`~..devices.disk.blocks_digest`, over what the primary sent
    and what the secondary wrote), or None without disk replication. The
    memory is not in it: the primary never sees libxc's bytes (the helper
    writes them to the fd itself), and hashing them would cost a copy of
    every page; COLO's ``verify_memory`` covers memory where it is wanted.
    """
    h = hashlib.sha256(b"remus-ack\0" + seq.to_bytes(8, "little"))
    if disk is not None:
        h.update(disk)
    return h.digest()


@dataclass
class Figures:
    """The live numbers of one protection: recent samples bounded, counters cumulative."""

    state: State = State.STARTING
    reason: str = ""
    checkpoints: int = 0
    last_checkpoint_at: float | None = None
    pauses: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    ack_lags: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    # pages sent per checkpoint after the first (which carries the whole memory)
    dirty_pages: deque[int] = field(default_factory=lambda: deque(maxlen=RECENT))
    initial_pages: int | None = None
    pause_counts: list[int] = field(default_factory=lambda: [0] * (len(PAUSE_BUCKETS) + 1))
    pause_sum: float = 0.0
    epochs: int = 0
    late_epochs: int = 0

    def fail(self, reason: str) -> None:
        """The first reason sticks: it is the cause; what follows is its consequence."""
        if not self.reason:
            self.reason = reason

    def record_pause(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.pause_sum += seconds
        self.pause_counts[bisect.bisect_left(PAUSE_BUCKETS, seconds)] += 1

    def record_pages(self, pages: int) -> None:
        if self.initial_pages is None:
            self.initial_pages = pages
        else:
            self.dirty_pages.append(pages)

    def checkpoint_done(self, seq: int) -> None:
        self.checkpoints = seq
        self.last_checkpoint_at = time.time()
        self.state = State.REPLICATING

    def fill(self, st: ProtectionStatus) -> None:
        st.state, st.reason, st.checkpoints = self.state, self.reason, self.checkpoints
        st.last_checkpoint_at = self.last_checkpoint_at
        st.pause_ms_p50 = _ms_median(self.pauses)
        st.ack_lag_ms_p50 = _ms_median(self.ack_lags)
        dirty = statistics.median(self.dirty_pages) if self.dirty_pages else None
        st.dirty_pages_p50 = dirty
        st.dirty_bytes_p50 = dirty * 4096 if dirty is not None else None
        st.pause_histogram.counts = list(self.pause_counts)
        st.pause_histogram.sum = self.pause_sum
        st.epochs, st.late_epochs = self.epochs, self.late_epochs


def _ms_median(samples: deque[float]) -> float | None:
    return round(statistics.median(samples) * 1e3, 3) if samples else None


def host_identity(hv: Hypervisor) -> str:
    """This host, as a takeover mark names it: stable across restarts, distinct for
    two simulated hosts of one machine (their state directories differ)."""
    key = f"{socket.gethostname()}:{hv.state_dir()}".encode()
    return hashlib.sha256(key).hexdigest()[:16]


# -- the primary ---------------------------------------------------------------------


class PrimaryLink:
    """The primary's control connection: one reader, replies routed by sequence number.

    ``ctl`` None is `xl remus -b`: nobody ACKs, and each checkpoint is taken as
    acknowledged with the digest we expect.
    """

    def __init__(
        self,
        ctl: Control | None,
        spec: ProtectionSpec,
        on_frame: Callable[[Event], None] | None = None,
        on_lost: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.ctl, self.spec = ctl, spec
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._pending: dict[int, asyncio.Future[Ack]] = {}
        # a switchover's answer: the secondary's FAILOVER once the guest runs there
        self._taken: asyncio.Future[Failover] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.lost: str | None = None

    async def open(self, hello: Hello) -> Hello | None:
        """HELLO both ways, then heartbeats (the secondary's watchdog runs from our
        prelude on, and setting up devices can outlast its timeout) and the reader."""
        if self.ctl is None:
            return None
        peer = await self.ctl.hello(hello, self.spec.ack_timeout_s)
        self._tasks.append(
            asyncio.create_task(heartbeats(self.ctl, self.spec.heartbeat_interval_s))
        )
        self._tasks.append(asyncio.create_task(self._reader()))
        return peer

    def expect(self, seq: int, digest: bytes = b"") -> asyncio.Future[Ack]:
        """Checkpoint ``seq`` is about to be written: the future of its reply."""
        fut: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        if self.lost is not None:
            fut.set_exception(PeerLost(self.lost))
        elif self.ctl is None:
            fut.set_result(Ack(seq, digest))
        else:
            self.ctl.conn.checkpoint_sent(seq)
            self._pending[seq] = fut
        return fut

    async def reply(self, fut: asyncio.Future[Ack], seq: int, timeout: float) -> Ack:
        """The reply to checkpoint ``seq``; :class:`AckTimeout` or :class:`PeerLost`."""
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise AckTimeout(f"no ACK for checkpoint {seq} within {timeout:g} s") from None
        finally:
            self._pending.pop(seq, None)
            if not fut.done():
                fut.cancel()

    async def _reader(self) -> None:
        assert self.ctl is not None
        try:
            while True:
                event = await self.ctl.next()
                if isinstance(event, Ack):
                    fut = self._pending.pop(event.seq, None)
                    if fut is not None and not fut.done():
                        fut.set_result(event)
                elif isinstance(event, Failover) and self._taken is not None:
                    if not self._taken.done():
                        self._taken.set_result(event)
                    return  # the connection's last word (the codec is closed now)
                elif isinstance(event, Failover | Shutdown):
                    raise PeerLost(f"secondary: {event.reason}")
                elif self._on_frame is not None:
                    self._on_frame(event)
        except (ConnectionError, ControlError, PeerLost) as exc:
            await self._lose(str(exc))

    async def _lose(self, reason: str) -> None:
        self.lost = reason
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(PeerLost(reason))
        self._pending.clear()
        if self._taken is not None and not self._taken.done():
            self._taken.set_exception(PeerLost(reason))
        if self._on_lost is not None:
            await self._on_lost(reason)

    def switch_over(self, seq: int, protect_back: str) -> asyncio.Future[Failover]:
        """Hand the guest over after checkpoint ``seq`` (the last, ACKed): the future of
        the secondary's FAILOVER, sent once the guest runs there (:class:`PeerLost` if
        the connection goes first)."""
        if self.ctl is None:
            raise PeerLost("no secondary (-b) to switch over to")
        if self.lost is not None:
            raise PeerLost(self.lost)
        self._taken = asyncio.get_running_loop().create_future()
        self.ctl.send(Switchover(seq, protect_back))
        return self._taken

    def shutdown(self, reason: str) -> None:
        """Tell the secondary to drop its copy: replication ends on purpose."""
        if self.ctl is not None:
            with contextlib.suppress(Exception):
                self.ctl.send(Shutdown(reason))

    async def flush(self, timeout: float = 1.0) -> None:
        if self.ctl is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ctl.drain(), timeout)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()


class Watchdog:
    """No checkpoint progress for ``bound`` seconds: ``on_stuck`` (stop the helper)."""

    def __init__(self, bound: float, every: float, on_stuck: Callable[[str], Awaitable[None]]):
        self.bound, self.every, self._on_stuck = bound, every, on_stuck
        self._last = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def progress(self) -> None:
        self._last = time.monotonic()

    def start(self) -> None:
        self.progress()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            if time.monotonic() - self._last > self.bound:
                await self._on_stuck(f"no checkpoint progress for {self.bound:g} s")
                return

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


class Primary(abc.ABC):
    """The primary of one protection: the save helper, its callbacks answered by the mode."""

    stream_type: StreamType

    def __init__(
        self,
        hv: Hypervisor,
        domain: DomainInfo,
        stream: socket.socket,
        control: Control | None,
        spec: ProtectionSpec,
        lease: LeaseKeeper | None = None,
    ) -> None:
        self.hv, self.domain, self.stream, self.spec = hv, domain, stream, spec
        self.figures = Figures()
        self.session: HelperSession | None = None
        # the lease (protection/lease.py): held before our HELLO; None without a witness
        self.lease = lease
        self.fenced = False
        self._fence_watch: asyncio.Task[None] | None = None
        self.link = PrimaryLink(control, spec, self._on_frame, self._stop_helper)
        self.watchdog = Watchdog(self._progress_bound(), spec.ack_timeout_s / 4, self._stuck)
        self._suspended = False
        self._suspended_at = 0.0
        self._seq = 0
        self._stopping = False
        # a planned switchover (remusd's POST .../switchover, SIGUSR2 on the worker):
        # the document the peer protects back with, once asked; then the epoch that
        # ends with the next suspend is the last, and the guest is not resumed here
        self.switchover: str | None = None
        self.last_epoch = False
        self.handed_over = False
        self.switchover_pause_s: float | None = None  # the last suspend to the FAILOVER

    # -- what a mode supplies --------------------------------------------------------

    @abc.abstractmethod
    def capabilities(self) -> tuple[str, ...]:
        """What our HELLO announces (the secondary sets itself up from it)."""

    @abc.abstractmethod
    def callbacks(self) -> Callbacks: ...

    def back_channel(self) -> int:
        return -1

    def _progress_bound(self) -> float:
        return self.spec.interval_s + 2 * self.spec.ack_timeout_s

    def _on_frame(self, event: Event) -> None:
        """A control frame the mode may want (COLO: the secondary's output)."""
        return None

    async def _prepare(self) -> None:
        """Before the HELLO (COLO: the vif's queues, so that a refusal comes first)."""
        return None

    async def _setup(self) -> None:
        """After the prelude, before the helper (Remus: the checkpoint devices)."""
        return None

    async def _teardown(self, dying: bool) -> None:
        """Every way out. ``dying``: torn down from outside (cancelled), no goodbyes."""
        return None

    def _progress_event(self, _doing: str, _done: int) -> None:
        """The helper's progress reports (Remus counts pages)."""
        return None

    # -- shared steps ----------------------------------------------------------------

    async def suspend_guest(self) -> None:
        self._suspended_at = time.perf_counter()
        await self.hv.suspend(self.domain.domid)
        self._suspended = True

    async def resume_guest(self) -> None:
        await self.hv.resume(self.domain.domid)
        self._suspended = False
        self.figures.record_pause(time.perf_counter() - self._suspended_at)

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def request_switchover(self, protect_back: str) -> None:
        """Switch over at the next checkpoint: it is the last, and the secondary runs
        the guest from it. ``protect_back``: the spec document the peer protects the
        guest back here with ("" for none)."""
        if self.switchover is None and not self._stopping:
            self.switchover = protect_back

    async def hand_over(self, seq: int) -> None:
        """Checkpoint ``seq`` is ACKed and its output released; our guest stays
        suspended. The secondary is told to take over, the lease let go so that it
        can take it at once, and once it says the guest runs there ours goes.

        Unconfirmed (the link or the peer lost, no answer within the takeover
        window): ours is fenced, as by a lost lease, and the witness decides
        (``_after_lease``): destroyed if the secondary took over, resumed if the
        lease is ours again and nobody did. Without a witness it stays paused: an
        administrator must tell."""
        peer = self.spec.target or "the secondary"
        try:
            if self.lease is not None:
                # let go before the secondary is told, so that its first attempt takes
                # it. Safe at once: our guest is suspended with nothing held, and it
                # resumes only with the lease back and no takeover marked; a secondary
                # that never hears of the switchover takes over on our silence, from
                # this checkpoint, which is the last
                if self._fence_watch is not None:
                    self._fence_watch.cancel()
                await self.lease.stop(release=True)
            taken = self.link.switch_over(seq, self.switchover or "")
            await self.link.flush()
            timeout = self.spec.takeover_window_s + self.spec.ack_timeout_s
            try:
                await asyncio.wait_for(asyncio.shield(taken), timeout)
            except TimeoutError:
                raise AckTimeout(f"no answer within {timeout:g} s") from None
        except ReplicationError as exc:
            self.fenced = True
            self.figures.state = State.FENCED
            self.figures.reason = (
                f"fenced: the switchover to {peer} after checkpoint {seq} was not confirmed ({exc})"
            )
            with contextlib.suppress(HypervisorError):
                self.hv.pause(self.domain.domid)
            return
        self.switchover_pause_s = time.perf_counter() - self._suspended_at
        self.handed_over = True
        self.figures.reason = (
            f"switched over to {peer} after checkpoint {seq}: the guest runs there "
            f"(paused {self.switchover_pause_s * 1e3:.0f} ms); our copy destroyed"
        )
        with contextlib.suppress(HypervisorError):
            self.hv.destroy(self.domain.domid)

    def may_release(self) -> bool:
        """Output of an ACKed epoch may go: without a witness always, with one only while
        the lease stays valid past the release (counted on the monotonic clock from
        before the renewal was sent, so a process resumed after a long SIGSTOP has no
        validity left to release anything with)."""
        return self.lease is None or self.lease.can_release(self.spec.lease_release_margin_s)

    async def fence_self(self, reason: str) -> None:
        """We cannot be sure to hold the lease: the other copy may start. Ours stops
        here and now: the guest is paused (it produces nothing more), held output is
        dropped (``_teardown`` with ``fenced``), replication ends."""
        if self.fenced:
            return
        self.fenced = True
        # the fence leads the reason even when something broke first (a resumed
        # process finds its peer gone): it is what the guest's state comes from
        before = self.figures.reason
        self.figures.reason = f"fenced: {reason}" + (f" (after: {before})" if before else "")
        self.figures.state = State.FENCED
        try:
            self.hv.pause(self.domain.domid)
        except Exception as exc:  # a guest we cannot pause must still not be resumed
            log.error("fencing %s: pause failed: %s", self.domain.name, exc)
        await self._stop_helper(f"fenced: {reason}")

    async def _watch_lease(self) -> None:
        """Between checkpoints too: a renewal that fails fences us before the lease can
        run out, not at the next commit (which may be a whole interval away)."""
        assert self.lease is not None
        every = min(0.05, self.spec.lease_ttl_s / 20)
        while True:
            await asyncio.sleep(every)
            if self.lease.must_fence(self.spec.lease_fence_margin_s):
                await self.fence_self(f"lease {self.lease.state.value}: {self.lease.reason}")
                return

    async def _after_lease(self) -> None:
        """Replication is over; what our copy does now depends on the witness.

        Fenced: our guest stays paused until the witness can say what happened
        (we wait as long as it takes; SIGTERM leaves the guest paused for an
        administrator). If another host took over (its mark is on the witness),
        our copy is destroyed. If nobody did and we can take the lease back,
        nobody can start another copy: ours resumes, unprotected.

        Not fenced, our guest runs on: before the lease goes (with this process),
        we mark on the witness that it runs here. A secondary that lost us later
        than we lost it (a link cut one way) may take the free lease, but finds
        the mark and drops its copy instead of starting a second one. If the mark
        cannot be made, we fence: a copy that runs on must be on the record.
        """
        assert self.lease is not None
        if self.fenced:
            await self._decide_fenced()
            if self.fenced:
                return
        while not self.fenced:
            if self.lease.must_fence(self.spec.lease_fence_margin_s):
                await self.fence_self(f"lease {self.lease.state.value} as replication ended")
                break
            try:
                await self._mark_running_here()
                return
            except WitnessError as exc:
                self.figures.fail(f"could not mark on the witness that the guest runs here: {exc}")
            await asyncio.sleep(0.05)
        await self._after_lease()

    async def _mark_running_here(self) -> None:
        assert self.lease is not None
        await self.lease.witness.mark_taken_over(self.lease.name, host_identity(self.hv))

    async def _decide_fenced(self) -> None:
        assert self.lease is not None
        witness, name = self.lease.witness, self.lease.name
        waiting = False
        me = host_identity(self.hv)

        async def taken_elsewhere() -> bool:
            return any(host != me for host in await witness.taken_over(name))

        while not self._stopping:
            try:
                if await taken_elsewhere():
                    with contextlib.suppress(Exception):
                        self.hv.destroy(self.domain.domid)
                    self.figures.reason += "; the secondary took over: our copy destroyed"
                    return
                # held by nobody else now: with it, no copy can start elsewhere, and
                # the mark (made before any takeover runs a guest) says none did
                if await self.lease.acquire(self.spec.lease_ttl_s) and not await taken_elsewhere():
                    await self._mark_running_here()  # before it runs: see _after_lease
                    await self._unfence()
                    self.figures.reason += (
                        "; nobody took over and the lease is ours again: the guest runs on "
                        "here, unprotected"
                    )
                    return
            except WitnessError as exc:
                if not waiting:
                    self.figures.reason += f"; waiting for the witness ({exc})"
                    waiting = True
            await asyncio.sleep(0.25)
        self.figures.reason += "; stopped while fenced: the guest stays paused here"

    async def _unfence(self) -> None:
        self.hv.unpause(self.domain.domid)
        if self._suspended:  # fenced mid-checkpoint
            # the flag can be stale (fenced between the resume and its bookkeeping):
            # a guest that runs already is what we want
            with contextlib.suppress(HypervisorError):
                await self.hv.resume(self.domain.domid)
            self._suspended = False
        self.fenced = False

    def _final_state(self) -> State:
        if self.handed_over:
            return State.SWITCHED_OVER
        if self.fenced:
            return State.FENCED
        if self._stopping or self.link.ctl is None:
            return State.STOPPED
        try:
            running = self.hv.lookup(self.domain.domid).state == "running"
        except Exception:
            running = False
        # replication failed and ours runs on: say it is not protected any more
        return State.UNPROTECTED if running else State.STOPPED

    async def _stop_helper(self, reason: str) -> None:
        self.figures.fail(reason)
        if self.session is not None:
            await self.session.abort()

    async def _stuck(self, reason: str) -> None:
        # the reading thread of a blocked write stays in the kernel: breaking the
        # socket releases it
        with contextlib.suppress(OSError):
            self.stream.shutdown(socket.SHUT_RDWR)
        await self._stop_helper(reason)

    async def stop(self, reason: str = "unprotected") -> None:
        """`remusctl unprotect` (SIGTERM): end replication, the guest runs on here.

        The secondary is told first, so that it drops its copy rather than take
        over; the helper is then stopped at once (mid-checkpoint the guest is
        resumed by :meth:`run`'s way out).
        """
        self._stopping = True
        self.figures.fail(reason)
        self.link.shutdown(reason)
        await self._stop_helper(reason)

    async def run(self) -> Figures:
        await self._prepare()
        dying = False
        try:
            caps = self.capabilities() + (("lease",) if self.lease is not None else ())
            hello = Hello(self.domain.uuid, self.domain.config, caps, witness=self.spec.witness)
            await self.link.open(hello)
            if self.lease is not None:
                self._fence_watch = asyncio.create_task(self._watch_lease())
            await send_nowait(self.stream, libxl.Header().encode() + libxl.LIBXC_CONTEXT_RECORD)
            await self._setup()
            self.watchdog.start()
            self.session = HelperSession(
                Mode.SAVE,
                self.callbacks(),
                on_progress=lambda p: self._progress_event(p.doing_what, p.done),
            )
            if self._stopping:  # SIGTERM before the helper ran: nothing is half done
                return self.figures
            args = SaveArgs(self.domain.domid, self.session.cbflags, self.stream_type)
            result = await self.session.run(
                self.stream.fileno(), self.back_channel(), args, extra_env=self.hv.helper_env()
            )
            errors = [r.text for r in result.logs if r.level >= 8]
            if errors:
                self.figures.fail(f"save helper: {errors[0]}")
        except (HelperFailed, ReplicationError) as exc:
            self.figures.fail(str(exc))
        except asyncio.CancelledError:
            dying = True
            raise
        finally:
            self.link.close()
            self.watchdog.stop()
            if self._fence_watch is not None:
                self._fence_watch.cancel()
            if (
                self.lease is not None
                and not (dying or self.fenced or self.handed_over)
                and not self.may_release()
            ):
                # what is held goes out below unless we fence now: a process resumed
                # after a long stop gets here before its watcher looks at the clock
                await self.fence_self(
                    f"replication ended with the lease {self.lease.state.value}, not valid "
                    "past a release"
                )
            # ended mid-checkpoint: ours carries on, unless it is fenced
            if self._suspended and not (dying or self.fenced or self.handed_over):
                with contextlib.suppress(Exception):
                    await self.hv.resume(self.domain.domid)
                self._suspended = False
            await self._teardown(dying)
            if self.lease is not None and not dying and not self.handed_over:
                await self._after_lease()
            self.figures.state = self._final_state()
        return self.figures


# -- the secondary -------------------------------------------------------------------


class SecondaryLink:
    """The secondary's control connection: the mode's frames, the primary's end, and the
    heartbeat watchdog; any of them ending breaks the stream (``on_lost``)."""

    def __init__(
        self,
        ctl: Control,
        spec: ProtectionSpec,
        figures: Figures,
        on_lost: Callable[[], None],
        complete: Callable[[], int],
        last_input: Callable[[], float] | None = None,
    ) -> None:
        ctl.set_role(Role.SECONDARY)
        self.ctl, self.spec, self.figures = ctl, spec, figures
        self._on_lost, self._complete = on_lost, complete
        # over -s, control frames queue behind stream data: any byte proves life
        self._last_input = last_input
        self._tasks: list[asyncio.Task[None]] = []
        self.unprotected = False
        self.forced = False
        self.switchover: Switchover | None = None  # the primary handed the guest over

    async def hello(self, capabilities: tuple[str, ...]) -> Hello:
        return await self.ctl.hello(Hello("secondary", {}, capabilities), self.spec.ack_timeout_s)

    def start(self, on_frame: Callable[[Event], None]) -> None:
        self._tasks = [
            asyncio.create_task(self._reader(on_frame)),
            asyncio.create_task(self._watchdog()),
        ]

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def ack(self, seq: int, digest: bytes) -> None:
        self.ctl.send(Ack(seq, digest))
        with contextlib.suppress(ConnectionError):
            await self.ctl.drain()

    def force_failover(self, tell_primary: bool) -> None:
        """`remusctl failover`: take over from the last complete checkpoint now.

        ``tell_primary``: COLO's primary sends no checkpoint while its copies
        agree, so a broken stream alone could go unnoticed there for up to
        ``checkpoint_max_interval``.
        """
        self.forced = True  # the primary's SHUTDOWN in answer must not drop our copy
        self.figures.reason = "failover forced by the administrator"
        if tell_primary:
            with contextlib.suppress(Exception):
                self.ctl.send(Failover("failover forced by the administrator on the secondary"))
        self._on_lost()

    async def _reader(self, on_frame: Callable[[Event], None]) -> None:
        try:
            while True:
                event = await self.ctl.next()
                if isinstance(event, Shutdown):
                    self.unprotected = True
                    self.figures.fail(f"primary ended replication: {event.reason}")
                    return
                if isinstance(event, Switchover):
                    self.switchover = event
                    self.figures.reason = (
                        f"switchover: the primary handed the guest over after checkpoint "
                        f"{event.seq}"
                    )
                    return  # the stream ends at that checkpoint: take over from it
                on_frame(event)
        except (ConnectionError, ControlError, ReplicationError) as exc:
            self.figures.fail(f"control: {exc}")
        finally:
            self._on_lost()

    async def taken(self, message: str) -> None:
        """After a switchover, the guest runs here: the primary may destroy its copy."""
        with contextlib.suppress(Exception):
            self.ctl.send(Failover(message))
            await asyncio.wait_for(self.ctl.drain(), self.spec.ack_timeout_s)

    def heartbeat_timeout(self) -> float:
        # Until a checkpoint is whole here there is nothing to fail over to, so
        # giving up fast buys nothing and turns one scheduling hiccup on a busy
        # host (spawning the helper, iptables) into a failed start. A primary
        # that dies in the initial copy still shows as EOF on both sockets.
        if self._complete() == 0:
            return max(self.spec.heartbeat_timeout_s, self.spec.ack_timeout_s)
        return self.spec.heartbeat_timeout_s

    def last_heard(self) -> float:
        heard = self.ctl.last_heard
        if self._last_input is not None:
            heard = max(heard, self._last_input())
        return heard

    def seconds_since_heard(self) -> float:
        return time.monotonic() - self.last_heard()

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(self.spec.heartbeat_interval_s)
            timeout = self.heartbeat_timeout()
            if time.monotonic() - self.last_heard() > timeout:
                self.figures.fail(f"no heartbeat for {timeout:g} s: primary lost")
                self._on_lost()
                return


class Secondary(abc.ABC):
    """The secondary of one protection: the restore, and the failover or the drop."""

    def __init__(
        self,
        hv: Hypervisor,
        stream: socket.socket,
        control: Control,
        spec: ProtectionSpec,
        name: str | None = None,
        last_input: Callable[[], float] | None = None,
        lease: LeaseKeeper | None = None,
    ) -> None:
        self.hv, self.stream, self.spec, self.name = hv, stream, spec, name
        self.figures = Figures()
        self.lease = lease
        self.link = SecondaryLink(
            control, spec, self.figures, self.break_stream, self.complete_checkpoints, last_input
        )
        self.target: DomainInfo | None = None
        self._broken = False
        self.refused = False  # lost the primary, but could not take the lease

    tell_primary_on_force = False

    @abc.abstractmethod
    def capabilities(self) -> tuple[str, ...]: ...

    @abc.abstractmethod
    def complete_checkpoints(self) -> int:
        """Checkpoints whole here: something to fail over to once above 0."""

    @abc.abstractmethod
    async def _open(self, peer: Hello) -> DomainInfo:
        """The target domain (or what is coming, on Xen) for the primary's HELLO."""

    @abc.abstractmethod
    async def _restore(self) -> None:
        """Until the stream ends: the helper's (or xl's) restore of each checkpoint."""

    @abc.abstractmethod
    async def _take_over(self) -> DomainInfo:
        """Failover: start the guest here from the last complete checkpoint."""

    async def _stage(self) -> None:
        """While the lease is awaited: whatever of the takeover can be done before
        the guest may run (nothing, unless the mode says otherwise). The wait is
        up to a TTL, and what is done in it is off the failover's critical path."""
        return None

    async def _take_lease(self) -> None:
        """Only the lease holder runs the guest: take it, or drop our copy. The primary
        holds it until it has stopped renewing for a TTL, so this waits that long at
        most (and the primary fences itself before then). Holding it, we mark the
        takeover on the witness before the guest runs here: a stale primary that
        finds the lease free later (we may have exited by then) must learn that it
        may not resume."""
        assert self.lease is not None
        window = self.spec.takeover_window_s
        deadline = time.monotonic() + window
        me = host_identity(self.hv)
        if await self.lease.acquire(window):
            while True:  # a loaded witness may miss one call's bound: try while we hold it
                try:
                    # a primary that ran on marked it before it let the lease go
                    elsewhere = [h for h in await self.lease.witness.taken_over(self.lease.name)
                                 if h != me]  # fmt: skip
                    if elsewhere:
                        why = f"the guest runs on host {elsewhere[0]} (its mark on the witness)"
                        break
                    await self.lease.witness.mark_taken_over(self.lease.name, me)
                    return
                except WitnessError as exc:
                    if not self.lease.held() or time.monotonic() > deadline:
                        why = f"the takeover could not be recorded ({exc})"
                        break
                await asyncio.sleep(0.05)
        else:
            why = (
                f"it still holds the lease after {window:g} s "
                f"({self.lease.reason or self.lease.state.value})"
            )
        self.refused = True
        self.figures.state = State.STOPPED
        reason = (
            f"lost the primary ({self.figures.reason or 'no reason'}), but {why}: "
            "the primary runs on, and our copy is dropped"
        )
        self.figures.reason = reason
        raise Unprotected(reason)

    async def _drop(self) -> None:
        """The copy goes (the primary ended replication, or we failed)."""
        if self.target is not None and self.target.domid >= 0:
            self.hv.destroy(self.target.domid)

    def _on_frame(self, event: Event) -> None:
        """A control frame of the mode (disk blocks, COLO's network half)."""
        return None

    def force_failover(self) -> None:
        self.link.force_failover(self.tell_primary_on_force)

    def break_stream(self) -> None:
        """Fail over: the helper (or xl) reads to the end of the last checkpoint."""
        if not self._broken:
            self._broken = True
            with contextlib.suppress(OSError):
                self.stream.shutdown(socket.SHUT_RDWR)
            self._stream_broken()

    def _stream_broken(self) -> None:
        """What else must stop waiting when the stream breaks (the disk replica)."""
        return None

    def start_link(self) -> None:
        self.link.start(self._on_frame)

    async def run(self) -> DomainInfo:
        peer = await self.link.hello(self.capabilities())
        self.target = await self._open(peer)
        try:
            try:
                await self._restore()
            finally:
                self.link.stop()
            if self.link.unprotected and not self.link.forced:
                self.figures.state = State.STOPPED
                raise Unprotected(self.figures.reason)
            if self.complete_checkpoints() == 0:
                raise ReplicationError(
                    "nothing to fail over to: no complete checkpoint"
                    + (f" ({self.figures.reason})" if self.figures.reason else "")
                )
            handed = self.link.switchover
            if handed is not None and self.complete_checkpoints() < handed.seq:
                # not reachable from a well-behaved primary: it waits for our ACK
                raise ReplicationError(
                    f"switchover after checkpoint {handed.seq}, but only "
                    f"{self.complete_checkpoints()} are complete here"
                )
            if self.lease is not None:
                staging = asyncio.create_task(self._stage())
                try:
                    await self._take_lease()
                finally:
                    # never drop (or run) a copy whose build is still going on
                    staged = await asyncio.gather(staging, return_exceptions=True)
                if isinstance(staged[0], BaseException):
                    raise staged[0]
            self.figures.state = State.FAILING_OVER
            info = await self._take_over()
            self.figures.state = State.FAILED_OVER  # only once the guest runs here
            self.target = info
            if handed is not None:
                await self.link.taken(f"switched over: {info.name} runs here")
            return info
        except BaseException:
            with contextlib.suppress(Exception):
                await self._drop()
            raise


async def no_results(*_args: int) -> int:
    """A restore callback with nothing to report back (static_data_done and friends)."""
    return 0
