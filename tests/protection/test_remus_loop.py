"""The Remus replication loop on two simulated hosts, with real helpers and sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.hypervisors.sim import SimHypervisor
from orchestrator.protection.remus import Control, RemusPrimary, RemusSecondary, RemusSettings

SETTINGS = RemusSettings(
    interval=0.05, ack_timeout=2.0, heartbeat_interval=0.02, heartbeat_timeout=0.3
)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[SimHypervisor, SimHypervisor]]:
    a, b = SimHypervisor(tmp_path / "A"), SimHypervisor(tmp_path / "B")
    yield a, b
    for hv in (a, b):
        for d in hv.list_domains():
            hv.destroy(d.domid)


async def kv(address: str, lines: list[bytes]) -> list[bytes]:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"".join(line + b"\n" for line in lines))
    out = [(await reader.readline()).rstrip(b"\n") for _ in lines]
    writer.close()
    return out


async def pair() -> tuple[Control, Control]:
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    return Control(ra, wa), Control(rb, wb)


async def wait_for(cond: object, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


def test_failover_keeps_every_checkpointed_write(
    hosts: tuple[SimHypervisor, SimHypervisor],
) -> None:
    a, b = hosts
    info = a.create_domain("web", memory_mib=16)

    async def go() -> None:
        s_primary, s_secondary = socket.socketpair()
        c_primary, c_secondary = await pair()
        primary = RemusPrimary(a, info, s_primary, c_primary, SETTINGS)
        secondary = RemusSecondary(b, s_secondary, c_secondary, SETTINGS, name="web")
        p_task = asyncio.create_task(primary.run())
        s_task = asyncio.create_task(secondary.run())
        await wait_for(lambda: primary.status.checkpoints >= 3)
        assert set(await kv(info.address, [b"PUT k%d v%d" % (i, i) for i in range(500)])) == {b"OK"}
        done = primary.status.checkpoints
        await wait_for(lambda: primary.status.checkpoints >= done + 2)
        # the primary host dies: its helper, its sockets, its control channel
        assert primary.session is not None and primary.session.helper is not None
        primary.session.helper.process.kill()
        s_primary.close()
        c_primary.close()
        p_task.cancel()
        restored = await asyncio.wait_for(s_task, 20)
        assert restored.state == "running" and secondary.status.state == "failed-over"
        got = await kv(restored.address, [b"GET k%d" % i for i in range(500)])
        assert got == [b"VALUE v%d" % i for i in range(500)]
        assert secondary.status.checkpoints >= done + 1

    asyncio.run(go())


def test_secondary_death_leaves_the_primary_running(
    hosts: tuple[SimHypervisor, SimHypervisor],
) -> None:
    a, b = hosts
    info = a.create_domain("web", memory_mib=16)

    async def go() -> None:
        s_primary, s_secondary = socket.socketpair()
        c_primary, c_secondary = await pair()
        primary = RemusPrimary(a, info, s_primary, c_primary, SETTINGS)
        secondary = RemusSecondary(b, s_secondary, c_secondary, SETTINGS)
        p_task = asyncio.create_task(primary.run())
        s_task = asyncio.create_task(secondary.run())
        await wait_for(lambda: primary.status.checkpoints >= 2)
        s_task.cancel()
        c_secondary.close()
        s_secondary.close()
        status = await asyncio.wait_for(p_task, 20)
        assert status.state == "stopped" and status.reason
        assert a.lookup("web").state == "running"
        assert await kv(info.address, [b"PUT after yes", b"GET after"]) == [b"OK", b"VALUE yes"]
        with pytest.raises(asyncio.CancelledError):
            await s_task

    asyncio.run(go())
