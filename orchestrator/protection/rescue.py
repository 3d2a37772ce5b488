"""A dead primary worker's lease, settled on its behalf (issue 22).

A primary's worker holds the lease under its guest; once the worker is dead
nobody renews it, and the secondary may take the lease and the guest over. Its
supervisor (remusd) then does what the worker can no longer do itself, by the
rules of ``lease.py``: it pauses the guest, takes the lease itself, and looks for
a takeover mark on the witness. Holding the lease with no mark, nobody else runs
the guest and nobody can start it: ours is marked as running here, resumes, and
the lease is held through the secondary's takeover window (it drops its copy,
not getting the lease) before a new worker may protect it. Marked, another host
runs the guest: our copy is destroyed. Until the witness can tell, the guest
stays paused.

:class:`LeaseRescue` is that procedure for one protection. It knows the host and
the witness; what it decides it tells its supervisor through callbacks: ``record``
(the protection's state and reason), ``emit`` (an event) and ``give_up`` (nothing
is left to protect from here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ..coordination import LeaseKeeper
from .fence import guard_alive, marker_path
from .host import DomainNotFound, Hypervisor, HypervisorError, preflight, rescue_domain
from .lease import close_lease, open_lease
from .session import ReplicationError, host_identity
from .spec import ProtectionSpec

log = logging.getLogger(__name__)

# the primary's self-fencing guard (Xen): the rescue waits for it
GUARD_WAIT_S: Final = 10.0
# how often a rescue asks the witness again while it cannot tell
RESCUE_RETRY_S: Final = 0.25
# the states a rescue records (the worker's own FENCED and UNPROTECTED mean the
# same): its guest paused until the lease says; running here holding the lease,
# nothing replicating it; destroyed, another host having taken the guest over
FENCED: Final = "fenced"
UNPROTECTED: Final = "unprotected"
TAKEN_OVER: Final = "taken-over"
# the lease states in which the copy we run stays covered
LEASE_VALID: Final = ("held", "uncertain")
LEASE_GONE: Final = ("lost", "expired")


def redact_url(url: str) -> str:
    """``url`` with any password taken out: for events, metrics labels and logs."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def lease_data(witness: str, lease: str | None, valid_for_s: float | None) -> dict[str, Any]:
    """The lease as events carry it (a file lock's endless validity as null)."""
    valid = None if valid_for_s is None or math.isinf(valid_for_s) else valid_for_s
    return {"witness": redact_url(witness), "lease": lease, "lease_valid_for_s": valid}


