"""The COLO checkpoint exchange, sans I/O: one state machine per side.

Both copies of the guest run; a checkpoint is taken when their output
diverges (or a timer expires), and it follows Xen's COLO sequence
(``libxl_colo_save.c``, ``libxl_colo_restore.c``; protocol notes 3.5)
exactly, plus one message of ours. The machines take events (messages that
arrived, guest state changes the driver observed) and return actions (what
the driver must write or do next); they never touch a file descriptor.

How each step corresponds to QEMU's COLO messages (``migration/colo.c``):

==========================  ===================================  ============================
QEMU COLO message           Xen COLO (what we send)              where
==========================  ===================================  ============================
CHECKPOINT_READY            first SVM_READY + SVM_RESUMED, after the   back channel
                            initial full checkpoint
CHECKPOINT_REQUEST          CHECKPOINT_STATE NEW                 forward stream
CHECKPOINT_REPLY            CHECKPOINT_STATE SVM_SUSPENDED       back channel
(QEMU has none: the SVM's   CHECKPOINT_DIRTY_PFN_LIST (libxc)    back channel
 RAM cache is reloaded)     -- the secondary's dirty pfns, so
                            the primary sends the union
VMSTATE_SEND, VMSTATE_SIZE  the libxc checkpoint: the pages and  forward stream
                            records up to the libxl
                            CHECKPOINT_END (sizes are in the
                            record headers)
VMSTATE_RECEIVED            CHECKPOINT_STATE SVM_READY           back channel
VMSTATE_LOADED              our LOADED on the control channel    control
                            (Xen has only SVM_RESUMED, "the SVM
                            runs again"; LOADED says the
                            checkpoint is applied, and releases
                            the output held across it)
==========================  ===================================  ============================

An event the current phase does not expect is a :class:`ColoProtocolError`;
the machine moves to ``FAILED`` and answers every later event with the same
error, so a driver ends the checkpoint (and COLO) cleanly instead of waiting
for a message that will never come.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from typing import Final

from ..streams.libxl import CheckpointState


class Phase(enum.Enum):
    FIRST_SYNC = "first-sync"  # the initial full copy; the secondary does not run yet
    RUNNING = "running"  # both copies run, output compared
    # primary
    REQUESTED = "requested"  # NEW sent, suspending our copy
    AWAIT_SVM_SUSPENDED = "await-svm-suspended"
    AWAIT_DIRTY_PFNS = "await-dirty-pfns"
    SENDING = "sending"  # libxc sends the union of dirty pages
    AWAIT_SVM_READY = "await-svm-ready"
    AWAIT_SVM_RESUMED = "await-svm-resumed"
    AWAIT_LOADED = "await-loaded"
    # secondary
    SUSPENDING = "suspending"  # NEW received, suspending our copy
    RECEIVING = "receiving"  # our dirty pfns sent, the checkpoint coming in
    FAILED = "failed"


class Reason(enum.Enum):
    DIVERGENCE = "divergence"  # the copies' output differed
    HELD = "held"  # output waited longer than the bound for the secondary's
    TIMER = "timer"  # checkpoint_max_interval passed with the copies agreeing


# -- events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointWanted:  # primary: the comparer saw a mismatch, or the timer ran out
    reason: Reason


@dataclass(frozen=True)
class GuestSuspended:  # this side's copy is suspended
    pass


@dataclass(frozen=True)
class StateReceived:  # a libxl CHECKPOINT_STATE record arrived
    state: CheckpointState


@dataclass(frozen=True)
class DirtyPfnsReceived:  # primary: libxc read the secondary's CHECKPOINT_DIRTY_PFN_LIST
    count: int | None = None  # None: libxc read it, and did not say how many


@dataclass(frozen=True)
class CheckpointSent:  # primary: libxc sent the pages, we wrote CHECKPOINT_END
    pass


@dataclass(frozen=True)
class CheckpointReceived:  # secondary: everything up to CHECKPOINT_END is in
    pass


@dataclass(frozen=True)
class Loaded:  # primary: the secondary's LOADED arrived on the control channel
    seq: int


Event = (
    CheckpointWanted
    | GuestSuspended
    | StateReceived
    | DirtyPfnsReceived
    | CheckpointSent
    | CheckpointReceived
    | Loaded
)

# -- actions --------------------------------------------------------------------------


@dataclass(frozen=True)
class WriteState:
    """Write a CHECKPOINT_STATE record: NEW on the forward stream, the SVM_* ones
    on the back channel."""

    state: CheckpointState


@dataclass(frozen=True)
class SuspendGuest:
    pass


@dataclass(frozen=True)
class SendDirtyPfns:  # secondary: hand our log-dirty map to libxc (back channel)
    pass


@dataclass(frozen=True)
class SendCheckpoint:  # primary: let libxc send the union, then CHECKPOINT_END
    pass


@dataclass(frozen=True)
class ResumeGuest:
    pass


@dataclass(frozen=True)
class LoadCheckpoint:  # secondary: apply memory and device state to our copy
    pass


@dataclass(frozen=True)
class SendLoaded:  # secondary: LOADED(seq) on the control channel
    seq: int


@dataclass(frozen=True)
class ReleaseOutput:  # primary: output held across checkpoint ``seq`` may go
    seq: int


Action = (
    WriteState
    | SuspendGuest
    | SendDirtyPfns
    | SendCheckpoint
    | ResumeGuest
    | LoadCheckpoint
    | SendLoaded
    | ReleaseOutput
)


class ColoProtocolError(Exception):
    def __init__(self, side: str, phase: Phase, event: object) -> None:
        self.side, self.phase, self.event = side, phase, event
        super().__init__(f"COLO {side}: {event!r} is not expected in phase {phase.value}")


def _key(event: object) -> object:
    """What the transition tables are indexed by: the event's type, and for a
    CHECKPOINT_STATE record its state too."""
    if isinstance(event, StateReceived):
        return (StateReceived, event.state)
    return type(event)


NEW: Final = CheckpointState.NEW
SVM_SUSPENDED: Final = CheckpointState.SVM_SUSPENDED
SVM_READY: Final = CheckpointState.SVM_READY
SVM_RESUMED: Final = CheckpointState.SVM_RESUMED

# (phase, event key) -> next phase; the actions are built in the step functions
# because some carry the checkpoint's sequence number
_PRIMARY: Final[dict[tuple[Phase, object], Phase]] = {
    # libxc's live pass ends with a suspend too, with nothing to read back
    (Phase.FIRST_SYNC, GuestSuspended): Phase.FIRST_SYNC,
    (Phase.FIRST_SYNC, CheckpointSent): Phase.AWAIT_SVM_READY,
    (Phase.RUNNING, CheckpointWanted): Phase.REQUESTED,
    (Phase.REQUESTED, GuestSuspended): Phase.AWAIT_SVM_SUSPENDED,
    (Phase.AWAIT_SVM_SUSPENDED, (StateReceived, SVM_SUSPENDED)): Phase.AWAIT_DIRTY_PFNS,
    (Phase.AWAIT_DIRTY_PFNS, DirtyPfnsReceived): Phase.SENDING,
    (Phase.SENDING, CheckpointSent): Phase.AWAIT_SVM_READY,
    (Phase.AWAIT_SVM_READY, (StateReceived, SVM_READY)): Phase.AWAIT_SVM_RESUMED,
    (Phase.AWAIT_SVM_RESUMED, (StateReceived, SVM_RESUMED)): Phase.AWAIT_LOADED,
    (Phase.AWAIT_LOADED, Loaded): Phase.RUNNING,
}

_SECONDARY: Final[dict[tuple[Phase, object], Phase]] = {
    (Phase.FIRST_SYNC, CheckpointReceived): Phase.RUNNING,
    (Phase.RUNNING, (StateReceived, NEW)): Phase.SUSPENDING,
    (Phase.SUSPENDING, GuestSuspended): Phase.RECEIVING,
    (Phase.RECEIVING, CheckpointReceived): Phase.RUNNING,
}


@dataclass
class ColoCounters:
    checkpoints: int = 0
    by_reason: dict[Reason, int] = field(default_factory=lambda: dict.fromkeys(Reason, 0))
    dirty_pfns_from_secondary: int = 0


class _Exchange(abc.ABC):
    """What both sides share: the table lookup, and failing for good."""

    side = ""
    table: dict[tuple[Phase, object], Phase] = {}

    def __init__(self) -> None:
        self.phase = Phase.FIRST_SYNC
        self.seq = 1  # the checkpoint in progress (the first is the full copy)
        self._error: ColoProtocolError | None = None

    def expected(self) -> list[object]:
        """The event keys the current phase accepts (for error messages and tests)."""
        return [k for (p, k) in self.table if p is self.phase]

    def _fail(self, event: object) -> ColoProtocolError:
        self._error = ColoProtocolError(self.side, self.phase, event)
        self.phase = Phase.FAILED
        return self._error

    def receive(self, event: Event) -> list[Action]:
        if self._error is not None:
            raise self._error
        nxt = self.table.get((self.phase, _key(event)))
        if nxt is None:
            raise self._fail(event)
        actions = self._actions(event)
        self.phase = nxt
        return actions

    @abc.abstractmethod
    def _actions(self, event: Event) -> list[Action]:
        """What this side does on ``event`` (already allowed by the table)."""


class PrimaryExchange(_Exchange):
    """The primary's side of the exchange."""

    side = "primary"
    table = _PRIMARY

    def __init__(self) -> None:
        super().__init__()
        self.counters = ColoCounters()
        self.reason: Reason | None = None

    def _actions(self, event: Event) -> list[Action]:
        if isinstance(event, CheckpointWanted):
            self.seq += 1
            self.reason = event.reason
            # wait_checkpoint returns: NEW on the forward stream, then libxc suspends
            return [WriteState(NEW), SuspendGuest()]
        if isinstance(event, DirtyPfnsReceived):
            self.counters.dirty_pfns_from_secondary += event.count or 0
            return [SendCheckpoint()]
        if isinstance(event, StateReceived) and event.state is SVM_READY:
            return [ResumeGuest()]
        if isinstance(event, Loaded):
            if event.seq != self.seq:  # a LOADED for another checkpoint: out of order
                raise self._fail(event)
            self.counters.checkpoints += 1
            if self.reason is not None:
                self.counters.by_reason[self.reason] += 1
            return [ReleaseOutput(event.seq)]
        return []


class SecondaryExchange(_Exchange):
    """The secondary's side of the exchange."""

    side = "secondary"
    table = _SECONDARY

    def _actions(self, event: Event) -> list[Action]:
        if isinstance(event, StateReceived):  # NEW: suspend our copy
            self.seq += 1
            return [SuspendGuest()]
        if isinstance(event, GuestSuspended):
            return [WriteState(SVM_SUSPENDED), SendDirtyPfns()]
        if isinstance(event, CheckpointReceived):
            # Xen's secondary postcopy: SVM_READY, load, resume, SVM_RESUMED; then ours
            return [
                WriteState(SVM_READY),
                LoadCheckpoint(),
                ResumeGuest(),
                WriteState(SVM_RESUMED),
                SendLoaded(self.seq),
            ]
        return []
