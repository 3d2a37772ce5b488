"""COLO on two simulated hosts with real helpers and sockets: both copies run, each
checkpoint makes the secondary's memory equal to the primary's (sha256 of both,
compared at every checkpoint), the secondary's own writes are sent back and
overwritten (the union), and failover needs no restore."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time

import pytest

from orchestrator.hypervisors.sim import SimHypervisor
from orchestrator.protection.colo import (
    ColoPrimary,
    ColoSecondary,
    write_checkpoint_state,
)
from orchestrator.protection.colo_protocol import Reason
from orchestrator.protection.spec import Mode, ProtectionSpec
from orchestrator.streams import libxl
from orchestrator.streams.libxl import CheckpointState

from ..guestclient import kv as kv_sync
from .test_cli_remus import remusctl, start_receiver, wait_checkpoints
from .test_remus_loop import kv, pair, wait_for

SETTINGS = ProtectionSpec(
    "web",
    mode=Mode.COLO,
    interval_ms=50,
    ack_timeout_ms=5000,
    heartbeat_interval_ms=20,
    heartbeat_timeout_ms=500,
    checkpoint_max_interval_ms=200,
    verify_memory=True,
)


def test_memories_equal_at_every_checkpoint_and_failover_without_restore(
    hosts: tuple[SimHypervisor, SimHypervisor],
) -> None:
    a, b = hosts
    info = a.create_domain("web", memory_mib=16, dirty_rate=200)

    async def go() -> None:
        s_p, s_s = socket.socketpair()
        c_p, c_s = await pair()
        primary = ColoPrimary(a, info, s_p, c_p, SETTINGS)
        secondary = ColoSecondary(b, s_s, c_s, SETTINGS, name="web")
        p_task = asyncio.create_task(primary.run())
        s_task = asyncio.create_task(secondary.run())
        await wait_for(lambda: primary.figures.checkpoints >= 2)
        assert secondary.running, "the secondary copy runs after the first checkpoint"
        await wait_for(lambda: b.lookup("web").state == "running")  # between checkpoints
        svm = b.lookup("web")
        # the secondary copy's own writes (its output never leaves its host, so
        # they are made here as its guest would make them: page written, then
        # marked) are undone by the next checkpoint: the union was sent
        sdom = b.disk_of(svm.domid)
        page = sdom.pages - 1
        sdom.memory[page * 4096 : page * 4096 + 8] = b"SVM-ONLY"
        sdom.dirty[page] = 1
        for i in range(20):
            assert await kv(info.address, [f"PUT k{i} v{i}".encode()]) == [b"OK"]
        before = primary.figures.checkpoints
        primary.request_checkpoint(Reason.DIVERGENCE)
        await wait_for(lambda: primary.figures.checkpoints >= before + 3)
        st, colo = primary.figures, primary.colo
        assert colo.memory_verified == st.checkpoints, "a checkpoint whose memories differed"
        assert (colo.checkpoints_by_divergence or 0) >= 1 and (colo.checkpoints_by_timer or 0) >= 1
        assert bytes(sdom.memory[page * 4096 : page * 4096 + 8]) != b"SVM-ONLY"
        # the primary dies: the secondary is already running, so failover is quick
        p_task.cancel()
        await asyncio.gather(p_task, return_exceptions=True)
        s_p.close()
        c_p.writer.close()
        t0 = asyncio.get_running_loop().time()
        out = await asyncio.wait_for(s_task, 10)
        took = asyncio.get_running_loop().time() - t0
        assert out.name == "web" and out.state == "running"
        assert secondary.figures.state == "failed-over"
        for i in (0, 19):
            assert await kv(out.address, [f"GET k{i}".encode()]) == [f"VALUE v{i}".encode()]
        print(f"\nCOLO: {st.checkpoints} checkpoints, memories equal; failover {took * 1e3:.0f} ms")
        s_s.close()
        c_s.writer.close()
        # the secondary's memory matched the primary's at the last checkpoint; now
        # the two run apart, so only check the digest is computable
        assert len(b.memory_digest(out.domid)) == 32

    asyncio.run(go())


FAST_FAIL = SETTINGS.with_(ack_timeout_ms=1000, verify_memory=False)


class OutOfOrder(ColoSecondary):
    """Answers the primary's second checkpoint with SVM_READY where SVM_SUSPENDED belongs."""

    async def _suspend(self) -> int:
        assert self.target is not None
        await self.hv.suspend(self.target.domid)
        self._svm_suspended = True
        write_checkpoint_state(self.stream, CheckpointState.SVM_READY)
        return 1


