"""A witness: the third party that says which copy of a guest may serve.

`Witness` is the small interface the keeper needs; `ToozWitness` implements
it on tooz with one tooz lock per protection name (`remus-<name>`):

- `file:///DIR`: tooz's file driver, an fcntl (POSIX record) lock through
  fasteners on `DIR/remus-<name>`. It never expires while its holder
  lives and is dropped by the kernel when the holder dies, so `expires` is
  False and the lease's TTL is `inf` (see `lease` for why that is safe). It
  is the embedded default: both simulated hosts of one machine share DIR.
- `etcd3+http://HOST:PORT` (or `etcd3+https`): tooz's etcd3gw driver. A lock
  is a key put under a fresh etcd lease only if the key does not exist; the
  key goes when the lease expires, so `expires` is True.

On etcd, a waiting member does not wait for etcd to delete an expired key.
etcd revokes expired leases in a loop that runs every 500 ms, so a takeover
that waits for the key comes up to half a second after the holder's lease ran
out. Instead, every renewal re-puts the lock key (only while it is still
ours), so the key's revision moves on each renewal the holder counts on. A
waiting member that `observe`s the key notes when it first saw each revision.
Once a revision has stood for the holder's granted TTL (plus a margin for the
two clocks' rates), it deletes the key, if its revision is still that one,
and takes the lock. That is safe because the holder counts a renewal only
once its re-put committed, which is before we saw it. Its validity runs from
before that renewal's request, so it ends before our deadline. A re-put that
comes after our delete fails its compare, so the holder counts nothing more.

Every tooz call runs in one worker thread of the witness and is bounded by
`op_timeout_s` (a quarter of the TTL by default): a witness that hangs makes
a call fail with `WitnessError` in bounded time, never blocks the caller, and
never piles up threads (a call made while an earlier one is still stuck in
the thread fails at once).
"""

from __future__ import annotations

import abc
import asyncio
import base64
import concurrent.futures
import contextlib
import math
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import tooz.coordination
    from tooz import locking

# tooz and etcd3gw are imported when a witness is opened, not with this module:
# a protection without a witness (the nested lab's dom0, which has no tooz) must
# not need them.

T = TypeVar("T")

FILE_SCHEMES = frozenset({"file"})
ETCD_SCHEMES = frozenset({"etcd3+http", "etcd3+https"})
LOCK_PREFIX = "remus-"
TAKEOVER_PREFIX = "remus-takeover-"
START_TIMEOUT_S = 10.0
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


# What the backends raise when they cannot be reached or answer nonsense.
# etcd3gw's own exceptions are listed because tooz lets them through in
# places (Etcd3Driver._start and heartbeat are not wrapped by its
# _translate_failures); ValueError/KeyError cover a non-etcd HTTP server.
def _backend_errors() -> tuple[type[BaseException], ...]:
    import tooz
    from etcd3gw import exceptions as etcd3gw_exc

    return (tooz.ToozError, etcd3gw_exc.Etcd3Exception, OSError, ValueError, KeyError)


class WitnessError(Exception):
    """The witness could not answer: unknown URL, unreachable, too slow."""


class RefreshOutcome(Enum):
    RENEWED = "renewed"
    # no answer (or an error): we may still hold it; validity runs on
    UNREACHABLE = "unreachable"
    # the backend says our lease is gone and nobody else holds the lock
    EXPIRED = "expired"
    # the backend says somebody else holds the lock now
    TAKEN = "taken"
    # we never held it (or released it): nothing to refresh
    NOT_HELD = "not_held"


@dataclass(frozen=True)
class Refresh:
    outcome: RefreshOutcome
    # the TTL the backend granted (inf for a lock that cannot expire); only
    # meaningful with RENEWED
    ttl_s: float | None = None
    detail: str = ""


