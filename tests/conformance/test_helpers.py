"""The same scenarios against Xen's real libxl-save-helper and our simulated one.

Each scenario asserts one expected sequence of callbacks (name, arguments,
our reply) and one result, the same for both helpers; so the two helpers
are shown to behave identically at the boundary. Frames are compared byte
for byte with the captures in the protocol notes (2.7).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.savehelper import (
    Callbacks,
    Failure,
    HelperFailed,
    HelperNotFound,
    HelperResult,
    HelperSession,
    Mode,
    RestoreArgs,
    SaveArgs,
    SessionBounds,
    StreamType,
)
from orchestrator.savehelper.messages import (
    CBFLAGS_RESTORE_COLO,
    CBFLAGS_RESTORE_PLAIN,
    CBFLAGS_RESTORE_REMUS,
    CBFLAGS_SAVE_COLO,
    CBFLAGS_SAVE_PLAIN,
    CBFLAGS_SAVE_REMUS,
)
from orchestrator.streams import Layer, StreamDecoder, StreamError, libxc
from orchestrator.streams import StreamType as ST
from orchestrator.streams.fileio import verify_file
from orchestrator.streams.synth import SynthSpec, generate, write_all
from tests.conformance.conftest import REAL_HELPER, Kit

DOMID = 7
STORE, CONSOLE = 0xFEFFC, 0xFEFFF
Trace = list[tuple[str, tuple[Any, ...], int | None]]


def ret(value: int) -> Callable[..., Awaitable[int]]:
    async def cb(*_: Any) -> int:
        return value

    return cb


def replies(*values: int) -> Callable[..., Awaitable[int]]:
    it = iter(values)

    async def cb(*_: Any) -> int:
        return next(it)

    return cb


def suspender(kit: Kit, domid: int = DOMID) -> Callable[..., Awaitable[int]]:
    async def suspend() -> int:
        kit.mark_suspended(domid)
        return 1

    return suspend


def resumer(kit: Kit, then: Callable[..., Awaitable[int]], domid: int = DOMID) -> Any:
    async def postcopy() -> int:
        kit.running(domid)
        return await then()

    return postcopy


async def run_save(
    kit: Kit,
    cbs: Callbacks,
    fd: int,
    stream_type: StreamType = StreamType.PLAIN,
    flags: int = 1,
    back_fd: int = -1,
    bounds: SessionBounds | None = None,
    during: Callable[[HelperSession], Awaitable[None]] | None = None,
) -> HelperSession:
    s = HelperSession(Mode.SAVE, cbs, bounds=bounds, record_frames=True)
    args = SaveArgs(DOMID, s.cbflags, stream_type, flags)
    task = asyncio.create_task(s.run(fd, back_fd, args, helper=kit.helper, extra_env=kit.env))
    if during is not None:
        await during(s)
    with contextlib.suppress(HelperFailed):
        await task
    return s


def failed_save(
    kit: Kit,
    s: HelperSession,
    fd: int,
    stream_type: StreamType = StreamType.PLAIN,
    env: dict[str, str] | None = None,
) -> HelperFailed:
    """Run a save that must fail, and return how it failed."""

    async def go() -> HelperFailed:
        with pytest.raises(HelperFailed) as info:
            await s.run(
                fd,
                -1,
                SaveArgs(DOMID, s.cbflags, stream_type),
                helper=kit.helper,
                extra_env=kit.env if env is None else env,
            )
        return info.value

    try:
        return asyncio.run(go())
    finally:
        os.close(fd)


def save_file(tmp_path: Path) -> tuple[int, Path]:
    path = tmp_path / "stream"
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600), path


# -- plain save / restore ----------------------------------------------------------


@pytest.mark.parametrize("flags", [0, 1])
def test_plain_save_hvm(kit: Kit, tmp_path: Path, flags: int) -> None:
    kit.domain(DOMID)
    kit.running(DOMID)
    fd, path = save_file(tmp_path)
    cbs = Callbacks(suspend=suspender(kit), switch_qemu_logdirty=ret(0))
    assert cbs.cbflags(Mode.SAVE) == CBFLAGS_SAVE_PLAIN

    async def go() -> HelperResult:
        s = HelperSession(Mode.SAVE, cbs, record_frames=True)
        return await s.run(
            fd,
            -1,
            SaveArgs(DOMID, s.cbflags, StreamType.PLAIN, flags),
            helper=kit.helper,
            extra_env=kit.env,
        )

    r = asyncio.run(go())
    os.close(fd)
    assert r.trace == [
        ("switch_qemu_logdirty", (DOMID, 1), 0),
        ("suspend", (), 1),
        ("switch_qemu_logdirty", (DOMID, 0), 0),
        ("complete", (0, 0), 0),
    ]
    assert r.exit_status == 0 and r.ok
    # notes 2.7: first frame of every save, and the exact callback frames
    assert (
        r.frames[0]
        == bytes.fromhex("3200 0100 01000000 00000000 12000000")
        + b"libxl-save-helper\0"
        + bytes.fromhex("0e000000")
        + b"starting save\0"
    )
    assert bytes.fromhex("0a00 0700 07000000 01000000") in r.frames
    assert bytes.fromhex("0200 0300") in r.frames
    assert r.frames[-1] == bytes.fromhex("0a00 0a00 00000000 00000000")
    with open(path, "rb") as f:
        summary = verify_file(f, StreamDecoder(Layer.LIBXC, ST.PLAIN))
    assert summary.end == "END record" and summary.domain_type == "X86_HVM"


@pytest.mark.parametrize("dtype", ["hvm", "pv"])
def test_plain_restore(kit: Kit, tmp_path: Path, dtype: str) -> None:
    kit.domain(DOMID, pages=8, dtype=dtype)
    path = tmp_path / "in"
    dt = libxc.DomainType.X86_HVM if dtype == "hvm" else libxc.DomainType.X86_PV
    with open(path, "wb") as f:
        write_all(f, generate(SynthSpec(domain_type=dt, pages=8, top_layer=Layer.LIBXC)))
    fd = os.open(path, os.O_RDONLY)
    cbs = Callbacks(static_data_done=ret(0))
    assert cbs.cbflags(Mode.RESTORE) == CBFLAGS_RESTORE_PLAIN

    async def go() -> HelperResult:
        s = HelperSession(Mode.RESTORE, cbs, record_frames=True)
        return await s.run(
            fd, -1, RestoreArgs(DOMID, s.cbflags), helper=kit.helper, extra_env=kit.env
        )

    r = asyncio.run(go())
    os.close(fd)
    assert r.trace == [
        ("static_data_done", (0,), 0),
        ("restore_results", (STORE, CONSOLE), None),
        ("complete", (0, 0), 0),
    ]
    assert bytes.fromhex("1200 0900 fcef0f0000000000 ffef0f0000000000") in r.frames
    if kit.kind == "sim":  # the simulated domain really holds the pages now
        mem = kit.domains[DOMID].memory
        assert all(
            mem[p * 4096 : p * 4096 + 16] == p.to_bytes(8, "little") + bytes(8) for p in range(8)
        )


def test_restore_of_a_truncated_stream_fails_with_complete(kit: Kit, tmp_path: Path) -> None:
    kit.domain(DOMID, pages=8)
    path = tmp_path / "in"
    data = b"".join(bytes(c) for c in generate(SynthSpec(pages=8, top_layer=Layer.LIBXC)))
    path.write_bytes(data[:5000])
    fd = os.open(path, os.O_RDONLY)

    async def go() -> HelperResult:
        s = HelperSession(Mode.RESTORE, Callbacks(static_data_done=ret(0)))
        return await s.run(
            fd, -1, RestoreArgs(DOMID, s.cbflags), helper=kit.helper, extra_env=kit.env
        )

    r = asyncio.run(go())
    os.close(fd)
    assert [t[0] for t in r.trace] == ["static_data_done", "restore_results", "complete"]
    assert r.restore_results == (0, 0)  # libxc fills them only on success
    assert r.retval == -1 and not r.ok and r.exit_status == 0


# -- Remus ---------------------------------------------------------------------------


def test_remus_save_three_checkpoints_then_stop(kit: Kit, tmp_path: Path) -> None:
    kit.domain(DOMID)
    kit.running(DOMID)
    fd, path = save_file(tmp_path)
    cbs = Callbacks(
        suspend=suspender(kit),
        postcopy=resumer(kit, ret(1)),
        checkpoint=replies(1, 1, 0),
        switch_qemu_logdirty=ret(0),
    )
    assert cbs.cbflags(Mode.SAVE) == CBFLAGS_SAVE_REMUS
    s = asyncio.run(run_save(kit, cbs, fd, StreamType.REMUS))
    os.close(fd)
    r = s.result
    assert r.trace == [
        ("switch_qemu_logdirty", (DOMID, 1), 0),
        *[
            step
            for c in (1, 1, 0)
            for step in (("suspend", (), 1), ("postcopy", (), 1), ("checkpoint", (), c))
        ],
        ("switch_qemu_logdirty", (DOMID, 0), 0),
        ("complete", (0, 0), 0),  # P-12: a checkpoint reply of 0 ends with "success"
    ]
    assert any(rec.text.startswith("Save failed") for rec in r.logs)
    with open(path, "rb") as f:
        summary = verify_file(f, StreamDecoder(Layer.LIBXC, ST.REMUS))
    assert summary.checkpoints == 3 and summary.end.startswith("checkpoint boundary")


def _remus_input(tmp_path: Path, checkpoints: int, cut: int = 0) -> int:
    data = b"".join(
        bytes(c)
        for c in generate(
            SynthSpec(
                pages=8,
                stream_type=ST.REMUS,
                checkpoints=checkpoints,
                dirty_pages=2,
                top_layer=Layer.LIBXC,
            )
        )
    )
    path = tmp_path / "remus.in"
    path.write_bytes(data[: len(data) - cut] if cut else data)
    return os.open(path, os.O_RDONLY)


def _restore(kit: Kit, fd: int, cbs: Callbacks, st: StreamType) -> HelperResult:
    async def go() -> HelperResult:
        s = HelperSession(Mode.RESTORE, cbs)
        return await s.run(
            fd, -1, RestoreArgs(DOMID, s.cbflags, st), helper=kit.helper, extra_env=kit.env
        )

    try:
        return asyncio.run(go())
    finally:
        os.close(fd)


def test_remus_restore_fails_over_at_eof_after_complete_checkpoints(
    kit: Kit, tmp_path: Path
) -> None:
    kit.domain(DOMID, pages=8)
    cbs = Callbacks(static_data_done=ret(0), checkpoint=ret(1))
    assert cbs.cbflags(Mode.RESTORE) == CBFLAGS_RESTORE_REMUS
    r = _restore(kit, _remus_input(tmp_path, 3), cbs, StreamType.REMUS)
    assert r.trace == [
        ("static_data_done", (0,), 0),
        *[("checkpoint", (), 1)] * 4,
        ("restore_results", (STORE, CONSOLE), None),
        ("complete", (0, 0), 0),
    ]


def test_remus_restore_failover_reply_rolls_back(kit: Kit, tmp_path: Path) -> None:
    kit.domain(DOMID, pages=8)
    cbs = Callbacks(static_data_done=ret(0), checkpoint=replies(1, 1, 2))
    r = _restore(kit, _remus_input(tmp_path, 3), cbs, StreamType.REMUS)
    assert [t[0] for t in r.trace] == [
        "static_data_done",
        "checkpoint",
        "checkpoint",
        "checkpoint",
        "restore_results",
        "complete",
    ]
    assert r.retval == 0


def test_remus_restore_failover_before_a_consistent_checkpoint_is_an_error(
    kit: Kit, tmp_path: Path
) -> None:
    kit.domain(DOMID, pages=8)
    cbs = Callbacks(static_data_done=ret(0), checkpoint=ret(2))
    r = _restore(kit, _remus_input(tmp_path, 3), cbs, StreamType.REMUS)
    assert [t[0] for t in r.trace] == [
        "static_data_done",
        "checkpoint",
        "restore_results",
        "complete",
    ]
    assert r.retval == -1 and r.restore_results == (0, 0)


def test_remus_restore_stream_broken_before_first_checkpoint(kit: Kit, tmp_path: Path) -> None:
    kit.domain(DOMID, pages=8)
    fd = _remus_input(tmp_path, 0, cut=200)  # cut inside the first checkpoint's records
    r = _restore(kit, fd, Callbacks(static_data_done=ret(0), checkpoint=ret(1)), StreamType.REMUS)
    assert [t[0] for t in r.trace] == ["static_data_done", "restore_results", "complete"]
    assert r.retval == -1


# -- COLO: a save helper and a restore helper of the same kind, connected ------------


def test_colo_save_and_restore_loops(kit: Kit) -> None:
    kit.domain(DOMID, pages=6)
    kit.running(DOMID)
    sec = 9
    kit.domain(sec, pages=6)
    fwd_p, fwd_s = socket.socketpair()
    back_p, back_s = socket.socketpair()
    rounds = 3

    async def go() -> tuple[HelperResult, HelperResult]:
        async def sec_suspend() -> int:
            kit.dirty(sec, [1, 2])  # what the running secondary dirtied
            return 1

        primary = HelperSession(
            Mode.SAVE,
            Callbacks(
                suspend=suspender(kit),
                checkpoint=ret(1),
                postcopy=resumer(kit, ret(1)),
                wait_checkpoint=replies(*([1] * (rounds - 1)), 0),
                switch_qemu_logdirty=ret(0),
            ),
        )
        secondary = HelperSession(
            Mode.RESTORE,
            Callbacks(
                static_data_done=ret(0),
                checkpoint=ret(1),
                postcopy=ret(1),
                wait_checkpoint=ret(1),
                suspend=sec_suspend,
            ),
        )
        assert primary.cbflags == CBFLAGS_SAVE_COLO
        assert secondary.cbflags == CBFLAGS_RESTORE_COLO
        st = asyncio.create_task(
            secondary.run(
                fwd_s.fileno(),
                back_s.fileno(),
                RestoreArgs(sec, secondary.cbflags, StreamType.COLO),
                helper=kit.helper,
                extra_env=kit.env,
            )
        )
        pt = await primary.run(
            fwd_p.fileno(),
            back_p.fileno(),
            SaveArgs(DOMID, primary.cbflags, StreamType.COLO, 1),
            helper=kit.helper,
            extra_env=kit.env,
        )
        fwd_p.close()  # the primary's side of the link goes away: the secondary fails over
        back_p.close()
        return pt, await st

    p, s = asyncio.run(go())
    fwd_s.close()
    back_s.close()
    assert p.trace == [
        ("switch_qemu_logdirty", (DOMID, 1), 0),
        *[
            step
            for i in range(rounds)
            for step in (
                ("suspend", (), 1),
                ("checkpoint", (), 1),
                ("postcopy", (), 1),
                ("wait_checkpoint", (), 0 if i == rounds - 1 else 1),
            )
        ],
        ("switch_qemu_logdirty", (DOMID, 0), 0),
        ("complete", (0, 0), 0),
    ]
    assert s.trace == [
        ("static_data_done", (0,), 0),
        *[
            step
            for _ in range(rounds)
            for step in (
                ("checkpoint", (), 1),
                ("restore_results", (STORE, CONSOLE), None),
                ("postcopy", (), 1),
                ("wait_checkpoint", (), 1),
                ("suspend", (), 1),
            )
        ],
        ("restore_results", (STORE, CONSOLE), None),
        ("complete", (0, 0), 0),
    ]
    assert any(rec.text == "COLO Failover" for rec in s.logs)
    if kit.kind == "sim":
        # the union of both dirty sets reached the secondary: its memory is the primary's
        assert kit.domains[sec].memory[:] == kit.domains[DOMID].memory[:]


# -- failures --------------------------------------------------------------------------


def test_callback_that_never_answers(kit: Kit, tmp_path: Path) -> None:
    kit.domain(DOMID)
    kit.running(DOMID)
    fd, _ = save_file(tmp_path)

    async def hang() -> int:
        await asyncio.sleep(3600)
        return 1

    s = HelperSession(
        Mode.SAVE,
        Callbacks(suspend=hang, switch_qemu_logdirty=ret(0)),
        bounds=SessionBounds(per_callback={"suspend": 0.5}),
    )
    exc = failed_save(kit, s, fd)
    assert exc.failure is Failure.CALLBACK_TIMEOUT
    assert "suspend gave no answer in 0.5 s" in str(exc)
    assert exc.result.exit_status == -signal.SIGKILL  # killed, as libxl's helper_failed does


def test_helper_killed_mid_checkpoint(kit: Kit, tmp_path: Path) -> None:
    kit.domain(DOMID)
    kit.running(DOMID)
    fd, _ = save_file(tmp_path)
    holder: dict[str, HelperSession] = {}

    async def kill_in_checkpoint() -> int:
        proc = holder["s"].helper
        assert proc is not None
        proc.process.kill()
        await proc.process.wait()
        return 1

    s = HelperSession(
        Mode.SAVE,
        Callbacks(
            suspend=suspender(kit),
            postcopy=ret(1),
            checkpoint=kill_in_checkpoint,
            switch_qemu_logdirty=ret(0),
        ),
    )
    holder["s"] = s
    exc = failed_save(kit, s, fd, StreamType.REMUS)
    assert exc.failure is Failure.SIGNALLED and "SIGKILL" in str(exc)
    assert "complete" not in exc.result.callbacks()


def test_stdin_closed_while_waiting_exits_254(kit: Kit, tmp_path: Path) -> None:
    kit.domain(DOMID)
    kit.running(DOMID)
    fd, _ = save_file(tmp_path)
    holder: dict[str, HelperSession] = {}

    async def close_stdin() -> int:
        h = holder["s"].helper
        assert h is not None
        h.close_replies()
        return 1

    s = HelperSession(Mode.SAVE, Callbacks(suspend=close_stdin, switch_qemu_logdirty=ret(0)))
    holder["s"] = s
    exc = failed_save(kit, s, fd)
    assert exc.failure is Failure.STDIN_CLOSED and exc.result.exit_status == 254


def test_sigterm_on_a_blocked_save_cleans_up_and_completes(kit: Kit) -> None:
    kit.domain(DOMID, pages=64)
    kit.running(DOMID)
    r, w = os.pipe()  # nobody reads: the helper blocks writing page data

    async def go() -> HelperResult:
        s = HelperSession(Mode.SAVE, Callbacks(suspend=suspender(kit), switch_qemu_logdirty=ret(0)))
        task = asyncio.create_task(
            s.run(w, -1, SaveArgs(DOMID, s.cbflags), helper=kit.helper, extra_env=kit.env)
        )
        await asyncio.sleep(1.0)
        await s.abort()
        return await task

    res = asyncio.run(go())
    os.close(r)
    os.close(w)
    assert res.trace == [
        ("switch_qemu_logdirty", (DOMID, 1), 0),
        ("switch_qemu_logdirty", (DOMID, 0), 0),
        ("complete", (-1, errno.EBADF), 0),
    ]


def test_missing_callbacks_abort_like_libxc(kit: Kit, tmp_path: Path) -> None:
    kit.domain(DOMID)
    fd, _ = save_file(tmp_path)

    s = HelperSession(Mode.SAVE, Callbacks(suspend=ret(1), switch_qemu_logdirty=ret(0)))
    exc = failed_save(kit, s, fd, StreamType.REMUS)  # REMUS without postcopy/checkpoint
    assert exc.failure is Failure.SIGNALLED and "SIGABRT" in str(exc)
    assert "Assertion `callbacks->checkpoint && callbacks->postcopy' failed" in exc.result.stderr


def test_startup_failure_exits_255_without_complete(kit: Kit, tmp_path: Path) -> None:
    fd, _ = save_file(tmp_path)
    env = {"REMUS_SIM_HOST": str(tmp_path / "nowhere")} if kit.kind == "sim" else {}

    s = HelperSession(
        Mode.SAVE, Callbacks(suspend=ret(1), switch_qemu_logdirty=ret(0)), record_frames=True
    )
    # the real helper without the stand-in: no hypervisor, xc_interface_open fails
    exc = failed_save(kit, s, fd, env=env)
    assert exc.failure is Failure.STARTUP and exc.result.exit_status == 255
    assert exc.result.logs[-1].text == "xc_interface_open failed"
    if kit.kind == "real":  # the capture in the notes, 2.7
        assert (
            bytes.fromhex("5200 0100 08000000 02000000 08000000")
            + b"xencall\0"
            + bytes.fromhex("38000000")
            + b"Could not obtain handle on privileged command interface\0"
        ) in exc.result.frames


def test_helper_missing(tmp_path: Path) -> None:
    async def go() -> None:
        s = HelperSession(Mode.SAVE, Callbacks(suspend=ret(1)))
        await s.run(0, -1, SaveArgs(DOMID, s.cbflags), helper=str(tmp_path / "nope"))

    with pytest.raises(FileNotFoundError):
        asyncio.run(go())
    from orchestrator.savehelper import find_helper

    with pytest.raises(HelperNotFound, match="is not an executable"):
        find_helper({"LIBXL_SAVE_HELPER": str(tmp_path / "nope")})
    with pytest.raises(HelperNotFound, match="not in PATH"):
        find_helper({"LIBXL_SAVE_HELPER": "no-such-helper", "PATH": str(tmp_path)})
    if REAL_HELPER.exists():
        assert find_helper({}) == str(REAL_HELPER)


def test_each_helper_restores_the_others_stream(standin: Path, tmp_path: Path) -> None:
    """Interoperability: what the real helper saves, ours restores, and back."""
    kits = {}
    for kind, helper, env in (
        ("real", str(REAL_HELPER), {"LD_PRELOAD": str(standin)}),
        ("sim", str(Path(os.sys.executable).parent / "remus-sim-save-helper"), {}),
    ):
        host = tmp_path / kind
        (host / "domains").mkdir(parents=True)
        k = Kit(kind, helper, host, dict(env))
        if kind == "sim":
            k.env["REMUS_SIM_HOST"] = str(host)
        kits[kind] = k
    streams = {}
    for kind, k in kits.items():
        k.domain(DOMID, pages=6)
        k.running(DOMID)
        fd, path = save_file(tmp_path / kind)
        asyncio.run(run_save(k, Callbacks(suspend=suspender(k), switch_qemu_logdirty=ret(0)), fd))
        os.close(fd)
        streams[kind] = path
    for kind, other in (("sim", "real"), ("real", "sim")):
        k = kits[kind]
        k.domain(11, pages=8)
        fd = os.open(streams[other], os.O_RDONLY)

        async def go(k: Kit = k, fd: int = fd) -> HelperResult:
            s = HelperSession(Mode.RESTORE, Callbacks(static_data_done=ret(0)))
            return await s.run(fd, -1, RestoreArgs(11, s.cbflags), helper=k.helper, extra_env=k.env)

        r = asyncio.run(go())
        os.close(fd)
        assert r.retval == 0, (kind, other, [x.text for x in r.logs])
    for k in kits.values():
        for d in k.domains.values():
            d.close()


def test_streams_written_by_both_helpers_verify(kit: Kit, tmp_path: Path) -> None:
    kit.domain(DOMID, pages=5, dtype="pv")
    kit.running(DOMID)
    fd, path = save_file(tmp_path)
    asyncio.run(run_save(kit, Callbacks(suspend=suspender(kit), switch_qemu_logdirty=ret(0)), fd))
    os.close(fd)
    with open(path, "rb") as f:
        try:
            s = verify_file(f, StreamDecoder(Layer.LIBXC))
        except StreamError as exc:  # pragma: no cover - the message is the point
            pytest.fail(str(exc))
    assert s.domain_type == "X86_PV"
