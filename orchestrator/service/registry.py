"""remusd's registry: the protections it owns and its event log, in one SQLite file.

One :class:`Registry` holds one connection for the life of the service and is
used from the asyncio thread only: every call is a single short statement or
transaction on a local file (well under a millisecond), so calling it inline
from a coroutine is cheaper than any hop to a thread pool would be.

Crash semantics. Every write method is exactly one transaction
(``BEGIN IMMEDIATE`` ... ``COMMIT``): either all of it is in the file or none
of it is. The database runs in WAL mode with ``synchronous=NORMAL``:

* a *process* crash (``kill -9``, OOM killer, a segfault in an extension)
  loses nothing that was committed. A commit has been written into the WAL
  file (the OS page cache) before the method returns; the next open replays
  the WAL. A transaction cut short by the crash was never committed and is
  simply absent, never half-applied.
* a *machine* crash or power loss may lose the most recent commits (the WAL
  is fsynced at checkpoints, not at every commit) but still leaves a
  consistent database as of some earlier commit. That trade is deliberate:
  after a host crash every protection on it is re-examined anyway, and an
  fsync per checkpoint-state update would cost milliseconds on the event loop.
* the ``-wal`` and ``-shm`` files next to the database are part of it: copy
  or delete the three together, never the main file alone.

Readers in other processes (``remusctl``, a backup, a test) can open the file
at any time: in WAL mode they see the last committed state and neither block
nor are blocked by remusd's writes. A second *writer* waits for up to the
busy timeout and then gets ``sqlite3.OperationalError: database is locked``.

Schema versions live in ``PRAGMA user_version``; :data:`MIGRATIONS` entry ``i``
takes the schema from version ``i`` to ``i + 1``, each in its own transaction.
A database written by a newer remusd is refused (:class:`SchemaTooNew`)
rather than used with a schema this code does not understand.
"""

from __future__ import annotations

import builtins
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, get_args

from ..protection.spec import ProtectionSpec, SpecError

log = logging.getLogger(__name__)

Role = Literal["primary", "secondary"]
Mode = Literal["remus", "colo"]
Desired = Literal["protected", "paused", "unprotected"]

ROLES: Final[tuple[str, ...]] = get_args(Role)
MODES: Final[tuple[str, ...]] = get_args(Mode)
DESIRED: Final[tuple[str, ...]] = get_args(Desired)