class Witness(abc.ABC):
    """One member's connection to a witness; one lease per protection name."""

    @property
    @abc.abstractmethod
    def expires(self) -> bool:
        """Whether a held lock can expire while its holder lives (etcd yes, file no)."""

    @property
    @abc.abstractmethod
    def ttl_s(self) -> float:
        """The TTL asked of the backend (what renewals are paced by)."""

    @property
    def lease_ttl_s(self) -> float:
        """The TTL a `Lease` counts on after an acquisition: inf if it cannot expire."""
        return self.ttl_s if self.expires else math.inf

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect; raises WitnessError if the backend cannot be reached."""

    @abc.abstractmethod
    async def try_acquire(self, name: str) -> bool:
        """Take `name` if free: True if we hold it now, False if another does.

        Raises WitnessError if the witness could not tell.
        """

    @abc.abstractmethod
    async def refresh(self, name: str) -> Refresh:
        """Renew our lease on `name` and say what the backend answered. Never raises."""

    async def renew(self) -> bool:
        """Refresh every lease we hold; False if any could not be renewed.

        Also False while a lease we held was lost (expired, taken) and not yet
        `release`d: "nothing left to renew" must not read as success to a
        holder that has just woken up from a SIGSTOP.
        """
        ok = not self.lost_names()
        for name in self.held_names():
            if (await self.refresh(name)).outcome is not RefreshOutcome.RENEWED:
                ok = False
        return ok

    @abc.abstractmethod
    def held_names(self) -> list[str]:
        """The names we believe we hold (until a refresh says otherwise)."""

    @abc.abstractmethod
    def lost_names(self) -> list[str]:
        """Names we held and lost (expired or taken) and have not released since."""

    @abc.abstractmethod
    async def release(self, name: str) -> None:
        """Let `name` go (compare-and-delete: never someone else's lock)."""

    # A takeover mark outlives the lease: the lease says who may run the guest
    # now, the mark says that somebody other than the primary started it since
    # the primary last took the lease. A fenced primary that finds the lease
    # free cannot tell "nobody took over" from "the survivor took over and has
    # since exited" without it, and the two call for opposite acts (resume our
    # copy; destroy it).

    @abc.abstractmethod
    async def mark_taken_over(self, name: str, by: str) -> None:
        """Record, durably, that host `by` (not the primary) took `name` over.

        Made while holding `name`'s lease and before the guest runs there.
        Raises WitnessError if the witness could not record it.
        """

    @abc.abstractmethod
    async def taken_over(self, name: str) -> list[str]:
        """The hosts that took `name` over since its marks were last cleared
        (WitnessError if the witness could not tell)."""

    @abc.abstractmethod
    async def clear_taken_over(self, name: str) -> None:
        """The lease holder starts a protection afresh: forget old takeovers."""

    async def observe(self, name: str) -> None:
        """Note, for a name another member holds, its latest renewal.

        A member that will want the lock calls this while it waits, so that a
        takeover can count the holder's TTL from the holder's last renewal.
        It is only an optimisation: without it, an acquisition counts from
        its own first look. Nothing to note by default (a lock that cannot
        expire). Raises WitnessError if the witness could not answer.
        """
        _check_name(name)

    @abc.abstractmethod
    async def stop(self) -> None:
        """Release everything held and disconnect."""


@dataclass
class _Ticket:
    """One call into the worker thread; both flags are read and set under `_mu`."""

    abandoned: bool = False
    committed: bool = False


@dataclass
class _Seen:
    """Another member's hold on a name, as we saw it (etcd): the lock key's
    revision, its lease, and when we first saw that revision (our monotonic
    clock). The granted TTL is fetched once, when the revision is old enough."""

    mod_revision: int
    lease_id: int
    since: float
    granted_ttl_s: float | None = None


@dataclass
class _Held:
    lock: locking.Lock
    # file driver: the lock file's identity when we took it; a different
    # inode at the path means the file was replaced and another process may
    # lock the new one, so we can no longer claim exclusivity
    inode: tuple[int, int] | None = None


class ToozWitness(Witness):
    """A `Witness` on tooz: `file:///DIR` or `etcd3+http://HOST:PORT`."""

    def __init__(
        self,
        url: str,
        member: str,
        ttl_s: float = 3.0,
        *,
        op_timeout_s: float | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        self._scheme = parts.scheme
        if self._scheme not in FILE_SCHEMES | ETCD_SCHEMES:
            raise WitnessError(
                f"witness {url!r}: unknown scheme {self._scheme!r}; use file:///DIR or "
                "etcd3+http://HOST:PORT"
            )
        if not member:
            raise WitnessError("witness member id must not be empty")
        if not ttl_s > 0 or math.isinf(ttl_s):
            raise WitnessError(f"witness ttl must be finite and > 0: {ttl_s}")
        self._url = url
        self._member = member
        self._dir = ""
        if self._scheme in FILE_SCHEMES:
            if not parts.path.startswith("/") or parts.netloc:
                raise WitnessError(f"witness {url!r}: want file:///ABSOLUTE/DIR")
            self._dir = os.path.abspath(parts.path)
            self._ttl_s = float(ttl_s)
        else:
            # etcd leases are whole seconds; rounding up keeps the lease at
            # least as long as asked, and the Lease counts on what we ask
            self._ttl_s = float(max(1, math.ceil(ttl_s)))
        self._op_timeout_s = op_timeout_s if op_timeout_s is not None else self._ttl_s / 4
        if not 0 < self._op_timeout_s < self._ttl_s:
            raise WitnessError(f"witness op timeout {self._op_timeout_s}s must be under the TTL")
        self._coord: tooz.coordination.CoordinationDriver | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._inflight: concurrent.futures.Future[Any] | None = None
        self._turn = asyncio.Lock()
        # guards _held and _locks between the loop and the worker thread
        self._mu = threading.Lock()
        self._held: dict[str, _Held] = {}
        # bounded by the names ever held; cleared by release or re-acquire
        self._lost: set[str] = set()
        # one tooz lock object per name for the witness's life: tooz's etcd
        # driver keeps every lock it ever acquired in a set until a release
        # succeeds, so fresh objects per attempt would grow that set
        self._locks: dict[str, locking.Lock] = {}
        # etcd: the lock key as we last saw it, per name we do not hold; one
        # entry per name, dropped when we take it
        self._seen: dict[str, _Seen] = {}
        # how much later than the holder's TTL we delete its key: for the two
        # monotonic clocks' rates (NTP slews at most 500 ppm) and then some
        self._break_margin_s = max(0.02, self._ttl_s * 0.01)

    def __repr__(self) -> str:
        return f"ToozWitness({self._url!r}, member={self._member!r}, ttl_s={self._ttl_s})"

    @property
    def url(self) -> str:
        return self._url

    @property
    def expires(self) -> bool:
        return self._scheme in ETCD_SCHEMES

    @property
    def ttl_s(self) -> float:
        return self._ttl_s

    @property
    def op_timeout_s(self) -> float:
        return self._op_timeout_s

    def held_names(self) -> list[str]:
        with self._mu:
            return list(self._held)

    def lost_names(self) -> list[str]:
        with self._mu:
            return sorted(self._lost)

    # -- the one way into the worker thread ------------------------------------

    async def _call(
        self, what: str, fn: Callable[[_Ticket], T], timeout_s: float | None = None
    ) -> T:
        """Run `fn(ticket)` in the worker thread; the whole call within op_timeout_s.

        Calls take turns (one tooz client, one thread); waiting for the turn
        counts against the same bound. `ticket.abandoned` is set (under `_mu`) if we
        stop waiting, so a late success in the thread can undo itself instead
        of leaving a lock held that the caller was told it did not get; a
        call that already `committed` (under `_mu`) is waited for instead.
        """
        executor = self._executor
        if executor is None:
            raise WitnessError(f"{what}: witness not started")
        ticket = _Ticket()
        submitted: list[concurrent.futures.Future[T]] = []

        async def in_turn() -> T:
            async with self._turn:
                if self._inflight is not None and not self._inflight.done():
                    # an earlier call timed out and its thread is still stuck:
                    # fail now rather than queue behind it
                    raise WitnessError(f"{what}: an earlier witness call is still stuck")
                cf = executor.submit(fn, ticket)
                submitted.append(cf)
                self._inflight = cf
                return await asyncio.wrap_future(cf)

        try:
            try:
                return await asyncio.wait_for(in_turn(), timeout_s or self._op_timeout_s)
            except TimeoutError:
                with self._mu:
                    if not ticket.committed:
                        ticket.abandoned = True
                if ticket.abandoned:
                    raise WitnessError(
                        f"{what}: no answer from {self._url} within "
                        f"{timeout_s or self._op_timeout_s:.3g}s"
                    ) from None
                # it took the lock just as we gave up: its answer stands, and
                # all that is left in the thread is returning it
                return await asyncio.wrap_future(submitted[0])
        except _backend_errors() as e:
            # tooz's timeouts carry an empty message; the cause says what timed out
            detail = str(e) or repr(e.__cause__ or e.__context__)
            raise WitnessError(f"{what}: {self._url}: {type(e).__name__}: {detail}") from e

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        if self._executor is not None:
            raise WitnessError("witness already started")
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"witness-{self._member}"
        )
        try:
            # connecting (and importing tooz's driver) is no lease's business: a
            # loaded host may take longer than a renewal's bound for it
            await self._call("start", self._start_sync, max(self._op_timeout_s, START_TIMEOUT_S))
        except WitnessError:
            await self._shutdown_executor()
            raise

    def _start_sync(self, ticket: _Ticket) -> None:
        del ticket  # nothing to undo: a coordinator that connects late is unused
        import tooz.coordination
        from tooz.drivers import etcd3gw as tooz_etcd3gw

        if self._scheme in FILE_SCHEMES:
            coord = tooz.coordination.get_coordinator(self._url, self._member.encode())
        else:
            ttl = int(self._ttl_s)
            coord = tooz.coordination.get_coordinator(
                self._url,
                self._member.encode(),
                lock_timeout=ttl,
                # the membership lease tooz grants at start is unused (we join
                # no group): keep it short-lived
                membership_timeout=ttl,
            )
            assert isinstance(coord, tooz_etcd3gw.Etcd3Driver)
            # tooz parses its `timeout` option with int(): set the HTTP
            # timeout (connect, and each read) on the etcd3gw client itself
            # so one request stays well under the TTL; an operation makes
            # at most two requests
            coord.client.timeout = self._op_timeout_s / 2
        coord.start(start_heart=False)
        self._coord = coord

    async def stop(self) -> None:
        for name in self.held_names():
            # etcd unreachable: the lease expires on its own after the TTL
            with contextlib.suppress(WitnessError):
                await self.release(name)
        coord, self._coord = self._coord, None
        if coord is not None and self._executor is not None:
            with contextlib.suppress(WitnessError):
                await self._call("stop", lambda _a: coord.stop())
        await self._shutdown_executor()

    async def _shutdown_executor(self) -> None:
        ex, self._executor = self._executor, None
        if ex is not None:
            # never wait for a stuck call; the thread ends with it
            ex.shutdown(wait=False, cancel_futures=True)

    # -- locks ---------------------------------------------------------------

    def _lock_for(self, name: str) -> locking.Lock:
        assert self._coord is not None
        with self._mu:
            lock = self._locks.get(name)
            if lock is None:
                lock = self._coord.get_lock((LOCK_PREFIX + name).encode())
                self._locks[name] = lock
            return lock

    def _lock_path(self, name: str) -> str:
        return os.path.join(self._dir, LOCK_PREFIX + name)

    def _inode(self, name: str) -> tuple[int, int]:
        st = os.stat(self._lock_path(name))
        return (st.st_dev, st.st_ino)

    async def try_acquire(self, name: str) -> bool:
        _check_name(name)
        with self._mu:
            if name in self._held:
                return True
        return await self._call(f"acquire {name}", lambda a: self._acquire_sync(name, a))

    def _acquire_sync(self, name: str, ticket: _Ticket) -> bool:
        if self._coord is None:
            raise WitnessError("witness stopped")
        lock = self._lock_for(name)
        broken = 0  # the lease of a key we deleted: its holder stopped renewing
        if self._scheme in ETCD_SCHEMES:
            seen = self._observe_sync(name)
            if seen is not None:
                # held by another: a failed tooz attempt would only grant a
                # lease that lingers for a TTL, so try only once it is free
                # or we may break it
                if not self._stale(seen):
                    return False
                broken = self._break_sync(name, seen)
        # file: a non-blocking fcntl lock; etcd: grant a lease, then a txn
        # that puts the key only if it does not exist (tooz's Etcd3Lock)
        got = lock.acquire(blocking=False)
        if broken:
            # etcd holds a renewal of an expired lease until its revocation
            # loop comes round: revoke it, so the old holder hears at once
            # that its lease is gone (after the acquisition: off its path)
            with contextlib.suppress(*_backend_errors()):
                self._etcd().post(self._etcd().get_url("/kv/lease/revoke"), json={"ID": broken})
        if not got:
            return False
        inode = self._inode(name) if self._scheme in FILE_SCHEMES else None
        with self._mu:
            if not ticket.abandoned:
                self._held[name] = _Held(lock, inode)
                self._lost.discard(name)
                self._seen.pop(name, None)
                ticket.committed = True
                return True
        lock.release()
        return False

    async def refresh(self, name: str) -> Refresh:
        with self._mu:
            held = self._held.get(name)
        try:
            if held is None:
                return await self._call(f"probe {name}", lambda _a: self._probe_sync(name))
            return await self._call(f"renew {name}", lambda _a: self._refresh_sync(name, held))
        except WitnessError as e:
            return Refresh(RefreshOutcome.UNREACHABLE, detail=str(e))

    def _probe_sync(self, name: str) -> Refresh:
        """For a name we do not hold: does another member hold it?

        Only etcd can say without taking the lock (the key exists); testing an
        fcntl lock from this process could drop locks we hold on that file.
        """
        if self._scheme in ETCD_SCHEMES and self._other_holds(name):
            return Refresh(RefreshOutcome.TAKEN, detail="another member holds it")
        return Refresh(RefreshOutcome.NOT_HELD, detail="not held")

    def _other_holds(self, name: str) -> bool:
        # only called when our own lease is known gone, so any key is theirs
        from tooz.drivers import etcd3gw as tooz_etcd3gw

        assert isinstance(self._coord, tooz_etcd3gw.Etcd3Driver)
        return bool(self._coord.client.get(self._key(name)))

    def _refresh_sync(self, name: str, held: _Held) -> Refresh:
        if self._scheme in FILE_SCHEMES:
            # the kernel holds the lock for us; what can go wrong is the lock
            # file being replaced under us (a new inode is a new, free lock)
            try:
                now_inode = self._inode(name)
            except FileNotFoundError:
                now_inode = None
            if now_inode != held.inode:
                self._forget(name)
                return Refresh(RefreshOutcome.TAKEN, detail="lock file removed or replaced")
            return Refresh(RefreshOutcome.RENEWED, ttl_s=math.inf)
        # tooz's Etcd3Lock.heartbeat() calls lease.refresh() and ignores its
        # answer (-1 when the lease is gone), returning True even after the
        # lease expired and another member took the key; so refresh the
        # lock's lease ourselves and read the granted TTL
        from etcd3gw import lease as etcd3gw_lease

        lease = getattr(held.lock, "_lease", None)
        if not isinstance(lease, etcd3gw_lease.Lease):
            raise WitnessError("tooz's Etcd3Lock has no etcd3gw lease (tooz changed?)")
        ttl = lease.refresh()
        # the renewal counts only once the key's revision has moved on while
        # it is still ours: a waiting member counts our TTL from the revision
        # it saw last (see the module's docstring)
        if ttl > 0 and self._reput_sync(name, held.lock, lease.id):
            return Refresh(RefreshOutcome.RENEWED, ttl_s=float(ttl))
        # our lease (and the key it carried) is gone, or the key was deleted
        # by a member that saw our renewals stop: does anyone hold it now?
        self._forget(name)
        if self._other_holds(name):
            return Refresh(RefreshOutcome.TAKEN, detail="our lease expired; another holds it")
        return Refresh(RefreshOutcome.EXPIRED, detail="our lease expired at the witness")

    @staticmethod
    def _key(name: str) -> bytes:
        from tooz.drivers import etcd3gw as tooz_etcd3gw

        return tooz_etcd3gw.Etcd3Lock.LOCK_PREFIX + (LOCK_PREFIX + name).encode()

    def _key_b64(self, name: str) -> str:
        # transactions take keys base64-encoded, as the gateway has them; get() encodes
        return base64.b64encode(self._key(name)).decode("ascii")

    def _etcd(self) -> Any:
        from tooz.drivers import etcd3gw as tooz_etcd3gw

        assert isinstance(self._coord, tooz_etcd3gw.Etcd3Driver)
        return self._coord.client

    def _reput_sync(self, name: str, lock: locking.Lock, lease_id: int) -> bool:
        """Put our lock key again, under our lease, if it still holds our uuid."""
        ours = getattr(lock, "_uuid", None)
        if not isinstance(ours, str):
            raise WitnessError("tooz's Etcd3Lock has no uuid (tooz changed?)")
        key = self._key_b64(name)
        txn = {
            "compare": [{"key": key, "result": "EQUAL", "target": "VALUE", "value": ours}],
            "success": [{"request_put": {"key": key, "value": ours, "lease": lease_id}}],
        }
        return self._etcd().transaction(txn).get("succeeded", False) is True

    def _observe_sync(self, name: str) -> _Seen | None:
        """The lock key as etcd has it now (None if absent), noting a new revision."""
        kvs = self._etcd().get(self._key(name), metadata=True)
        now = time.monotonic()
        with self._mu:
            if not kvs:
                self._seen.pop(name, None)
                return None
            meta = kvs[0][1]
            revision, lease_id = int(meta["mod_revision"]), int(meta.get("lease", 0))
            seen = self._seen.get(name)
            if seen is None or (seen.mod_revision, seen.lease_id) != (revision, lease_id):
                seen = self._seen[name] = _Seen(revision, lease_id, now)
            return seen

    def _stale(self, seen: _Seen) -> bool:
        """The holder has not renewed for its whole TTL since we saw its last renewal."""
        if seen.lease_id == 0:
            return False  # not a tooz lock (no lease): never ours to break
        if seen.granted_ttl_s is None:
            # the holder's own TTL, which may be longer than ours
            if time.monotonic() - seen.since < self._ttl_s:
                return False
            answer = self._etcd().post(
                self._etcd().get_url("/kv/lease/timetolive"), json={"ID": seen.lease_id}
            )
            granted = int(answer.get("grantedTTL", 0) or 0)
            if granted <= 0:
                return False  # the lease is going: etcd deletes its key itself
            seen.granted_ttl_s = float(granted)
        return time.monotonic() - seen.since >= seen.granted_ttl_s + self._break_margin_s

    def _break_sync(self, name: str, seen: _Seen) -> int:
        """Delete the lock key if it is still at the revision we saw go stale; the
        lease it was under if we did, else 0."""
        key = self._key_b64(name)
        same = {"key": key, "result": "EQUAL", "target": "MOD", "mod_revision": seen.mod_revision}
        txn = {"compare": [same], "success": [{"request_delete_range": {"key": key}}]}
        deleted = self._etcd().transaction(txn).get("succeeded", False) is True
        with self._mu:
            self._seen.pop(name, None)
        return seen.lease_id if deleted else 0

    async def observe(self, name: str) -> None:
        _check_name(name)
        if self._scheme not in ETCD_SCHEMES:
            return
        with self._mu:
            if name in self._held:
                return
        await self._call(f"observe {name}", lambda _a: self._observe_sync(name))

    def _forget(self, name: str) -> None:
        with self._mu:
            if self._held.pop(name, None) is not None:
                self._lost.add(name)

    async def release(self, name: str) -> None:
        with self._mu:
            held = self._held.pop(name, None)
            self._lost.discard(name)
        if held is None:
            return
        # tooz's release is compare-and-delete on etcd (our uuid) and an
        # unlock of our own fcntl lock on file: never someone else's
        await self._call(f"release {name}", lambda _a: held.lock.release())

    # -- takeover marks: a tooz group per name, which outlives every lease
    # (a directory on file, a key without a lease on etcd) -----------------

    @staticmethod
    def _mark_prefix(name: str) -> bytes:
        return (TAKEOVER_PREFIX + name + ".by.").encode()

    def _marks_sync(self, name: str) -> list[bytes]:
        assert self._coord is not None
        prefix = self._mark_prefix(name)
        groups = (g.encode() if isinstance(g, str) else g for g in self._coord.get_groups().get())
        return sorted(g for g in groups if g.startswith(prefix))

    async def mark_taken_over(self, name: str, by: str) -> None:
        _check_name(name)
        _check_name(by)

        def mark(_t: _Ticket) -> None:
            from tooz import coordination

            assert self._coord is not None
            with contextlib.suppress(coordination.GroupAlreadyExist):
                self._coord.create_group(self._mark_prefix(name) + by.encode()).get()

        await self._call(f"mark {name} taken over", mark)

    async def taken_over(self, name: str) -> list[str]:
        _check_name(name)
        n = len(self._mark_prefix(name))
        marks = await self._call(f"look up {name}'s takeovers", lambda _t: self._marks_sync(name))
        return [m[n:].decode() for m in marks]

    async def clear_taken_over(self, name: str) -> None:
        _check_name(name)

        def clear(_t: _Ticket) -> None:
            from tooz import coordination

            assert self._coord is not None
            for group in self._marks_sync(name):
                with contextlib.suppress(coordination.GroupNotCreated):
                    self._coord.delete_group(group).get()

        await self._call(f"clear {name}'s takeovers", clear)


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise WitnessError(f"bad protection name for a witness lock: {name!r}")


async def open_witness(url: str, member: str, ttl_s: float = 3.0) -> Witness:
    """A started witness for `url`, or WitnessError (unknown scheme, unreachable)."""
    try:
        import etcd3gw  # noqa: F401
        import tooz  # noqa: F401
    except ImportError as exc:
        raise WitnessError(f"a witness needs tooz and etcd3gw installed: {exc}") from None
    w = ToozWitness(url, member, ttl_s)
    await w.start()
    return w
