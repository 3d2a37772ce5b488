"""The etcd witness against a real etcd process (Debian's etcd-server).

Timings are measured and printed (run with -s to see them); the only timing
assertions are orderings the lease rules promise: nobody acquires before the
old holder's validity (last successful renewal *send* + TTL), and a holder
cut off from etcd must fence before its validity ends.
"""

from __future__ import annotations

import asyncio
import signal
import time

from orchestrator.coordination import (
    LeaseKeeper,
    LeaseState,
    RefreshOutcome,
    ToozWitness,
    WitnessError,
    open_witness,
)
from tests.coordination.proc import Holder
from tests.etcd import EtcdServer

NAME = "vm1"
TTL = 1.0


def state_of(keeper: LeaseKeeper) -> LeaseState:
    # a call, so mypy does not carry an earlier `state is X` across awaits
    return keeper.state


def test_takeover_only_after_the_ttl_and_the_stale_holder_learns(etcd: EtcdServer) -> None:
    holder = Holder(etcd.url, "hostA", NAME, TTL)
    try:
        holder.wait_for("state", "held")

        async def go() -> None:
            b = await open_witness(etcd.url, "hostB", TTL)
            assert b.expires
            try:
                assert not await b.try_acquire(NAME)
                await asyncio.sleep(0.5)  # let a renewal or two go by
                holder.signal(signal.SIGSTOP)
                t_stop = time.monotonic()
                await asyncio.sleep(0.05)  # its last lines reach the pipe
                last_valid = holder.last_valid_until()
                assert last_valid is not None
                while not await b.try_acquire(NAME):
                    await asyncio.sleep(0.01)
                t_acquired = time.monotonic()
                # the txn that gave b the key ran after etcd expired A's
                # lease, which is never before A's last send + TTL
                assert t_acquired >= last_valid
                print(
                    f"\netcd takeover: {t_acquired - t_stop:.3f}s after SIGSTOP, "
                    f"{t_acquired - last_valid:.3f}s after A's validity ended (TTL {TTL}s)"
                )
                holder.signal(signal.SIGCONT)
                t_cont = time.monotonic()
                lost = holder.wait_for("state", "lost", timeout=5)
                print(f"stale holder saw LOST {lost['t'] - t_cont:.3f}s after SIGCONT: "
                      f"{lost['reason']}")
                holder.send("renew")
                said = holder.wait_for("renew", False)
                assert said["state"] == "lost"
                # b holds it and renews normally
                assert await b.renew()
            finally:
                await b.stop()

        asyncio.run(go())
    finally:
        holder.close()


def test_keeper_stopped_then_acquire_waits_for_expiry(etcd: EtcdServer) -> None:
    async def go() -> None:
        a = await open_witness(etcd.url, "hostA", TTL)
        b = await open_witness(etcd.url, "hostB", TTL)
        ka = LeaseKeeper(a, NAME, TTL)
        kb = LeaseKeeper(b, NAME, TTL)
        try:
            assert await ka.acquire(2.0)
            # the secondary gives up in time and then does not hold it
            assert not await kb.acquire(0.3)
            assert kb.state is LeaseState.NOT_HELD and not kb.must_fence(0.0)
            await asyncio.sleep(0.4)
            await ka.stop(release=False)  # A stops renewing (a dead orchestrator)
            t_stop = time.monotonic()
            valid = ka.valid_until
            assert valid is not None
            assert await kb.acquire(5.0)
            t_acq = time.monotonic()
            assert t_acq >= valid
            print(f"\nkeeper takeover: {t_acq - t_stop:.3f}s after A stopped renewing, "
                  f"{t_acq - valid:.3f}s after A's validity")
            assert state_of(kb) is LeaseState.HELD and kb.can_release(0.1)
            # A's witness, asked directly, learns it is gone and who has it
            r = await a.refresh(NAME)
            assert r.outcome is RefreshOutcome.TAKEN
        finally:
            await kb.stop()
            await a.stop()
            await b.stop()

    asyncio.run(go())


async def _observing(url: str, holder: Holder, fault: bool) -> float | None:
    """A keeper that observes the holder's renewals, then asks for the lease: with
    ``fault``, after SIGSTOPping the holder (the seconds between the holder's
    validity and our acquisition); without, for 4 TTLs while the holder renews
    (None: it never got the lease)."""
    b = await open_witness(url, "hostB", TTL)
    kb = LeaseKeeper(b, NAME, TTL, observe=True)
    try:
        kb.start()
        await asyncio.sleep(0.5)
        if not fault:
            assert not await kb.acquire(4 * TTL)
            assert kb.state is LeaseState.NOT_HELD
            return None
        holder.signal(signal.SIGSTOP)
        t_stop = time.monotonic()
        await asyncio.sleep(0.05)
        last_valid = holder.last_valid_until()
        assert last_valid is not None
        assert await kb.acquire(5.0)
        t_acq = time.monotonic()
        assert t_acq >= last_valid
        print(f"\nobserved takeover: {t_acq - t_stop:.3f}s after SIGSTOP, "
              f"{t_acq - last_valid:.3f}s after A's validity (TTL {TTL}s)")
        holder.signal(signal.SIGCONT)
        lost = holder.wait_for("state", "lost", timeout=5)
        assert "another" in lost["reason"], lost
        holder.send("renew")
        assert holder.wait_for("renew", False)["state"] == "lost"
        assert state_of(kb) is LeaseState.HELD and await b.renew()
        return t_acq - last_valid
    finally:
        await kb.stop()
        await b.stop()


