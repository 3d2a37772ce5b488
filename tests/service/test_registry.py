"""The registry: CRUD, the event log, schema versions, and what a crash leaves behind."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import orchestrator
from orchestrator.protection.spec import Mode, Netbuf, ProtectionSpec
from orchestrator.service import registry as registry_mod
from orchestrator.service.registry import (
    SCHEMA_VERSION,
    AlreadyExists,
    Conflict,
    NotFound,
    Registry,
    SchemaTooNew,
)

ROOT = str(Path(orchestrator.__file__).resolve().parent.parent)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "registry.sqlite"


@pytest.fixture
def reg(db: Path) -> Iterator[Registry]:
    r = Registry(db, clock=Clock())
    yield r
    r.close()


def child(code: str, *args: str, **kw: object) -> subprocess.Popen[str]:
    proc: subprocess.Popen[str] = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env={**os.environ, "PYTHONPATH": ROOT},
        text=True,
        **kw,  # type: ignore[call-overload]
    )
    return proc


# -- protections ------------------------------------------------------------------------


def test_add_get_list(reg: Registry) -> None:
    spec = ProtectionSpec("vm1", "hostB:8002", interval_ms=100, netbuf=Netbuf.PLUG)
    rec = reg.add_protection("vm1", role="primary", peer="hostB:8002", spec=spec)
    assert rec.name == "vm1" and rec.role == "primary" and rec.peer == "hostB:8002"
    assert rec.mode == "remus" and rec.desired == "protected"
    assert rec.last_state == "starting" and rec.reason == "" and rec.checkpoints == 0
    assert rec.spec == spec
    assert rec.generation == 1 and rec.created == rec.updated
    assert reg.get("vm1") == rec
    sec = reg.add_protection("a-secondary", role="secondary", peer="hostA", mode="colo")
    assert sec.spec is None  # a secondary learns its settings from the primary
    assert [r.name for r in reg.list()] == ["a-secondary", "vm1"]


def test_the_spec_is_one_document_and_tells_the_columns_story(reg: Registry, db: Path) -> None:
    spec = ProtectionSpec("vm1", "b", mode=Mode.COLO, checkpoint_max_interval_ms=1500)
    reg.add_protection("vm1", role="primary", peer="b", mode="colo", spec=spec)
    raw = sqlite3.connect(db)
    (doc,) = raw.execute("SELECT spec FROM protections WHERE name = 'vm1'").fetchone()
    raw.close()
    assert ProtectionSpec.from_json(doc) == spec
    with pytest.raises(ValueError, match="spec of 'vm1'"):
        reg.add_protection("vm2", role="primary", peer="b", spec=spec)
    with pytest.raises(ValueError, match="remus"):
        reg.add_protection("vm1x", role="primary", peer="b", mode="remus", spec=spec)


def test_unreadable_spec_reads_as_none(reg: Registry, db: Path) -> None:
    reg.add_protection("vm1", role="primary", peer="b", spec=ProtectionSpec("vm1", "b"))
    raw = sqlite3.connect(db)
    raw.execute("""UPDATE protections SET spec = '{"name": "vm1", "colour": 1}'""")
    raw.commit()
    raw.close()
    assert reg.get("vm1").spec is None  # listed still, never a crash of every GET


def test_already_exists_and_not_found(reg: Registry) -> None:
    reg.add_protection("vm1", role="primary", peer="b")
    with pytest.raises(AlreadyExists, match="vm1"):
        reg.add_protection("vm1", role="secondary", peer="c")
    assert reg.get("vm1").role == "primary"  # the failed insert changed nothing
    for call in (
        lambda: reg.get("nope"),
        lambda: reg.update_state("nope", "stopped", ""),
        lambda: reg.set_desired("nope", "paused"),
        lambda: reg.remove("nope"),
    ):
        with pytest.raises(NotFound, match="no protection named 'nope'"):
            call()


def test_invalid_values_refused(reg: Registry) -> None:
    with pytest.raises(ValueError, match="role"):
        reg.add_protection("vm1", role="tertiary", peer="b")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        reg.add_protection("vm1", role="primary", peer="b", mode="xen")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name"):
        reg.add_protection("", role="primary", peer="b")
    with pytest.raises(ValueError):  # strict JSON: NaN fails at the writer
        nan = ProtectionSpec("vm1", "b", compare_timeout_ms=float("nan"))
        reg.add_protection("vm1", role="primary", peer="b", spec=nan)
    assert reg.list() == []
    reg.add_protection("vm1", role="primary", peer="b")
    with pytest.raises(ValueError, match="desired"):
        reg.set_desired("vm1", "maybe")  # type: ignore[arg-type]


def test_update_state_and_desired(reg: Registry) -> None:
    first = reg.add_protection("vm1", role="primary", peer="b")
    rec = reg.update_state("vm1", "replicating", "", checkpoints=7)
    assert (rec.last_state, rec.checkpoints, rec.generation) == ("replicating", 7, 2)
    assert rec.updated > first.updated and rec.created == first.created
    rec = reg.update_state("vm1", "error", "peer went away")  # None keeps the count
    assert (rec.last_state, rec.reason, rec.checkpoints) == ("error", "peer went away", 7)
    rec = reg.set_desired("vm1", "paused")
    assert rec.desired == "paused" and rec.last_state == "error" and rec.generation == 4
    assert reg.get("vm1") == rec


def test_optimistic_update(reg: Registry) -> None:
    rec = reg.add_protection("vm1", role="primary", peer="b")
    reg.update_state("vm1", "replicating", "", expected_generation=rec.generation)
    with pytest.raises(Conflict) as info:
        reg.set_desired("vm1", "paused", expected_generation=rec.generation)
    assert (info.value.expected, info.value.actual) == (1, 2)
    assert reg.get("vm1").desired == "protected"


def test_remove_keeps_events(reg: Registry) -> None:
    reg.add_protection("vm1", role="primary", peer="b")
    reg.append_event("protected", "protecting", name="vm1")
    reg.remove("vm1")
    with pytest.raises(NotFound):
        reg.get("vm1")
    assert [e.kind for e in reg.events_since(0, name="vm1")] == ["protected"]
    reg.add_protection("vm1", role="secondary", peer="a")  # the name is free again
    assert reg.get("vm1").generation == 1


# -- events -----------------------------------------------------------------------------


def test_events_order_and_paging(reg: Registry) -> None:
    assert reg.latest_event_id() == 0 and reg.events_since(0) == []
    first = reg.append_event("protected", "go", name="vm1", data={"interval_ms": 200})
    assert first.id >= 1 and first.kind == "protected" and first.data == {"interval_ms": 200}
    for i in range(24):
        reg.append_event("checkpoint-lag", f"lag {i}", name="vm1" if i % 2 else "vm2")
    reg.append_event("restart", "remusd started")  # no protection: name is None
    everything = reg.events_since(0, limit=1000)
    assert len(everything) == 26 and everything[0] == first
    assert [e.id for e in everything] == sorted({e.id for e in everything})
    assert [e.ts for e in everything] == sorted(e.ts for e in everything)
    assert everything[-1].name is None and everything[-1].data is None
    assert reg.latest_event_id() == everything[-1].id

    pages, cursor = [], 0
    while page := reg.events_since(cursor, limit=10):
        pages.append(page)
        cursor = page[-1].id
    assert [len(p) for p in pages] == [10, 10, 6]
    assert [e for p in pages for e in p] == everything

    vm1 = reg.events_since(0, name="vm1")
    assert [e.message for e in vm1] == ["go"] + [f"lag {i}" for i in range(1, 24, 2)]
    assert reg.events_since(vm1[3].id, limit=2, name="vm1") == vm1[4:6]
    assert reg.events_since(0, limit=0) == []


def test_prune_keeps_newest_and_never_reuses_ids(reg: Registry) -> None:
    ids = [reg.append_event("checkpoint-lag", str(i)).id for i in range(10)]
    assert reg.prune_events(keep=20) == 0
    assert reg.prune_events(keep=3) == 7
    assert [e.id for e in reg.events_since(0)] == ids[-3:]
    assert reg.prune_events(keep=0) == 3 and reg.events_since(0) == []
    assert reg.latest_event_id() == ids[-1]
    # a client's cursor must never match a different, newer event
    assert reg.append_event("error", "after pruning").id > ids[-1]


# -- files, versions, processes -----------------------------------------------------------


def test_reopen_keeps_everything(db: Path) -> None:
    with Registry(db) as reg:
        spec = ProtectionSpec("vm1", "b", no_netbuf=True, unsafe=True)
        reg.add_protection("vm1", role="primary", peer="b", spec=spec)
        reg.update_state("vm1", "replicating", "", checkpoints=42)
        reg.set_desired("vm1", "paused")
        events = [reg.append_event("failover", f"e{i}", name="vm1") for i in range(3)]
        records = reg.list()
    with Registry(db) as again:
        assert again.list() == records
        assert again.events_since(0) == events
        assert again.schema_version() == SCHEMA_VERSION
        assert again.append_event("restart", "again").id == events[-1].id + 1
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()


def test_newer_schema_refused(db: Path) -> None:
    Registry(db).close()
    raw = sqlite3.connect(db)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(SchemaTooNew, match=f"version {SCHEMA_VERSION + 1} is newer"):
        Registry(db)


def test_migration_to_a_later_version(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Registry(db) as reg:
        reg.add_protection("vm1", role="primary", peer="b")
    later = (*registry_mod.MIGRATIONS, ("ALTER TABLE protections ADD COLUMN colo_port INTEGER",))
    monkeypatch.setattr(registry_mod, "MIGRATIONS", later)
    monkeypatch.setattr(registry_mod, "SCHEMA_VERSION", len(later))
    with Registry(db) as reg:
        assert reg.schema_version() == len(later)
        assert reg.get("vm1").peer == "b"


def test_version_1_settings_become_specs(db: Path) -> None:
    """A registry written before ProtectionSpec: its settings rows are upgraded in place,
    seconds to ms, the derived "disk" dropped, and resume can re-spawn from them."""
    raw = sqlite3.connect(db, isolation_level=None)
    for statement in registry_mod.MIGRATIONS[0]:
        raw.execute(statement)
    raw.execute("PRAGMA user_version = 1")
    row = (
        "INSERT INTO protections VALUES (?, ?, ?, ?, ?, 'protected', 'replicating', '', 0, 1, 1, 1)"
    )
    old_remus = '{"mode":"remus","interval_ms":50,"netbuf":"auto","no_netbuf":false,'
    old_remus += '"no_disk":true,"unsafe":true,"disk":"not replicated"}'
    old_colo = '{"mode":"colo","interval_ms":200,"netbuf":"auto","no_netbuf":false,'
    old_colo += '"no_disk":false,"unsafe":false,"disk":"not replicated",'
    old_colo += '"checkpoint_max_interval_s":0.5,"compare_timeout_ms":200.0}'
    raw.execute(row, ("r", "primary", "hostB:8002", "remus", old_remus))
    raw.execute(row, ("c", "primary", "hostB:8002", "colo", old_colo))
    raw.execute(row, ("s", "secondary", "hostA", "remus", "{}"))
    raw.close()
    with Registry(db) as reg:
        assert reg.schema_version() == SCHEMA_VERSION
        r, c, s = reg.get("r").spec, reg.get("c").spec, reg.get("s").spec
    assert r == ProtectionSpec("r", "hostB:8002", interval_ms=50, no_disk=True, unsafe=True)
    assert c == ProtectionSpec(
        "c", "hostB:8002", Mode.COLO, checkpoint_max_interval_ms=500, compare_timeout_ms=200.0
    )
    assert s is None


def test_failed_migration_rolls_back(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Registry(db).close()
    broken = (
        *registry_mod.MIGRATIONS,
        ("CREATE TABLE extra (x INTEGER)", "THIS IS NOT SQL"),
    )
    monkeypatch.setattr(registry_mod, "MIGRATIONS", broken)
    monkeypatch.setattr(registry_mod, "SCHEMA_VERSION", len(broken))
    with pytest.raises(sqlite3.OperationalError):
        Registry(db)
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == len(broken) - 1
    tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "extra" not in tables
    raw.close()


def test_second_writer_gives_up_after_busy_timeout(db: Path) -> None:
    with Registry(db) as reg, Registry(db, busy_timeout_ms=100) as other:
        reg.add_protection("vm1", role="primary", peer="b")
        raw = sqlite3.connect(db, isolation_level=None)
        raw.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.update_state("vm1", "stopped", "")
            assert reg.get("vm1").last_state == "starting"  # reading is never blocked
        finally:
            raw.execute("ROLLBACK")
            raw.close()
        assert other.update_state("vm1", "stopped", "").last_state == "stopped"


def test_second_writer_waits_for_a_lock_released_within_busy_timeout(db: Path) -> None:
    # the busy timeout is a wait, not an instant failure: a lock let go while
    # the writer waits lets the write through
    with Registry(db) as reg, Registry(db, busy_timeout_ms=60_000) as other:
        reg.add_protection("vm1", role="primary", peer="b")
        raw = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        raw.execute("BEGIN IMMEDIATE")

        # let go a moment after the writer has begun waiting (were it not to
        # wait, it would fail with "locked" at once, as the test above shows)
        def let_go() -> None:
            time.sleep(0.3)
            raw.execute("ROLLBACK")

        release = threading.Thread(target=let_go)
        release.start()
        try:
            assert other.update_state("vm1", "stopped", "").last_state == "stopped"
        finally:
            release.join()
            raw.close()


WRITER = """
import sys
from pathlib import Path
from orchestrator.service.registry import Registry