# One tuple of statements per schema version. Never edit a released entry:
# databases in the field are already at that version and would never see the
# change. Append a new entry instead.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # version 1
    (
        """
        CREATE TABLE protections (
            name        TEXT PRIMARY KEY NOT NULL CHECK (name <> ''),
            role        TEXT NOT NULL CHECK (role IN ('primary', 'secondary')),
            peer        TEXT NOT NULL,
            mode        TEXT NOT NULL CHECK (mode IN ('remus', 'colo')),
            settings    TEXT NOT NULL DEFAULT '{}',
            desired     TEXT NOT NULL
                        CHECK (desired IN ('protected', 'paused', 'unprotected')),
            last_state  TEXT NOT NULL,
            reason      TEXT NOT NULL DEFAULT '',
            checkpoints INTEGER NOT NULL DEFAULT 0,
            created     REAL NOT NULL,
            updated     REAL NOT NULL,
            generation  INTEGER NOT NULL DEFAULT 1
        ) WITHOUT ROWID
        """,
        # AUTOINCREMENT, not a plain rowid: ids are the clients' cursors, and a
        # plain rowid would hand a pruned (or the last deleted) id out again.
        """
        CREATE TABLE events (
            id      INTEGER PRIMARY KEY AUTOINCREMENT,
            ts      REAL NOT NULL,
            name    TEXT,
            kind    TEXT NOT NULL CHECK (kind <> ''),
            message TEXT NOT NULL,
            data    TEXT
        )
        """,
        "CREATE INDEX events_by_name ON events (name, id)",
    ),
    # version 2: a primary's settings become its ProtectionSpec document (the
    # worker's --spec, what resume re-spawns from): name and peer in it, ms for
    # every duration, and no derived "disk" (the spec says whether it replicates)
    (
        "ALTER TABLE protections RENAME COLUMN settings TO spec",
        """
        UPDATE protections
        SET spec = json_remove(
            json_set(spec, '$.name', name, '$.peer', peer, '$.mode', mode), '$.disk')
        WHERE role = 'primary'
        """,
        """
        UPDATE protections
        SET spec = json_remove(
            json_set(spec, '$.checkpoint_max_interval_ms',
                     CAST(round(json_extract(spec, '$.checkpoint_max_interval_s') * 1000)
                          AS INTEGER)),
            '$.checkpoint_max_interval_s')
        WHERE role = 'primary' AND json_extract(spec, '$.checkpoint_max_interval_s') IS NOT NULL
        """,
        # a secondary learns its settings from the primary's HELLO: it has none here
        "UPDATE protections SET spec = '{}' WHERE role = 'secondary'",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


class RegistryError(Exception):
    """Base of the registry's own errors (SQLite's I/O errors are ``sqlite3.Error``)."""


class NotFound(RegistryError, KeyError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(name)

    def __str__(self) -> str:  # KeyError would quote the name
        return f"no protection named {self.name!r}"


class AlreadyExists(RegistryError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"a protection named {name!r} already exists")


class Conflict(RegistryError):
    """An optimistic update lost: the record changed since the caller read it."""

    def __init__(self, name: str, expected: int, actual: int) -> None:
        self.name, self.expected, self.actual = name, expected, actual
        super().__init__(
            f"protection {name!r} is at generation {actual}, not {expected}: read it again"
        )


class SchemaTooNew(RegistryError):
    def __init__(self, path: Path, found: int) -> None:
        self.path, self.found = path, found
        super().__init__(
            f"{path}: registry schema version {found} is newer than this remusd understands"
            f" ({SCHEMA_VERSION}); run the newer remusd or restore an older database"
        )


@dataclass(frozen=True)
class ProtectionRecord:
    name: str
    role: Role
    peer: str
    mode: Mode
    # a primary's settings, as its worker was started with them; None for a
    # secondary (it learns them from the primary) or a document that no longer
    # reads as one (logged; such a protection cannot be re-spawned)
    spec: ProtectionSpec | None
    desired: Desired
    last_state: str
    reason: str
    checkpoints: int
    created: float
    updated: float
    generation: int


@dataclass(frozen=True)
class EventRecord:
    id: int
    ts: float
    name: str | None
    kind: str
    message: str
    data: dict[str, Any] | None


_PROTECTION_COLUMNS: Final = (
    "name, role, peer, mode, spec, desired, last_state, reason, checkpoints,"
    " created, updated, generation"
)
_EVENT_COLUMNS: Final = "id, ts, name, kind, message, data"


def _dumps(value: dict[str, Any]) -> str:
    # allow_nan=False: the HTTP API serves these documents to clients that
    # speak strict JSON; a NaN should fail at the writer, not at every reader.
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _check(what: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")


def _spec(name: str, text: str) -> ProtectionSpec | None:
    if text in ("", "{}"):
        return None
    try:
        return ProtectionSpec.from_json(text)
    except SpecError as exc:
        log.warning("protection %s: its stored settings do not read: %s", name, exc)
        return None


def _protection(row: sqlite3.Row) -> ProtectionRecord:
    # the columns are the record's fields; only the spec is read from its document
    return ProtectionRecord(**{**dict(row), "spec": _spec(row["name"], row["spec"])})


def _event(row: sqlite3.Row) -> EventRecord:
    data = row["data"]
    return EventRecord(**{**dict(row), "data": None if data is None else json.loads(data)})


class Registry:
    """The protections and the event log; see the module docstring for crash semantics."""

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_ms: int = 5000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        # isolation_level=None: the module's implicit BEGINs would make
        # transaction boundaries depend on statement types; ours are explicit.
        self._db = sqlite3.connect(self.path, timeout=busy_timeout_ms / 1000, isolation_level=None)
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                # e.g. a filesystem without shared memory: still transactional,
                # but readers now block the writer; worth a line, not a refusal
                log.warning("%s: journal mode is %s, not WAL", self.path, mode)
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    # -- plumbing ------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so a busy database fails at
        # BEGIN (after the busy timeout) instead of half-way through the work.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            # some errors (a full disk, I/O) make SQLite roll back on its own;
            # a second ROLLBACK would then replace the real error with its own
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _migrate(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(self.path, version)
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self._write() as db:
                # re-read under the lock: another process may have migrated
                # between our first look and BEGIN IMMEDIATE
                now = int(db.execute("PRAGMA user_version").fetchone()[0])
                if now >= target:
                    continue
                for statement in MIGRATIONS[target - 1]:
                    db.execute(statement)
                # user_version lives in the database header, so it commits or
                # rolls back with the statements above
                db.execute(f"PRAGMA user_version = {target}")
            log.info("%s: registry schema migrated to version %d", self.path, target)

    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        """Close the connection (idempotent); the last one out folds the WAL back in."""
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- protections -------------------------------------------------------------------

    def add_protection(
        self,
        name: str,
        role: Role,
        peer: str,
        mode: Mode = "remus",
        spec: ProtectionSpec | None = None,
        desired: Desired = "protected",
        last_state: str = "starting",
        reason: str = "",
    ) -> ProtectionRecord:
        if not name:
            raise ValueError("a protection needs a name")
        if spec is not None and (spec.name, spec.mode.value) != (name, mode):
            # the row's columns and its document must not tell two stories
            raise ValueError(f"spec of {spec.name!r} ({spec.mode.value}) for {name!r} ({mode})")
        spec_json = "{}" if spec is None else _dumps(spec.to_dict())
        _check("role", role, ROLES)
        _check("mode", mode, MODES)
        _check("desired", desired, DESIRED)
        now = self._clock()
        try:
            with self._write() as db:
                row = db.execute(
                    f"INSERT INTO protections ({_PROTECTION_COLUMNS})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, 1)"
                    f" RETURNING {_PROTECTION_COLUMNS}",
                    (name, role, peer, mode, spec_json, desired, last_state, reason, now, now),
                ).fetchone()
        except sqlite3.IntegrityError as exc:
            # the CHECKs are validated above, so a constraint here is the key
            if "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc):
                raise AlreadyExists(name) from None
            raise
        return _protection(row)

    def get(self, name: str) -> ProtectionRecord:
        row = self._db.execute(
            f"SELECT {_PROTECTION_COLUMNS} FROM protections WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            raise NotFound(name)
        return _protection(row)

    def list(self) -> list[ProtectionRecord]:
        rows = self._db.execute(
            f"SELECT {_PROTECTION_COLUMNS} FROM protections ORDER BY name"
        ).fetchall()
        return [_protection(r) for r in rows]

    def _update(
        self, name: str, assignments: str, params: tuple[Any, ...], expected: int | None
    ) -> ProtectionRecord:
        with self._write() as db:
            row = db.execute(
                f"UPDATE protections SET {assignments}, updated = ?, generation = generation + 1"
                " WHERE name = ? AND (? IS NULL OR generation = ?)"
                f" RETURNING {_PROTECTION_COLUMNS}",
                (*params, self._clock(), name, expected, expected),
            ).fetchone()
            if row is None:
                current = db.execute(
                    "SELECT generation FROM protections WHERE name = ?", (name,)
                ).fetchone()
                if current is None:
                    raise NotFound(name)
                assert expected is not None  # only a generation mismatch gets here
                raise Conflict(name, expected, int(current[0]))
        return _protection(row)

    def update_state(
        self,
        name: str,
        last_state: str,
        reason: str,
        checkpoints: int | None = None,
        *,
        expected_generation: int | None = None,
    ) -> ProtectionRecord:
        """Record what the protection is doing; ``checkpoints=None`` keeps the count."""
        return self._update(
            name,
            "last_state = ?, reason = ?, checkpoints = COALESCE(?, checkpoints)",
            (last_state, reason, checkpoints),
            expected_generation,
        )

    def set_desired(
        self, name: str, desired: Desired, *, expected_generation: int | None = None
    ) -> ProtectionRecord:
        _check("desired", desired, DESIRED)
        return self._update(name, "desired = ?", (desired,), expected_generation)

    def remove(self, name: str) -> None:
        """Forget a protection (its events stay in the log); :class:`NotFound` if unknown."""
        with self._write() as db:
            if db.execute("DELETE FROM protections WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(name)

    # -- events --------------------------------------------------------------------------

    def append_event(
        self,
        kind: str,
        message: str,
        name: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> EventRecord:
        if not kind:
            raise ValueError("an event needs a kind")
        with self._write() as db:
            row = db.execute(
                "INSERT INTO events (ts, name, kind, message, data) VALUES (?, ?, ?, ?, ?)"
                f" RETURNING {_EVENT_COLUMNS}",
                (self._clock(), name, kind, message, None if data is None else _dumps(data)),
            ).fetchone()
        return _event(row)

    def events_since(
        self, after_id: int, limit: int = 100, name: str | None = None
    ) -> builtins.list[EventRecord]:  # plain `list` is the method above
        """Events with ``id > after_id``, oldest first; page on with the last one's id."""
        if limit < 0:
            raise ValueError("limit must not be negative")
        # one query per case, so that a name's events come by its index
        where, params = ("id > ?", ()) if name is None else ("name = ? AND id > ?", (name,))
        rows = self._db.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE {where} ORDER BY id LIMIT ?",
            (*params, after_id, limit),
        ).fetchall()
        return [_event(r) for r in rows]

    def latest_event_id(self) -> int:
        """The newest event's id (0 if none ever): a cursor for "from now on"."""
        # sqlite_sequence remembers the highest id even once pruned or deleted
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        return 0 if row is None else int(row[0])

    def prune_events(self, keep: int) -> int:
        """Delete all but the newest ``keep`` events; returns how many went."""
        if keep < 0:
            raise ValueError("keep must not be negative")
        with self._write() as db:
            return db.execute(
                "DELETE FROM events WHERE id <="
                " (SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (keep,),
            ).rowcount
