"""A helper session's records stay bounded over a long run; short runs read as before."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from orchestrator.savehelper import Callbacks, HelperSession, Mode, SaveArgs, StreamType
from orchestrator.savehelper.bounded import Retained
from orchestrator.savehelper.session import (
    LOG_ERRORS,
    LOG_HEAD,
    LOG_TAIL,
    TRACE_HEAD,
    TRACE_TAIL,
    HelperResult,
    LogRecord,
)

SIM = Path(sys.executable).parent / "remus-sim-save-helper"


def test_short_record_is_the_list() -> None:
    r: Retained[int] = Retained(head=3, tail=3, items=range(5))
    assert r == [0, 1, 2, 3, 4] and r.dropped == 0
    assert r[0] == 0 and r[-1] == 4 and r[1:3] == [1, 2] and 3 in r
    assert r != [0, 1, 2, 3] and r != "01234"


def test_long_record_keeps_head_pinned_and_tail() -> None:
    r: Retained[int] = Retained(head=2, tail=3, pinned=2, pin=lambda n: n % 100 == 50)
    for n in range(1000):
        r.append(n)
    # 50 and 150 are the first pinned ones in the middle; 250 ... are not kept
    assert list(r) == [0, 1, 50, 150, 997, 998, 999]
    assert r.total == 1000 and r.dropped == 993 and len(r) == 7
    assert r[-1] == 999 and r[2] == 50
    with pytest.raises(IndexError):
        r[7]


def test_no_tail_still_pins() -> None:
    r: Retained[int] = Retained(head=1, tail=0, pinned=1, pin=lambda n: n == 7)
    for n in range(10):
        r.append(n)
    assert list(r) == [0, 7]


def test_result_logs_keep_the_first_errors() -> None:
    res = HelperResult(Mode.SAVE)
    for i in range(10_000):
        level = 8 if i in (5000, 5001) or i >= 9990 else 1
        res.logs.append(LogRecord(level, 0, "xc", f"line {i}"))
    assert len(res.logs) <= LOG_HEAD + LOG_ERRORS + LOG_TAIL
    errors = [r.text for r in res.logs if r.level >= 8]
    assert errors[:2] == ["line 5000", "line 5001"]  # what callers report first
    assert res.logs[0].text == "line 0" and res.logs[-1].text == "line 9999"


def test_long_session_trace_is_bounded_and_counted(tmp_path: Path) -> None:
    """5,000 checkpoint round trips through the simulated helper: the trace keeps
    its head and tail, the counts every one."""
    if not os.access(SIM, os.X_OK):
        pytest.skip(f"{SIM} not installed")
    (tmp_path / "domains").mkdir()
    n = 5000

    def ok() -> int:
        return 1

    async def go() -> HelperSession:
        s = HelperSession(Mode.SAVE, Callbacks(suspend=ok, postcopy=ok, checkpoint=ok))
        fd = os.open(os.devnull, os.O_WRONLY)
        try:
            await s.run(
                fd,
                -1,
                SaveArgs(1, s.cbflags, StreamType.REMUS),
                helper=str(SIM),
                extra_env={"REMUS_SIM_HELPER_PINGPONG": str(n), "REMUS_SIM_HOST": str(tmp_path)},
            )
        finally:
            os.close(fd)
        return s

    r = asyncio.run(go()).result
    assert r.retval == 0
    assert r.counts["checkpoint"] == n
    assert len(r.trace) == TRACE_HEAD + TRACE_TAIL
    assert r.trace.total == sum(r.counts.values())
    assert r.callbacks()[-1] == "complete" and r.trace[-1] == ("complete", (0, 0), 0)
