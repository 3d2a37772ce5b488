"""What a protection's worker publishes: the schema of its status file.

Written by the worker (``protection/runner.py``) every 0.2 s and at its end,
read by `remusctl status`, remusd's supervisor, its API and its metrics. One
typed document, so that a reader asks for ``status.pause_ms_p50`` rather
than for a key it spelled itself; the file is JSON so that an administrator
can read it too. Durations carry their unit in their name (ms or s) and
nothing is rescaled by looking at a name.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, TypeVar

from .spec import Mode

# checkpoint pause histogram bounds, seconds (Prometheus `le` values)
PAUSE_BUCKETS: Final[tuple[float, ...]] = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0
)  # fmt: skip


class Role(StrEnum):
    PRIMARY = "primary"
    SECONDARY = "secondary"


class State(StrEnum):
    STARTING = "starting"
    REPLICATING = "replicating"
    FAILING_OVER = "failing-over"
    FAILED_OVER = "failed-over"  # only once the guest runs here
    # the primary could not be sure to hold the lease: its guest is paused and its
    # held output dropped (destroyed once another holder is seen)
    FENCED = "fenced"
    # the primary lost its secondary while holding the lease: the guest runs on
    # here, and nothing replicates it (the reason says why)
    UNPROTECTED = "unprotected"
    # a planned switchover: the peer runs the guest from our last checkpoint, our
    # copy is destroyed, and this host is to become its secondary
    SWITCHED_OVER = "switched-over"
    STOPPED = "stopped"


@dataclass
class PauseHistogram:
    """Counts per bucket, not cumulative: up to each :data:`PAUSE_BUCKETS` bound (then
    +Inf) from the one before; and their sum."""

    le: tuple[float, ...] = PAUSE_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(PAUSE_BUCKETS) + 1))
    sum: float = 0.0


@dataclass
class ColoFigures:
    """COLO's own figures; None where a role does not measure it."""

    # the primary's checkpoints by what asked for them
    checkpoints_by_divergence: int | None = None
    checkpoints_by_held_output: int | None = None
    checkpoints_by_timer: int | None = None
    memory_verified: int | None = None  # checkpoints whose memory digests matched
    # the primary's output comparison (devices/colo_net.py)
    compared_packets: int | None = None
    matched_bytes: int | None = None
    mismatches: int | None = None
    released_at_once: int | None = None
    released_at_checkpoint: int | None = None
    oldest_held_ms: float | None = None
    compare_wait_ms_p50: float | None = None
    compare_wait_ms_p99: float | None = None
    mirrored_packets: int | None = None
    mirrored_bytes: int | None = None
    # the secondary's feeding of its copy
    injected_packets: int | None = None
    reported_bytes: int | None = None
    dropped_unknown: int | None = None
    inject_errors: int | None = None
    output_filtered: bool | None = None


@dataclass
class ProtectionStatus:
    name: str
    role: Role
    mode: Mode = Mode.REMUS
    pid: int = field(default_factory=os.getpid)
    state: State = State.STARTING
    reason: str = ""
    peer: str = ""
    # the replication link: tls (mutual, pinned peers), plain (--insecure-link), stdio
    # (-s CMD: the command's own), ssh (--ssh), none (-b)
    link: str = ""
    checkpoints: int = 0
    last_checkpoint_at: float | None = None  # wall clock, of the last consistent one
    updated: float = 0.0  # wall clock, of this document
    last_heartbeat_age_s: float | None = None  # secondary: how long since the primary spoke
    # the guest's pause per checkpoint and the ACK's lag, medians of the recent ones
    pause_ms_p50: float | None = None
    ack_lag_ms_p50: float | None = None
    pause_histogram: PauseHistogram = field(default_factory=PauseHistogram)
    # pages sent per checkpoint after the first (which carries the whole memory)
    dirty_pages_p50: float | None = None
    dirty_bytes_p50: float | None = None
    # epochs (suspend to suspend), and those that took over 1.5 times the interval
    epochs: int = 0
    late_epochs: int = 0
    # output buffering and disk
    netbuf: str = ""
    held_packets: int | None = None
    held_bytes: int | None = None
    service_address: str | None = None  # the proxy's address: clients must come through it
    stream_bytes: int | None = None  # -b: bytes thrown away
    disk: str = "not replicated"
    disk_blocks_p50: float | None = None
    colo: ColoFigures | None = None
    # the lease (issue 22): None without a witness
    witness: str = ""
    lease: str | None = None  # LeaseState's value: held, uncertain, expired, lost...
    lease_valid_for_s: float | None = None
    # a secondary that took over by a switchover: the ProtectionSpec document (JSON)
    # its host protects the guest back with, to the old primary ("" otherwise)
    protect_back: str = ""
    # a primary that switched over: its guest's pause, the last suspend to the
    # secondary's word that the guest runs there
    switchover_pause_ms: float | None = None

    @property
    def last_checkpoint_age_s(self) -> float | None:
        if self.last_checkpoint_at is None:
            return None
        return max(0.0, time.time() - self.last_checkpoint_at)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["role"], d["mode"], d["state"] = self.role.value, self.mode.value, self.state.value
        d["pause_histogram"]["le"] = list(self.pause_histogram.le)
        return d

    def write(self, path: Path) -> None:
        """Atomically: a reader sees the old document or the new one, whole."""
        self.updated = time.time()
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProtectionStatus:
        d = dict(d)
        d["role"], d["mode"], d["state"] = Role(d["role"]), Mode(d["mode"]), State(d["state"])
        h = d.get("pause_histogram") or {}
        d["pause_histogram"] = PauseHistogram(
            tuple(h.get("le", PAUSE_BUCKETS)),
            list(h.get("counts", [0] * (len(PAUSE_BUCKETS) + 1))),
            float(h.get("sum", 0.0)),
        )
        if d.get("colo") is not None:
            d["colo"] = _known(ColoFigures, d["colo"])
        return _known(cls, d)

    @classmethod
    def read(cls, path: Path) -> ProtectionStatus | None:
        """The published status, or None if there is none (yet) or it is not ours."""
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def switchover_request(status_dir: Path, name: str) -> Path:
    """Where remusd puts a switchover's protect-back document (a ProtectionSpec in
    JSON, the peer's to protect the guest back with) before it sends the primary's
    worker SIGUSR2: a signal carries no data, and this file is the request's."""
    return status_dir / f"{name}.switchover"


_T = TypeVar("_T")


def _known(cls: type[_T], d: dict[str, Any]) -> _T:
    """Only the fields this version knows: a newer worker's extra figures are skipped."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in d.items() if k in names})
