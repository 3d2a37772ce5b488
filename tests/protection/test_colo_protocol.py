"""The COLO checkpoint exchange (sans I/O): Xen's order, and every unexpected message
in every phase ends the exchange with an error instead of a wait."""

from __future__ import annotations

from collections import deque

import pytest

from orchestrator.protection.colo_protocol import (
    Action,
    CheckpointReceived,
    CheckpointSent,
    CheckpointWanted,
    ColoProtocolError,
    DirtyPfnsReceived,
    Event,
    GuestSuspended,
    LoadCheckpoint,
    Loaded,
    Phase,
    PrimaryExchange,
    Reason,
    ReleaseOutput,
    ResumeGuest,
    SecondaryExchange,
    SendCheckpoint,
    SendDirtyPfns,
    SendLoaded,
    StateReceived,
    SuspendGuest,
    WriteState,
)
from orchestrator.streams.libxl import CheckpointState as CS

ALL_EVENTS: list[Event] = [
    CheckpointWanted(Reason.TIMER),
    GuestSuspended(),
    *(StateReceived(s) for s in CS),
    DirtyPfnsReceived(3),
    CheckpointSent(),
    CheckpointReceived(),
    Loaded(1),
]


class Pair:
    """Both machines wired together the way the drivers wire them: the secondary's
    back-channel states and LOADED go to the primary, NEW goes forward; the
    guests' suspends and libxc's transfers happen when asked."""

    def __init__(self) -> None:
        self.p, self.s = PrimaryExchange(), SecondaryExchange()
        self.log: list[tuple[str, Action]] = []
        self.to_p: deque[Event] = deque()
        self.to_s: deque[Event] = deque()

    def _run(self, side: str, actions: list[Action]) -> None:
        for a in actions:
            self.log.append((side, a))
            if isinstance(a, WriteState):
                (self.to_s if side == "p" else self.to_p).append(StateReceived(a.state))
            elif isinstance(a, SuspendGuest):
                (self.to_p if side == "p" else self.to_s).append(GuestSuspended())
            elif isinstance(a, SendDirtyPfns):
                self.to_p.append(DirtyPfnsReceived(7))
            elif isinstance(a, SendCheckpoint):
                self.to_p.append(CheckpointSent())
                self.to_s.append(CheckpointReceived())
            elif isinstance(a, SendLoaded):
                self.to_p.append(Loaded(a.seq))

    def pump(self) -> None:
        while self.to_p or self.to_s:
            if self.to_s:
                self._run("s", self.s.receive(self.to_s.popleft()))
            if self.to_p:
                self._run("p", self.p.receive(self.to_p.popleft()))

    def first_sync(self) -> None:
        # libxc's live pass: the whole memory, a suspend, then CHECKPOINT_END
        self.to_p.append(GuestSuspended())
        self.to_p.append(CheckpointSent())
        self.to_s.append(CheckpointReceived())
        self.pump()

    def checkpoint(self, reason: Reason) -> None:
        self._run("p", self.p.receive(CheckpointWanted(reason)))
        self.pump()


def test_first_sync_then_checkpoints_in_xens_order() -> None:
    pair = Pair()
    pair.first_sync()
    assert (pair.p.phase, pair.s.phase) == (Phase.RUNNING, Phase.RUNNING)
    assert ("p", ReleaseOutput(1)) in pair.log
    pair.log.clear()
    pair.checkpoint(Reason.DIVERGENCE)
    assert [a for _, a in pair.log] == [
        WriteState(CS.NEW),  # primary: wait_checkpoint writes NEW
        SuspendGuest(),  # primary: libxc's suspend callback
        SuspendGuest(),  # secondary: NEW read, suspend the SVM
        WriteState(CS.SVM_SUSPENDED),  # secondary's suspend callback
        SendDirtyPfns(),  # libxc: the SVM's dirty pfns on the back channel
        SendCheckpoint(),  # primary: libxc sends the union
        WriteState(CS.SVM_READY),  # secondary's postcopy ...
        LoadCheckpoint(),
        ResumeGuest(),
        WriteState(CS.SVM_RESUMED),
        SendLoaded(2),  # ... and ours: the checkpoint is applied
        ResumeGuest(),  # primary's postcopy after SVM_READY
        ReleaseOutput(2),  # LOADED: output held across checkpoint 2 goes
    ]
    for reason in (Reason.TIMER, Reason.TIMER, Reason.DIVERGENCE):
        pair.checkpoint(reason)
    c = pair.p.counters
    assert c.checkpoints == 5  # the first sync and four more
    assert (c.by_reason[Reason.DIVERGENCE], c.by_reason[Reason.TIMER]) == (2, 2)
    assert c.dirty_pfns_from_secondary == 4 * 7
    assert pair.s.seq == pair.p.seq == 5


@pytest.mark.parametrize("side", [PrimaryExchange, SecondaryExchange])
def test_every_unexpected_event_in_every_phase_fails_cleanly(side: type) -> None:
    """Walk each machine through its phases; in each, every event it does not
    expect raises, leaves it FAILED, and every later event raises the same error."""
    reached: dict[Phase, list[Event]] = {}
    pair = Pair()
    machine = pair.p if side is PrimaryExchange else pair.s
    # record the events that lead to each phase, by replaying a whole exchange
    history: list[Event] = []
    orig = machine.receive

    def spy(event: Event) -> list[Action]:
        reached.setdefault(machine.phase, list(history))
        history.append(event)
        return orig(event)

    machine.receive = spy  # type: ignore[method-assign]
    pair.first_sync()
    pair.checkpoint(Reason.TIMER)
    assert len(reached) >= (4 if side is SecondaryExchange else 9)
    for phase, path in reached.items():
        fresh = side()
        for e in path:
            fresh.receive(e)
        assert fresh.phase is phase
        allowed = fresh.expected()
        for bad in ALL_EVENTS:
            key = (StateReceived, bad.state) if isinstance(bad, StateReceived) else type(bad)
            if key in allowed:
                continue
            probe = side()
            for e in path:
                probe.receive(e)
            with pytest.raises(ColoProtocolError, match=phase.value) as info:
                probe.receive(bad)
            assert probe.phase is Phase.FAILED
            with pytest.raises(ColoProtocolError) as again:
                probe.receive(ALL_EVENTS[0])
            assert again.value is info.value


def test_loaded_for_another_checkpoint_is_out_of_order() -> None:
    pair = Pair()
    pair.first_sync()
    p = pair.p
    p.receive(CheckpointWanted(Reason.TIMER))
    p.receive(GuestSuspended())
    p.receive(StateReceived(CS.SVM_SUSPENDED))
    p.receive(DirtyPfnsReceived(0))
    p.receive(CheckpointSent())
    p.receive(StateReceived(CS.SVM_READY))
    p.receive(StateReceived(CS.SVM_RESUMED))
    with pytest.raises(ColoProtocolError, match="Loaded"):
        p.receive(Loaded(1))  # a stale LOADED: checkpoint 2 is the one in flight
    assert p.phase is Phase.FAILED
