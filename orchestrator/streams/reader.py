"""libxl's checkpointed-stream reader phases, as one transition table.

Everything that decides what happens to a libxl record on a receiving host
lives in this file; it knows nothing of fds or helpers. It is the rule set
of ``libxl_stream_read.c`` (phases ``SRS_PHASE_NORMAL / BUFFERING /
UNBUFFERING``), used by the secondary while it mediates the restore helper
and by ``remusctl stream verify`` to follow captured streams:

* NORMAL: a record is applied at once. CHECKPOINT_END here is an error.
* START_CHECKPOINT (libxc hit a CHECKPOINT record and called the helper's
  ``checkpoint`` callback) moves to BUFFERING: every libxl record is queued,
  nothing is applied, until CHECKPOINT_END.
* CHECKPOINT_END moves to UNBUFFERING: the queued records are handed out as
  one consistent checkpoint; the caller applies them and says how it went.
* Reply to the helper: applied -> SUCCESS (1); a broken or malformed stream
  while BUFFERING -> FAILOVER (2), meaning "resume from the last complete
  checkpoint" (ERROR if there is none); a failure while applying -> ERROR (0).

A (phase, input) pair missing from the table is a misuse of the reader and
raises :class:`ReaderMisuse` naming both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Final

from .decoder import Record


class CheckpointReply(IntEnum):
    """XGR_CHECKPOINT_* (xenguest.h): the int answered to libxc's checkpoint callback."""

    ERROR = 0
    SUCCESS = 1
    FAILOVER = 2


class Phase(Enum):
    NORMAL = "normal"
    BUFFERING = "buffering"
    UNBUFFERING = "unbuffering"
    FINISHED = "finished"  # failed over or failed; no more input


class Input(Enum):
    RECORD = "record"
    CHECKPOINT_END = "checkpoint_end"
    START_CHECKPOINT = "start_checkpoint"
    STREAM_BROKEN = "stream_broken"
    APPLIED = "applied"
    APPLY_FAILED = "apply_failed"


class Action(Enum):
    APPLY = "apply"
    QUEUE = "queue"
    RELEASE = "release"
    COMMIT = "commit"
    FAILOVER = "failover"
    FAIL = "fail"
    NOTHING = "nothing"


TRANSITIONS: Final[dict[tuple[Phase, Input], tuple[Phase, Action]]] = {
    (Phase.NORMAL, Input.RECORD): (Phase.NORMAL, Action.APPLY),
    (Phase.NORMAL, Input.CHECKPOINT_END): (Phase.FINISHED, Action.FAIL),
    (Phase.NORMAL, Input.START_CHECKPOINT): (Phase.BUFFERING, Action.NOTHING),
    (Phase.NORMAL, Input.STREAM_BROKEN): (Phase.FINISHED, Action.FAIL),
    (Phase.BUFFERING, Input.RECORD): (Phase.BUFFERING, Action.QUEUE),
    (Phase.BUFFERING, Input.CHECKPOINT_END): (Phase.UNBUFFERING, Action.RELEASE),
    (Phase.BUFFERING, Input.STREAM_BROKEN): (Phase.FINISHED, Action.FAILOVER),
    (Phase.UNBUFFERING, Input.APPLIED): (Phase.NORMAL, Action.COMMIT),
    (Phase.UNBUFFERING, Input.APPLY_FAILED): (Phase.FINISHED, Action.FAIL),
}


class ReaderMisuse(RuntimeError):
    """An input the current phase has no row for (a bug in the caller)."""


@dataclass(frozen=True, slots=True)
class Apply:
    """Apply this record now (NORMAL phase)."""

    record: Record


@dataclass(frozen=True, slots=True)
class CheckpointReady:
    """A complete checkpoint's libxl records, in stream order, to be applied."""

    seq: int
    records: tuple[Record, ...]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to answer the helper's checkpoint callback, and why."""

    reply: CheckpointReply
    seq: int  # the last complete checkpoint (0 = none)
    reason: str = ""


Event = Apply | CheckpointReady | Outcome | None


@dataclass
class CheckpointReader:
    phase: Phase = Phase.NORMAL
    complete: int = 0  # checkpoints completed and applied
    _queue: list[Record] = field(default_factory=list)

    def _step(self, inp: Input) -> Action:
        try:
            self.phase, action = TRANSITIONS[(self.phase, inp)]
        except KeyError:
            raise ReaderMisuse(f"input {inp.value} in phase {self.phase.value}") from None
        return action

    def start_checkpoint(self) -> None:
        self._step(Input.START_CHECKPOINT)

    def receive(self, record: Record, is_checkpoint_end: bool) -> Event:
        inp = Input.CHECKPOINT_END if is_checkpoint_end else Input.RECORD
        action = self._step(inp)
        if action is Action.APPLY:
            return Apply(record)
        if action is Action.QUEUE:
            self._queue.append(record)
            return None
        if action is Action.RELEASE:
            records, self._queue = tuple(self._queue), []
            return CheckpointReady(self.complete + 1, records)
        return Outcome(CheckpointReply.ERROR, self.complete, "CHECKPOINT_END outside a checkpoint")

    def applied(self) -> Outcome:
        self._step(Input.APPLIED)
        self.complete += 1
        return Outcome(CheckpointReply.SUCCESS, self.complete)

    def apply_failed(self, reason: str) -> Outcome:
        self._step(Input.APPLY_FAILED)
        return Outcome(CheckpointReply.ERROR, self.complete, reason)

    def stream_broken(self, reason: str) -> Outcome:
        """EOF, a read error or a malformed record on the stream."""
        action = self._step(Input.STREAM_BROKEN)
        self._queue.clear()  # a partial checkpoint is never applied
        if action is Action.FAILOVER:
            # libxl answers FAILOVER whatever came before; it is libxc that
            # refuses one when no checkpoint is complete (xg_sr_restore.c).
            note = "" if self.complete else "; no complete checkpoint: nothing to fail over to"
            return Outcome(CheckpointReply.FAILOVER, self.complete, reason + note)
        return Outcome(CheckpointReply.ERROR, self.complete, reason)

    @property
    def buffered(self) -> int:
        return len(self._queue)
