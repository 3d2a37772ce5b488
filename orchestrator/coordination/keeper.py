"""LeaseKeeper: keeps one protection's lease on a witness, off the checkpoint path.

An asyncio task acquires the lease (at `start(acquire=True)` or on
`acquire()`), then renews it every ttl/3 and feeds every request and reply to
a sans-I/O `Lease`. The checkpoint path never waits on the witness: it asks
`can_release(margin)` / `must_fence(margin)`, which read only the monotonic
clock and the last validity, so they are exact even right after the process
was SIGSTOPped (a stale `state` cannot fool them).

The task acquires only when asked: once it has held the lease it only keeps
it. After the lease was lost or expired it never takes it back on its own, so
a stale primary cannot grab the lease again behind the new one's back; it
takes an explicit `acquire()` for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

from orchestrator.coordination.lease import Lease, LeaseState
from orchestrator.coordination.witness import RefreshOutcome, Witness, WitnessError

log = logging.getLogger(__name__)

OnChange = Callable[[LeaseState, str], None]


class LeaseKeeper:
    """One protection's lease, acquired and renewed in the background."""

    def __init__(
        self,
        witness: Witness,
        name: str,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        on_change: OnChange | None = None,
        observe: bool = False,
    ) -> None:
        if not 0 < ttl_s <= witness.ttl_s:
            # renewing every ttl/3 of a longer TTL than the witness grants
            # would let the witness's lease run out between renewals
            raise ValueError(
                f"keeper ttl {ttl_s}s must be > 0 and <= the witness's {witness.ttl_s}s"
            )
        self._witness = witness
        self._name = name
        self._ttl_s = ttl_s
        self._clock = clock
        self._on_change = on_change
        self._lease = Lease()
        self._last_state = self._lease.state
        # renew every ttl/3: two renewals can fail before the lease runs out
        self._renew_every_s = ttl_s / 3
        # a waiting member retries (and an observing one looks) often enough
        # that a takeover follows the old lease's expiry closely; a try while
        # another holds the lock is one read (the witness grants no lease for it)
        self._attempt_every_s = min(max(ttl_s / 40, 0.025), 0.25)
        # a member that will want the lease (a secondary) watches the holder's
        # renewals before it wants it, so its takeover can count the holder's
        # TTL from the holder's last renewal rather than from its own first look
        self._observe = observe
        self._want = False
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._attempted = asyncio.Event()
        self._stopping = False
        self.crashed: BaseException | None = None

    # -- queries (no I/O) ------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def witness(self) -> Witness:
        return self._witness

    @property
    def state(self) -> LeaseState:
        self._tick()
        return self._lease.state

    @property
    def reason(self) -> str:
        self._tick()
        return self._lease.reason

    @property
    def valid_until(self) -> float | None:
        return self._lease.valid_until

    def held(self) -> bool:
        return self._lease.held(self._clock())

    def can_release(self, margin_s: float) -> bool:
        """True only if the lease is held and stays valid past now + margin_s."""
        return self._lease.can_release(self._clock(), margin_s)

    def must_fence(self, margin_s: float) -> bool:
        """We held the lease and cannot be sure to hold it past now + margin_s."""
        return self._lease.must_fence(self._clock(), margin_s)

    # -- lifecycle -------------------------------------------------------------

    def start(self, *, acquire: bool = False) -> None:
        """Start the task; with `acquire`, it keeps trying until it holds the lease."""
        if self._task is not None:
            raise RuntimeError("keeper already started")
        self._want = acquire
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"lease-keeper-{self._name}"
        )

    async def stop(self, *, release: bool = True) -> None:
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True
            # Python 3.11's wait_for drops a cancel that arrives as its inner call
            # completes (gh-86296, fixed in 3.12): one cancel() can be swallowed by
            # a renewal finishing at that moment, so ask until the task has ended
            # (the loop also sees _stopping at its next turn)
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.1)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
        self._want = False
        if release:
            with contextlib.suppress(WitnessError):
                await self._witness.release(self._name)
            self._lease.released()
            self._notify()

    async def acquire(self, timeout_s: float) -> bool:
        """Keep trying until we hold the lease (True) or timeout_s passes (False).

        On False the keeper stops wanting it, so a late success does not leave
        a lease held by a member that has given up (and dropped its copy).
        """
        if self._task is None:
            self.start()
        deadline = self._clock() + timeout_s
        self._want = True
        self._wake.set()
        try:
            while not self.held():
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return False
                self._attempted.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._attempted.wait(), remaining)
            return True
        finally:
            if not self.held():
                self._want = False

    # -- the task --------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while not self._stopping:
                delay = await self._step()
                # acquire() looks again after every step: a renewal can make us
                # the holder as well as an acquisition (an EXPIRED lease that
                # the witness still had, once it answers again)
                self._attempted.set()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._wake.wait(), None if math.isinf(delay) else max(delay, 0.0)
                    )
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # the lease keeps counting down on its own, so a dead keeper ends
            # in must_fence (etcd) rather than in a false "held"
            self.crashed = e
            log.exception("lease keeper for %s crashed", self._name)

    async def _step(self) -> float:
        """One acquire or renew (or nothing); returns how long to sleep."""
        self._tick()
        state = self._lease.state
        listed = self._name in self._witness.held_names()
        if state in (LeaseState.HELD, LeaseState.UNCERTAIN) or (
            state is LeaseState.EXPIRED and listed
        ):
            return await self._renew()
        if self._want:
            # never held, released, lost, or expired and gone from the
            # witness: only an explicit acquire() takes it (again)
            await self._try_acquire()
            return 0.0 if self.held() else self._attempt_every_s
        if state is LeaseState.EXPIRED:
            # gone from the witness: keep asking who holds it, so a healed
            # partition turns EXPIRED into LOST
            return await self._renew()
        if self._observe and state is LeaseState.NOT_HELD and self._witness.expires:
            with contextlib.suppress(WitnessError):
                await self._witness.observe(self._name)
            return self._attempt_every_s
        # not held and not wanted (never asked, released, or lost): idle until asked
        return math.inf

    async def _try_acquire(self) -> None:
        now = self._clock()
        token = self._lease.renew_sent(now)
        try:
            got = await self._witness.try_acquire(self._name)
        except WitnessError as e:
            self._lease.renew_failed(token, str(e))
            self._notify()
            return
        if not got:
            self._lease.taken_elsewhere(self._clock(), "held by another member")
        elif not self._want:
            # acquire() gave up while this attempt was in flight
            with contextlib.suppress(WitnessError):
                await self._witness.release(self._name)
            self._lease.renew_failed(token, "acquired after the caller gave up; released")
        else:
            self._lease.acquired(token, self._witness.lease_ttl_s)
            self._want = False  # from here on we only keep it
        self._notify()

    async def _renew(self) -> float:
        sent = self._clock()
        token = self._lease.renew_sent(sent)
        r = await self._witness.refresh(self._name)
        now = self._clock()
        ok = False
        match r.outcome:
            case RefreshOutcome.RENEWED:
                assert r.ttl_s is not None
                self._lease.renewed(token, r.ttl_s)
                ok = True
            case RefreshOutcome.UNREACHABLE:
                self._lease.renew_failed(token, r.detail)
            case RefreshOutcome.EXPIRED:
                self._lease.renew_failed(token, r.detail)
                self._lease.expired(now, r.detail)
            case RefreshOutcome.TAKEN:
                self._lease.renew_failed(token, r.detail)
                self._lease.taken_elsewhere(now, r.detail)
            case RefreshOutcome.NOT_HELD:
                # the witness no longer lists us (its lease ended earlier)
                self._lease.renew_failed(token, r.detail)
                if self._lease.state is not LeaseState.EXPIRED:
                    self._lease.expired(now, "the witness does not list us as holder")
        self._tick()
        self._notify()
        if self._lease.state is LeaseState.LOST:
            return math.inf
        if self._lease.state is LeaseState.EXPIRED and r.outcome is RefreshOutcome.NOT_HELD:
            # nothing left to renew; keep asking (etcd says who holds it) at
            # the renewal pace so a healed partition is noticed
            return self._renew_every_s
        next_at = sent + (self._renew_every_s if ok else self._renew_every_s / 2)
        until = self._lease.valid_until
        if until is not None and math.isfinite(until) and until > now:
            # wake at the expiry too, so on_change reports it on time
            next_at = min(next_at, until)
        return next_at - self._clock()

    def _tick(self) -> None:
        self._lease.tick(self._clock())
        self._notify()

    def _notify(self) -> None:
        state = self._lease.state
        if state is self._last_state:
            return
        self._last_state = state
        if self._on_change is not None:
            try:
                self._on_change(state, self._lease.reason)
            except Exception:
                log.exception("lease keeper on_change callback failed")