class GarbageBackChannel(ColoSecondary):
    """Writes a libxl END record on the back channel instead of SVM_SUSPENDED."""

    async def _suspend(self) -> int:
        assert self.target is not None
        await self.hv.suspend(self.target.domid)
        self._svm_suspended = True
        self.stream.sendall(libxl.END_RECORD)
        return 1


class Silent(ColoSecondary):
    """Stops answering at the second checkpoint: never suspends, never writes."""

    async def _suspend(self) -> int:
        await asyncio.sleep(3600)
        return 1


@pytest.mark.parametrize(
    ("secondary_cls", "reason"),
    [
        (OutOfOrder, "not expected in phase await-svm-suspended"),
        (GarbageBackChannel, "expected a CHECKPOINT_STATE record, got type 0"),
        (Silent, "no CHECKPOINT_STATE from the secondary in 1 s"),
    ],
)
def test_a_misbehaving_secondary_ends_colo_and_the_primary_serves_on(
    hosts: tuple[SimHypervisor, SimHypervisor], secondary_cls: type[ColoSecondary], reason: str
) -> None:
    a, b = hosts
    info = a.create_domain("web", memory_mib=16)

    async def go() -> None:
        s_p, s_s = socket.socketpair()
        c_p, c_s = await pair()
        primary = ColoPrimary(a, info, s_p, c_p, FAST_FAIL)
        secondary = secondary_cls(b, s_s, c_s, FAST_FAIL, name="web")
        p_task = asyncio.create_task(primary.run())
        s_task = asyncio.create_task(secondary.run())
        status = await asyncio.wait_for(p_task, 30)
        assert status.state == "unprotected"
        assert reason in status.reason, status.reason
        assert status.checkpoints >= 1  # the first checkpoint worked
        # the primary's copy runs and serves
        assert a.lookup("web").state == "running"
        assert await kv(info.address, [b"PUT after ok"]) == [b"OK"]
        if secondary_cls is Silent:  # hung in a callback: it hears nothing any more
            s_task.cancel()
            await asyncio.gather(s_task, return_exceptions=True)
        else:  # it was told to drop its copy: never two running copies
            out = await asyncio.wait_for(asyncio.gather(s_task, return_exceptions=True), 30)
            assert isinstance(out[0], BaseException), out
            assert "web" not in {d.name for d in b.list_domains()}
        for s in (s_p, s_s):
            s.close()
        c_p.writer.close()
        c_s.writer.close()

    asyncio.run(go())


def test_colo_from_the_cli_primary_killed_secondary_already_serving(
    hosts: tuple[SimHypervisor, SimHypervisor],
) -> None:
    """`remusctl protect --colo` and `remusctl receive` as processes; the primary host
    dies (its protect process and its guest, SIGKILL); the secondary copy, which was
    running all along, serves every key written before the last checkpoint."""
    a, b = hosts
    info = a.create_domain("web", memory_mib=16)
    recv, port = start_receiver(b.host)
    prot = None
    try:
        prot = subprocess.Popen(
            remusctl(
                a.host,
                "protect",
                "--foreground",
                "--colo",
                "web",
                "--to",
                f"127.0.0.1:{port}",
                "--checkpoint-max-interval",
                "100",
                "--verify-memory",
            ),
            stderr=subprocess.PIPE,
            text=True,
        )
        row = wait_checkpoints(a.host, 2)
        assert row["mode"] == "colo"
        # the secondary copy runs before any failover (between its checkpoints: every
        # 0.1 s it is suspended for a moment to take one)
        deadline = time.monotonic() + 10
        while (svm := b.lookup("web")).state != "running" and time.monotonic() < deadline:
            time.sleep(0.005)
        assert svm.state == "running"
        for i in range(10):
            assert kv_sync(info.address, [f"PUT c{i} v{i}".encode()]) == [b"OK"]
        done = int(row["checkpoints"])  # type: ignore[call-overload]
        row = wait_checkpoints(a.host, done + 3)
        assert row["colo"]["memory_verified"] == row["checkpoints"], row  # type: ignore[index]
        t0 = time.monotonic()
        prot.kill()  # the primary host dies: protect and the guest with it
        a.destroy(info.domid)
        out, _ = recv.communicate(timeout=30)
        took = time.monotonic() - t0
        assert recv.returncode == 0 and "FAILOVER" in out, out
        for i in range(10):
            assert kv_sync(svm.address, [f"GET c{i}".encode()]) == [f"VALUE v{i}".encode()]
        print(f"\nCOLO CLI failover: {took * 1e3:.0f} ms after the kill")
    finally:
        for p in (prot, recv):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
