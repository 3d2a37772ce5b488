"""Every row of the libxl reader's transition table, and the rows it lacks."""

from __future__ import annotations

import pytest

from orchestrator.streams import Layer, Record, libxl
from orchestrator.streams.reader import (
    TRANSITIONS,
    Apply,
    CheckpointReader,
    CheckpointReady,
    CheckpointReply,
    Input,
    Outcome,
    Phase,
    ReaderMisuse,
)


def rec(rtype: int, body: bytes = b"") -> Record:
    return Record(Layer.LIBXL, rtype, 0, memoryview(body))


EMU = rec(libxl.RecType.EMULATOR_CONTEXT, b"\2\0\0\0\0\0\0\0blob")
CEND = rec(libxl.RecType.CHECKPOINT_END)


def test_normal_applies_at_once() -> None:
    r = CheckpointReader()
    assert r.receive(EMU, False) == Apply(EMU)
    assert r.phase is Phase.NORMAL


def test_checkpoint_buffers_until_end_then_releases_in_order() -> None:
    r = CheckpointReader()
    for seq in (1, 2, 3):
        r.start_checkpoint()
        assert r.phase is Phase.BUFFERING
        assert r.receive(EMU, False) is None
        assert r.receive(EMU, False) is None
        assert r.buffered == 2
        ready = r.receive(CEND, True)
        assert isinstance(ready, CheckpointReady)
        assert ready.seq == seq and ready.records == (EMU, EMU)
        assert r.phase is Phase.UNBUFFERING
        assert r.applied() == Outcome(CheckpointReply.SUCCESS, seq)
        assert r.phase is Phase.NORMAL


def test_checkpoint_end_outside_checkpoint() -> None:
    out = CheckpointReader().receive(CEND, True)
    assert isinstance(out, Outcome) and out.reply is CheckpointReply.ERROR
    assert "outside a checkpoint" in out.reason


def test_break_while_buffering_fails_over_to_last_complete() -> None:
    r = CheckpointReader()
    r.start_checkpoint()
    r.receive(CEND, True)
    r.applied()
    r.start_checkpoint()
    r.receive(EMU, False)
    out = r.stream_broken("EOF")
    assert out == Outcome(CheckpointReply.FAILOVER, 1, "EOF")
    assert r.buffered == 0  # the partial checkpoint is dropped, never applied
    assert r.phase is Phase.FINISHED


def test_break_before_first_checkpoint_has_nothing_to_fail_over_to() -> None:
    r = CheckpointReader()
    r.start_checkpoint()
    out = r.stream_broken("EOF")
    assert out.reply is CheckpointReply.FAILOVER and out.seq == 0
    assert "nothing to fail over to" in out.reason


def test_apply_failure_is_error() -> None:
    r = CheckpointReader()
    r.start_checkpoint()
    r.receive(CEND, True)
    assert r.apply_failed("disk full") == Outcome(CheckpointReply.ERROR, 0, "disk full")


def test_break_in_normal_phase_is_error() -> None:
    assert CheckpointReader().stream_broken("EOF").reply is CheckpointReply.ERROR


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("inp", list(Input))
def test_missing_rows_are_misuse(phase: Phase, inp: Input) -> None:
    r = CheckpointReader(phase=phase)
    call = {
        Input.RECORD: lambda: r.receive(EMU, False),
        Input.CHECKPOINT_END: lambda: r.receive(CEND, True),
        Input.START_CHECKPOINT: r.start_checkpoint,
        Input.STREAM_BROKEN: lambda: r.stream_broken("x"),
        Input.APPLIED: r.applied,
        Input.APPLY_FAILED: lambda: r.apply_failed("x"),
    }[inp]
    if (phase, inp) in TRANSITIONS:
        call()
        assert r.phase is TRANSITIONS[(phase, inp)][0]
    else:
        with pytest.raises(ReaderMisuse, match=f"{inp.value} in phase {phase.value}"):
            call()
