"""The rules of one lease as one holder sees them, sans I/O.

No clock is read and nothing is sent here: every method that needs the time
takes `now`, a `time.monotonic()` value, so the rules can be walked in tests
with made-up times and driven by any I/O layer (`keeper.LeaseKeeper`).

Validity is counted from the moment a request was *sent*, not from when its
reply arrived: the backend starts (or restarts) its TTL when it receives the
request, which is after we sent it, so `sent + ttl` is never later than the
backend's own expiry. That holds for any network delay, for a reply that
arrives late, and for a holder that was stopped between sending and reading
the reply. It assumes only that the two monotonic clocks tick at the same
rate over one TTL; the release and fence margins absorb the drift.

A backend whose lock cannot expire while its holder lives (tooz's file
driver: an fcntl lock on a file, held by the process) is given
`ttl_s=float('inf')`. That is safe because such a lock has exactly the two
properties a lease is approximating: a holder that is SIGSTOPped (or merely
slow) keeps the lock, so nobody can take over while it might wake up and
release output; a holder that dies loses it at once, as the kernel drops the
process's locks, so a takeover is never delayed. What it cannot give is
protection across hosts: the lock lives in one kernel, which is why the file
witness only serves simulated hosts on one machine.

The transitions are one table, `TRANSITIONS[state][event] -> state`, as
h11's `_state.py` does it; every cell is filled, so no event is ever
"impossible" at run time (a stale reply is a fact to absorb, not a crash in
the code that decides whether output may flow).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from enum import Enum


class LeaseState(Enum):
    NOT_HELD = "not_held"
    HELD = "held"
    # the last renewal failed (backend unreachable or slow) but the validity
    # counted from the last successful send has not run out yet
    UNCERTAIN = "uncertain"
    # our validity ran out (by our clock, or the backend said the lease is gone)
    # and nobody else has been seen holding it
    EXPIRED = "expired"
    # another holder was seen: our copy must go
    LOST = "lost"


class LeaseEvent(Enum):
    ACQUIRED = "acquired"
    RENEWED = "renewed"
    RENEW_FAILED = "renew_failed"
    EXPIRED = "expired"
    TAKEN_ELSEWHERE = "taken_elsewhere"
    RELEASED = "released"


_S = LeaseState
_E = LeaseEvent

TRANSITIONS: dict[LeaseState, dict[LeaseEvent, LeaseState]] = {
    _S.NOT_HELD: {
        _E.ACQUIRED: _S.HELD,
        # a renewal reply can never make us a holder: only an acquisition can
        _E.RENEWED: _S.NOT_HELD,
        # a failed acquisition attempt: nothing held, nothing to lose
        _E.RENEW_FAILED: _S.NOT_HELD,
        _E.EXPIRED: _S.NOT_HELD,
        # someone else holds it: that is the normal case for a secondary
        _E.TAKEN_ELSEWHERE: _S.NOT_HELD,
        _E.RELEASED: _S.NOT_HELD,
    },
    _S.HELD: {
        _E.ACQUIRED: _S.HELD,
        _E.RENEWED: _S.HELD,
        _E.RENEW_FAILED: _S.UNCERTAIN,
        _E.EXPIRED: _S.EXPIRED,
        _E.TAKEN_ELSEWHERE: _S.LOST,
        _E.RELEASED: _S.NOT_HELD,
    },
    _S.UNCERTAIN: {
        _E.ACQUIRED: _S.HELD,
        _E.RENEWED: _S.HELD,
        _E.RENEW_FAILED: _S.UNCERTAIN,
        _E.EXPIRED: _S.EXPIRED,
        _E.TAKEN_ELSEWHERE: _S.LOST,
        _E.RELEASED: _S.NOT_HELD,
    },
    _S.EXPIRED: {
        _E.ACQUIRED: _S.HELD,
        # the backend still had our lease (our clock is the conservative one:
        # it counts from the send): nobody else can have held it meanwhile
        _E.RENEWED: _S.HELD,
        _E.RENEW_FAILED: _S.EXPIRED,
        _E.EXPIRED: _S.EXPIRED,
        _E.TAKEN_ELSEWHERE: _S.LOST,
        _E.RELEASED: _S.NOT_HELD,
    },
    _S.LOST: {
        # a fresh acquisition (after the other holder let go) is a new lease
        _E.ACQUIRED: _S.HELD,
        # a stale reply must not undo having seen another holder
        _E.RENEWED: _S.LOST,
        _E.RENEW_FAILED: _S.LOST,
        _E.EXPIRED: _S.LOST,
        _E.TAKEN_ELSEWHERE: _S.LOST,
        _E.RELEASED: _S.NOT_HELD,
    },
}

# Events that tell nothing new in a state: its reason (who took it, why it
# ran out) is kept rather than overwritten by e.g. "renewed".
NO_NEWS: frozenset[tuple[LeaseState, LeaseEvent]] = frozenset(
    {
        (_S.NOT_HELD, _E.RENEWED),
        (_S.NOT_HELD, _E.EXPIRED),
        (_S.EXPIRED, _E.RENEW_FAILED),
        (_S.EXPIRED, _E.EXPIRED),
        (_S.LOST, _E.RENEWED),
        (_S.LOST, _E.RENEW_FAILED),
        (_S.LOST, _E.EXPIRED),
        (_S.LOST, _E.TAKEN_ELSEWHERE),
    }
)

# States in which we hold, or held and have not let go: a copy we run exists.
_ONCE_HELD = frozenset({_S.HELD, _S.UNCERTAIN, _S.EXPIRED, _S.LOST})
# States in which validity counts.
_VALID_STATES = frozenset({_S.HELD, _S.UNCERTAIN})
# States with no validity at all (EXPIRED keeps its past end for reporting).
_NO_VALIDITY = frozenset({_S.NOT_HELD, _S.LOST})

# Requests in flight are few (the keeper sends one at a time); keep a handful
# so a reply to a recent request still counts and nothing grows.
_MAX_PENDING = 8


class LeaseError(Exception):
    """A caller broke the protocol (e.g. `acquired` for a token never sent)."""


class Lease:
    """One lease as one holder sees it.

    Use: `token = renew_sent(now)` just before sending an acquire or a
    renewal, then exactly one of `acquired(token, ttl)`, `renewed(token, ttl)`
    or `renew_failed(token, reason)` for its reply; `taken_elsewhere` when
    another holder is seen, `expired` when the backend says our lease is
    gone, `released` when we let go, and `tick(now)` so that `state` follows
    the clock. The time queries (`held`, `can_release`, `must_fence`) always
    follow the clock themselves: they never trust a stale `state`.
    """

    def __init__(self) -> None:
        self._state = LeaseState.NOT_HELD
        self._reason = "never acquired"
        self._valid_until: float | None = None
        self._next_token = 1
        self._pending: OrderedDict[int, float] = OrderedDict()

    # -- queries --------------------------------------------------------------

    @property
    def state(self) -> LeaseState:
        """The state as of the last event or `tick`."""
        return self._state

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def valid_until(self) -> float | None:
        """Monotonic time until which we are sure to hold it (inf: until we die).

        None when we do not hold it (never did, released, or lost it).
        After expiry it keeps the (past) end of the last validity.
        """
        return self._valid_until

    def held(self, now: float) -> bool:
        return (
            self._state in _VALID_STATES
            and self._valid_until is not None
            and now < self._valid_until
        )

    def can_release(self, now: float, margin_s: float) -> bool:
        """True only if we hold it and will still hold it at `now + margin_s`."""
        return (
            self.held(now)
            and self._valid_until is not None
            and (now + margin_s < self._valid_until)
        )

    def must_fence(self, now: float, fence_margin_s: float) -> bool:
        """We held it and can no longer be sure to hold it past `now + fence_margin_s`.

        The primary must then hold all unreleased output and pause its guest.
        Never true for a lease we never held or released (a secondary waiting).
        """
        return self._state in _ONCE_HELD and not self.can_release(now, fence_margin_s)

    # -- requests -------------------------------------------------------------

    def renew_sent(self, now: float) -> int:
        """An acquire or renew request is about to be sent at `now`; returns its token."""
        token = self._next_token
        self._next_token += 1
        self._pending[token] = now
        while len(self._pending) > _MAX_PENDING:
            self._pending.popitem(last=False)
        return token

    # -- replies and observations --------------------------------------------

    def acquired(self, token: int, ttl_s: float) -> None:
        sent = self._pending.pop(token, None)
        if sent is None:
            raise LeaseError(f"acquired() for unknown token {token}")
        self._fire(LeaseEvent.ACQUIRED, "acquired", self._validity(sent, ttl_s))

    def renewed(self, token: int, ttl_s: float) -> None:
        sent = self._pending.pop(token, None)
        if sent is None:
            # a reply to a request we no longer track (released since, or
            # pushed out): it cannot extend anything we know of
            return
        self._fire(LeaseEvent.RENEWED, "renewed", self._validity(sent, ttl_s))

    def _validity(self, sent: float, ttl_s: float) -> float:
        """Valid until the request's send time plus the TTL granted; a reply to an
        older request must not shorten a newer validity."""
        _check_ttl(ttl_s)
        until = sent + ttl_s
        if self._state in _VALID_STATES and self._valid_until is not None:
            until = max(until, self._valid_until)
        return until

    def renew_failed(self, token: int, reason: str) -> None:
        self._pending.pop(token, None)
        # validity is untouched: it still runs from the last successful send
        self._fire(LeaseEvent.RENEW_FAILED, f"renewal failed: {reason}", self._valid_until)

    def expired(self, now: float, reason: str) -> None:
        """The backend says our lease is gone (or `tick` saw it run out)."""
        until = self._valid_until
        if until is not None:
            until = min(until, now)
        self._fire(LeaseEvent.EXPIRED, reason, until)

    def taken_elsewhere(self, now: float, reason: str) -> None:
        # `now` is for symmetry with the other time-bound events: seeing
        # another holder ends our validity whatever the clock says
        del now
        self._fire(LeaseEvent.TAKEN_ELSEWHERE, reason, None)

    def released(self) -> None:
        self._pending.clear()
        self._fire(LeaseEvent.RELEASED, "released", None)

    def tick(self, now: float) -> None:
        """Let `state` follow the clock: a validity that ran out is EXPIRED."""
        if (
            self._state in _VALID_STATES
            and self._valid_until is not None
            and now >= self._valid_until
        ):
            reason = f"{self._state.value}: validity ran out"
            self._fire(LeaseEvent.EXPIRED, reason, self._valid_until)

    # -- the one place state changes -------------------------------------------

    def _fire(self, event: LeaseEvent, reason: str, valid_until: float | None) -> None:
        new = TRANSITIONS[self._state][event]
        if (self._state, event) not in NO_NEWS:
            self._reason = reason
        self._state = new
        self._valid_until = None if new in _NO_VALIDITY else valid_until


def _check_ttl(ttl_s: float) -> None:
    if not (ttl_s > 0) or math.isnan(ttl_s):
        raise LeaseError(f"ttl must be > 0 (inf for a lock held until its holder dies): {ttl_s}")
