"""The lease rules: every cell of TRANSITIONS, through the public methods."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from orchestrator.coordination.lease import (
    NO_NEWS,
    TRANSITIONS,
    Lease,
    LeaseError,
    LeaseEvent,
    LeaseState,
)

S, E = LeaseState, LeaseEvent
TTL = 3.0


def in_state(state: LeaseState) -> Lease:
    """A lease brought into `state` at t=10 through the public methods only."""
    lease = Lease()
    if state is S.NOT_HELD:
        return lease
    lease.acquired(lease.renew_sent(10.0), TTL)
    if state is S.UNCERTAIN:
        lease.renew_failed(lease.renew_sent(10.5), "unreachable")
    elif state is S.EXPIRED:
        lease.tick(10.0 + TTL)
    elif state is S.LOST:
        lease.taken_elsewhere(10.5, "another member holds it")
    assert lease.state is state
    return lease


def state_of(lease: Lease) -> LeaseState:
    # a call, so mypy does not carry an earlier `state is X` across events
    return lease.state


def fire(lease: Lease, event: LeaseEvent) -> None:
    now = 11.0
    if event is E.ACQUIRED:
        lease.acquired(lease.renew_sent(now), TTL)
    elif event is E.RENEWED:
        lease.renewed(lease.renew_sent(now), TTL)
    elif event is E.RENEW_FAILED:
        lease.renew_failed(lease.renew_sent(now), "timeout")
    elif event is E.EXPIRED:
        lease.expired(now, "witness says gone")
    elif event is E.TAKEN_ELSEWHERE:
        lease.taken_elsewhere(now, "other")
    elif event is E.RELEASED:
        lease.released()


def test_table_is_total() -> None:
    assert set(TRANSITIONS) == set(S)
    for row in TRANSITIONS.values():
        assert set(row) == set(E)


@pytest.mark.parametrize(
    ("state", "event"), [(s, e) for s in S for e in E], ids=lambda x: x.value
)
def test_every_row(state: LeaseState, event: LeaseEvent) -> None:
    lease = in_state(state)
    reason_before = lease.reason
    fire(lease, event)
    new = TRANSITIONS[state][event]
    assert lease.state is new
    if (state, event) in NO_NEWS:
        assert lease.reason == reason_before
    # validity exists exactly in the states that have one
    if new in (S.NOT_HELD, S.LOST):
        assert lease.valid_until is None
        assert not lease.held(11.0)
    else:
        assert lease.valid_until is not None
    if new in (S.HELD, S.UNCERTAIN, S.EXPIRED, S.LOST) and not lease.can_release(11.0, 0.1):
        assert lease.must_fence(11.0, 0.1)
    if new is S.NOT_HELD:
        assert not lease.must_fence(11.0, 0.1)


def test_validity_counts_from_the_send() -> None:
    lease = Lease()
    token = lease.renew_sent(100.0)
    # the reply arrives 2 s later: validity still runs from 100
    lease.acquired(token, TTL)
    assert lease.valid_until == 100.0 + TTL
    t2 = lease.renew_sent(101.0)
    lease.renewed(t2, TTL)
    assert lease.valid_until == 104.0
    # a late reply to an older request never shortens a newer validity
    t3 = lease.renew_sent(100.5)
    lease.renewed(t3, TTL)
    assert lease.valid_until == 104.0


def test_uncertain_keeps_validity_then_fences_then_expires() -> None:
    lease = Lease()
    lease.acquired(lease.renew_sent(0.0), TTL)
    lease.renew_failed(lease.renew_sent(1.0), "connection refused")
    assert lease.state is S.UNCERTAIN and "connection refused" in lease.reason
    assert lease.held(2.0) and lease.can_release(2.0, 0.5)
    assert not lease.must_fence(2.0, 0.5)
    # within fence margin of the end: fence, while still (barely) held
    assert lease.held(2.6) and lease.must_fence(2.6, 0.5) and not lease.can_release(2.6, 0.5)
    assert not lease.held(TTL)
    lease.tick(TTL)
    assert state_of(lease) is S.EXPIRED and lease.must_fence(TTL, 0.0)


def test_queries_follow_the_clock_without_tick() -> None:
    # a holder SIGSTOPped past its validity: no tick has run, state says
    # HELD, but nothing may be released
    lease = Lease()
    lease.acquired(lease.renew_sent(0.0), TTL)
    assert lease.state is S.HELD
    assert not lease.held(10.0) and not lease.can_release(10.0, 0.0)
    assert lease.must_fence(10.0, 0.0)


def test_infinite_ttl_for_a_lock_held_until_death() -> None:
    lease = Lease()
    lease.acquired(lease.renew_sent(0.0), math.inf)
    assert lease.valid_until == math.inf
    assert lease.can_release(1e12, 1e6) and not lease.must_fence(1e12, 1e6)
    lease.taken_elsewhere(5.0, "lock file replaced")
    assert lease.must_fence(5.0, 0.0) and not lease.held(5.0)


def test_stale_replies_and_protocol_errors() -> None:
    lease = Lease()
    token = lease.renew_sent(0.0)
    lease.released()
    lease.renewed(token, TTL)  # a reply after release: ignored
    assert lease.state is S.NOT_HELD and lease.valid_until is None
    with pytest.raises(LeaseError):
        lease.acquired(12345, TTL)
    bad: list[Callable[[], None]] = [
        lambda: lease.acquired(lease.renew_sent(0.0), 0.0),
        lambda: lease.acquired(lease.renew_sent(0.0), math.nan),
    ]
    for call in bad:
        with pytest.raises(LeaseError):
            call()


def test_pending_tokens_stay_bounded() -> None:
    lease = Lease()
    for i in range(10_000):
        lease.renew_sent(float(i))
    assert len(lease._pending) <= 8