reg = Registry(Path(sys.argv[1]))
reg.add_protection("vm1", role="primary", peer="hostB")
i = 0
while True:
    i += 1
    reg.update_state("vm1", "replicating", f"i={i}", checkpoints=i)
    reg.append_event("checkpoint", str(i), name="vm1", data={"i": i, "pad": "x" * 500})
    print(i, flush=True)
"""


def test_kill_9_mid_loop_leaves_a_consistent_database(db: Path) -> None:
    proc = child(WRITER, str(db), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    confirmed = 0
    try:
        for line in proc.stdout:
            confirmed = int(line)
            if confirmed >= 400:
                break
        assert confirmed >= 400, "the writer died on its own"
        proc.send_signal(signal.SIGKILL)  # while it goes on writing
        proc.wait(timeout=10)
        for line in proc.stdout:  # whatever it printed before the kill landed
            confirmed = int(line)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert db.with_name(db.name + "-wal").exists()  # the kill left a WAL to replay

    with Registry(db) as reg:
        assert reg._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rec = reg.get("vm1")
        events = reg.events_since(0, limit=100_000)
    numbers = [int(e.message) for e in events]
    # nothing confirmed is lost, nothing is missing in between, nothing is half-written
    assert numbers == list(range(1, len(numbers) + 1))
    assert len(numbers) >= confirmed
    assert all(e.data == {"i": int(e.message), "pad": "x" * 500} for e in events)
    # the kill may fall between a loop's two transactions, never inside one
    assert rec.checkpoints in (len(numbers), len(numbers) + 1)
    assert rec.reason == f"i={rec.checkpoints}" and rec.generation == rec.checkpoints + 1


READER = """
import sys, time
from pathlib import Path
from orchestrator.service.registry import Registry