def test_an_observer_never_breaks_the_lock_of_a_holder_that_renews(etcd: EtcdServer) -> None:
    """The early takeover deletes a key whose revision stood for a TTL; a holder's
    renewals move the revision on, so a watcher trying all along never gets it."""
    holder = Holder(etcd.url, "hostA", NAME, TTL)
    try:
        holder.wait_for("state", "held")
        assert asyncio.run(_observing(etcd.url, holder, fault=False)) is None
        holder.drain()
        assert all(m.get("state") in (None, "held") for m in holder.seen), holder.seen[-5:]
    finally:
        holder.close()


def test_an_observed_holder_that_stops_is_taken_over_after_its_validity(
    etcd: EtcdServer,
) -> None:
    """A watcher that saw the holder's last renewal takes over once that renewal's
    TTL has run out, without waiting for etcd's own revocation (a loop every
    500 ms): never before the holder's validity, and the holder, resumed, learns
    of it and renews nothing."""
    late: list[float | None] = []
    for _ in range(3):
        holder = Holder(etcd.url, "hostA", NAME, TTL)
        try:
            holder.wait_for("state", "held")
            late.append(asyncio.run(_observing(etcd.url, holder, fault=True)))
        finally:
            holder.close()
    print(f"observed takeovers after the validity: {[round(t or 0.0, 3) for t in late]} s")


def test_etcd_killed_fence_before_expiry_then_restart(etcd: EtcdServer) -> None:
    ttl = 2.0
    margin = ttl / 3

    async def go() -> None:
        a = ToozWitness(etcd.url, "hostA", ttl)
        await a.start()
        changes: list[tuple[LeaseState, float]] = []
        ka = LeaseKeeper(a, NAME, ttl, on_change=lambda s, r: changes.append((s, time.monotonic())))
        try:
            assert await ka.acquire(2.0)
            await asyncio.sleep(0.5)
            etcd.kill()
            t_kill = time.monotonic()
            fenced_at = None
            while ka.state is not LeaseState.EXPIRED:
                now = time.monotonic()
                if fenced_at is None and ka.must_fence(margin):
                    fenced_at = now
                    valid = ka.valid_until
                    assert valid is not None and now < valid
                    assert not ka.can_release(margin)
                assert now - t_kill < 2 * ttl
                await asyncio.sleep(0.005)
            assert fenced_at is not None
            uncertain = [t for s, t in changes if s is LeaseState.UNCERTAIN]
            expired = [t for s, t in changes if s is LeaseState.EXPIRED]
            assert uncertain and expired and uncertain[0] < fenced_at <= expired[0]
            print(f"\netcd killed: UNCERTAIN after {uncertain[0] - t_kill:.3f}s, "
                  f"must_fence({margin:.2f}) after {fenced_at - t_kill:.3f}s, "
                  f"EXPIRED after {expired[0] - t_kill:.3f}s (TTL {ttl}s)")

            etcd.start()
            t_up = time.monotonic()
            b = await open_witness(etcd.url, "hostB", ttl)
            try:
                # etcd restores leases from its data and extends them on
                # election, so A's lease may come back (A renews it: HELD
                # again, nobody else could have held it) or lapse; either way
                # exactly one member ends up holding it
                got_b = await b.try_acquire(NAME)
                deadline = time.monotonic() + 3 * ttl
                while not got_b and state_of(ka) is not LeaseState.HELD:
                    if time.monotonic() > deadline:
                        raise TimeoutError("nobody holds the lease after etcd came back")
                    await asyncio.sleep(0.05)
                    got_b = await b.try_acquire(NAME)
                print(f"after restart ({time.monotonic() - t_up:.3f}s): A {ka.state.value}, "
                      f"B {'holds' if got_b else 'waits'}")
                if not got_b:
                    await ka.stop()  # releases (compare-and-delete)
                    assert await b.try_acquire(NAME)
                else:
                    assert not ka.held()
                assert await b.renew()
            finally:
                await b.stop()
        finally:
            await ka.stop()
            await a.stop()

    asyncio.run(go())


def test_hung_etcd_never_blocks_the_caller(etcd: EtcdServer) -> None:
    """etcd SIGSTOPped: connections hang rather than fail; calls end within op_timeout."""
    ttl = 2.0

    async def go() -> None:
        a = ToozWitness(etcd.url, "hostA", ttl)
        await a.start()
        try:
            assert await a.try_acquire(NAME)
            assert etcd.proc is not None
            etcd.proc.send_signal(signal.SIGSTOP)
            try:
                # a call that hung on the stopped etcd would never return: the outer
                # wait only turns that into a failure; each call ends by itself, with
                # its own bound (op_timeout), as the figures printed show
                t0 = time.monotonic()
                r = await asyncio.wait_for(a.refresh(NAME), 30)
                took = time.monotonic() - t0
                assert r.outcome is RefreshOutcome.UNREACHABLE
                t0 = time.monotonic()
                got = None
                try:
                    got = await asyncio.wait_for(a.try_acquire("other"), 30)
                except WitnessError as e:
                    print(f"\nhung etcd: refresh gave up after {took:.3f}s, acquire after "
                          f"{time.monotonic() - t0:.3f}s (op timeout {a.op_timeout_s}s): {e}")
                assert got is None
            finally:
                etcd.proc.send_signal(signal.SIGCONT)
        finally:
            await a.stop()

    asyncio.run(go())