@dataclass
class LeaseRescue:
    """The supervisor's own hold on the lease of a primary whose worker died.

    ``state`` is what the record says meanwhile: ``fenced`` (the guest paused
    until the witness tells), ``unprotected`` (the lease is the supervisor's and
    nobody took over: the guest runs here until a new worker protects it). ``lease``
    and ``valid_until`` are the lease as the supervisor's keeper sees it, for the API
    and the metrics.
    """

    name: str
    spec: ProtectionSpec  # the protection's, as its record has it (a new worker gets it)
    witness: str
    hv: Hypervisor
    status_dir: Path
    record: Callable[[str, str], None]  # (state, reason): the protection's record
    emit: Callable[[str, str, dict[str, Any] | None], None]  # (kind, message, data)
    give_up: Callable[[], None]  # nothing to protect from here: said as it is decided
    recorded: str = ""  # the record's state when the rescue began
    # the dead worker may have replicated (its status was published): a secondary may
    # hold a checkpoint, and the guest is paused; else it is only checked before a retry
    replicated: bool = True
    state: str = FENCED
    uuid: str = ""  # of the domain it rescues
    lease: str = "not_held"
    reason: str = ""
    valid_until: float | None = None  # monotonic, as the keeper counts
    task: asyncio.Task[None] | None = None  # the supervisor's, running run()

    def valid_for_s(self) -> float | None:
        if self.valid_until is None:
            return None
        if math.isinf(self.valid_until):
            return math.inf  # a file witness's lock: held until its holder dies
        return round(max(0.0, self.valid_until - time.monotonic()), 3)

    def seen(self, keeper: LeaseKeeper) -> None:
        self.lease = str(keeper.state.value)
        self.valid_until = keeper.valid_until if self.lease in LEASE_VALID else None

    def _says(self, state: str, reason: str, kind: str | None) -> None:
        """What the rescue decided, in the record (state and reason) and as an event."""
        self.state, self.reason = state, reason
        self.record(state, reason)
        if kind is not None:
            data = lease_data(self.witness, self.lease, self.valid_for_s())
            self.emit(kind, reason, {**data, "by": "remusd"})

    def pause(self) -> None:
        """Fence the copy here on its dead worker's behalf: no guest runs unless the
        lease is ours (a guest left suspended mid-checkpoint stays suspended)."""
        with contextlib.suppress(DomainNotFound, HypervisorError):
            info = self.hv.lookup(self.name)
            if info.uuid == self.uuid and info.state == "running":
                self.hv.pause(info.domid)

    def _destroy(self) -> None:
        with contextlib.suppress(DomainNotFound, HypervisorError):
            info = self.hv.lookup(self.name)
            if info.uuid == self.uuid:
                self.hv.destroy(info.domid)

    def _rescue_domain(self) -> None:
        for kind, message in rescue_domain(self.hv, self.name, self.status_dir):
            self.emit(kind, message, None)

    async def run(self, why: str) -> bool | None:
        """Settle the lease: True once a new worker may protect the guest (the hold
        was the wait; one that never replicated is only checked), False once nothing
        is left to protect from here (no copy, or another host took it over), None
        if the rescue failed (the guest stays as it is: paused if undecided)."""
        name, shown = self.name, redact_url(self.witness)
        leased = self.spec.with_(witness=self.witness)  # what the worker ran under
        try:
            # a fence guard (Xen) acts first: it pauses, and destroys a copy whose
            # secondary holds a checkpoint; taking the lease from under that would
            # leave no copy anywhere
            deadline = time.monotonic() + GUARD_WAIT_S
            while guard_alive(self.status_dir, name) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            try:
                info = self.hv.lookup(name)
            except DomainNotFound:
                self._says(
                    self.recorded,
                    f"{why}; no copy of {name} is left here (destroyed on the lease's word, "
                    "or removed): not protected again from here",
                    "copy-gone",
                )
                self.give_up()
                return False
            self.uuid = info.uuid
            if self.replicated:
                self.pause()
                self._says(
                    FENCED,
                    f"{why}: nobody here renews the lease on {shown}, so the guest may not "
                    "run (paused, or left suspended) until remusd holds it and knows that "
                    "nobody took over",
                    FENCED,
                )
            else:
                self.state = self.recorded
            while True:
                try:
                    keeper = await open_lease(leased, info.uuid, "remusd")
                    break
                except ReplicationError as exc:  # the witness cannot be reached (yet)
                    self._waiting(why, str(exc))
                await asyncio.sleep(RESCUE_RETRY_S)
            try:
                return await self._settle(leased, keeper, why)
            finally:
                # released before a new worker starts: it takes the lease itself
                await close_lease(keeper, release=True)
        except asyncio.CancelledError:
            raise
        except Exception:  # the guest stays as it is (paused if undecided); log it
            log.exception("rescue of %s under its lease", name)
            self.emit("error", f"{why}; the lease rescue failed: see remusd's log", None)
            return None

    def _waiting(self, why: str, problem: str) -> None:
        does = "stays paused" if self.replicated else "is not protected again"
        reason = (
            f"{why}: the guest {does} until the witness {redact_url(self.witness)} can "
            f"tell who runs it ({problem})"
        )
        if reason != self.reason:
            self._says(self.state, reason, None)

    async def _settle(self, spec: ProtectionSpec, keeper: LeaseKeeper, why: str) -> bool:
        """Decide, and hold: True once the guest ran here under remusd's lease through
        the secondary's takeover window (a new worker may protect it); False once
        another host took it over (our copy destroyed)."""
        me = host_identity(self.hv)
        name, shown = self.name, redact_url(spec.witness)
        while True:
            ours = False
            others: list[str] = []
            try:
                others = [h for h in await keeper.witness.taken_over(keeper.name) if h != me]
                if not others and await keeper.acquire(spec.lease_ttl_s):
                    # holding the lease nobody can take over; a mark made before is there
                    others = [h for h in await keeper.witness.taken_over(keeper.name) if h != me]
                    ours = not others
                elif not others:
                    self.seen(keeper)
                    self._waiting(why, f"the lease is {self.lease}: {keeper.reason}")
            except Exception as exc:  # WitnessError: the witness could not tell
                self._waiting(why, str(exc))
            self.seen(keeper)
            if others:
                self._destroy()
                self._says(
                    TAKEN_OVER,
                    f"{why}; host {others[0]} took {name} over (its mark on {shown}): the "
                    "guest runs there, and our copy was destroyed",
                    TAKEN_OVER,
                )
                self.give_up()
                return False
            if not ours:
                await asyncio.sleep(RESCUE_RETRY_S)
                continue
            if not self.replicated:  # no secondary can hold a checkpoint of that worker
                return True
            try:
                # on the record before it runs: a secondary that takes the lease after
                # us finds the mark and drops its copy (as a worker's primary does)
                await keeper.witness.mark_taken_over(keeper.name, me)
            except Exception as exc:  # WitnessError
                self._waiting(why, f"marking that it runs here: {exc}")
                await asyncio.sleep(RESCUE_RETRY_S)
                continue
            # ours: the fence guard's hold (Xen) may go, and the guest resumes
            marker_path(self.status_dir, name).unlink(missing_ok=True)
            self._rescue_domain()
            hold = spec.heartbeat_timeout_s + spec.takeover_window_s + 1.0
            self._says(
                UNPROTECTED,
                f"{why}; remusd holds the lease on {shown} and nobody took over: the guest "
                "runs here, unprotected, and is protected anew once the secondary has "
                f"dropped its copy, not getting the lease ({2 * hold:g} s at most)",
                "running-unprotected",
            )
            if await self._hold(spec, keeper, hold):
                return True
            # the lease went while the guest ran on it: fenced again, and decide anew
            self.pause()
            lost = f"the lease on {shown} is {self.lease} ({keeper.reason})"
            self.emit("lease-lost", f"{lost} while remusd held it", None)
            self._says(FENCED, f"{why}; {lost}: the guest is paused again", FENCED)

    async def _hold(self, spec: ProtectionSpec, keeper: LeaseKeeper, window: float) -> bool:
        """Hold the lease while the guest runs here until no secondary can take over: the
        peer has no copy of the domain left (it dropped it, not getting the lease), or,
        the peer not answering, its takeover window has passed; twice that at most.
        False if the lease went meanwhile."""
        start = time.monotonic()
        next_ask = start
        peer_copy: bool | None = None
        while not keeper.must_fence(spec.lease_fence_margin_s):
            self.seen(keeper)
            held_for = time.monotonic() - start
            if peer_copy is False or held_for >= 2 * window:
                return True
            if held_for >= window and peer_copy is None:
                return True
            if time.monotonic() >= next_ask:
                peer_copy = await self._peer_has_copy(spec)
                next_ask = time.monotonic() + 0.5
                continue
            await asyncio.sleep(0.05)
        self.seen(keeper)
        return False

    async def _peer_has_copy(self, spec: ProtectionSpec) -> bool | None:
        """Whether the peer still has a domain of this name (None: it cannot be asked):
        a secondary there could still take over with it."""
        if spec.blackhole:
            return False
        checks = {r.check for r in await preflight(self.hv, spec)}
        if checks & {"peer_address", "peer_reachable", "peer_version"}:
            return None
        return "peer_name" in checks