reg = Registry(Path(sys.argv[1]))
print("ready", flush=True)
for target in sys.stdin:
    deadline = time.monotonic() + 10
    while True:
        events = reg.events_since(0, limit=100_000)
        ticks = [int(e.message) for e in events]
        assert ticks == list(range(1, len(ticks) + 1)), ticks
        if len(ticks) >= int(target) or time.monotonic() > deadline:
            break
    print(len(ticks), reg.get("vm1").checkpoints, flush=True)
"""


def test_reader_process_while_writing(db: Path) -> None:
    reg = Registry(db)
    reg.add_protection("vm1", role="primary", peer="b")
    proc = child(READER, str(db), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == "ready\n"
        written = 0

        def ask(target: int) -> tuple[int, int]:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(f"{target}\n")
            proc.stdin.flush()
            seen, checkpoints = proc.stdout.readline().split()
            return int(seen), int(checkpoints)

        for _ in range(5):
            for _ in range(20):  # the writer keeps its connection and never closes
                written += 1
                reg.update_state("vm1", "replicating", "", checkpoints=written)
                reg.append_event("tick", str(written), name="vm1")
            assert ask(written) == (written, written)

        # a write transaction held open: the reader neither waits nor sees it
        raw = sqlite3.connect(db, isolation_level=None)
        raw.execute("BEGIN IMMEDIATE")
        raw.execute(
            "INSERT INTO events (ts, name, kind, message) VALUES (0, 'vm1', 'tick', ?)",
            (str(written + 1),),
        )
        assert ask(written) == (written, written)  # a blocked reader would hang here
        raw.execute("COMMIT")
        raw.close()
        assert ask(written + 1) == (written + 1, written)
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
        reg.close()
