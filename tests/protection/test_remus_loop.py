"""The Remus replication loop on two simulated hosts, with real helpers and sockets."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Any

import pytest

from orchestrator.hypervisors.base import DomainInfo
from orchestrator.hypervisors.sim import SimHypervisor
from orchestrator.protection.remus import RemusPrimary, RemusSecondary
from orchestrator.protection.session import ReplicationError
from orchestrator.protection.spec import ProtectionSpec
from orchestrator.transport.controlio import Control

SETTINGS = ProtectionSpec(
    "web", interval_ms=50, ack_timeout_ms=2000, heartbeat_interval_ms=20, heartbeat_timeout_ms=300
)


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


@dataclass
class Link:
    """A primary and a secondary joined by socketpairs, both running."""

    primary: RemusPrimary
    secondary: RemusSecondary
    p_task: asyncio.Task[Any]
    s_task: asyncio.Task[Any]
    sockets: tuple[socket.socket, socket.socket, Control, Control]


async def start(a: SimHypervisor, b: SimHypervisor, info: DomainInfo, name: str | None) -> Link:
    s_primary, s_secondary = socket.socketpair()
    c_primary, c_secondary = await pair()
    primary = RemusPrimary(a, info, s_primary, c_primary, SETTINGS)
    secondary = RemusSecondary(b, s_secondary, c_secondary, SETTINGS, name=name)
    link = Link(
        primary,
        secondary,
        asyncio.create_task(primary.run()),
        asyncio.create_task(secondary.run()),
        (s_primary, s_secondary, c_primary, c_secondary),
    )
    await wait_for(lambda: primary.figures.checkpoints >= 3)
    return link


def test_failover_keeps_every_checkpointed_write(
    hosts: tuple[SimHypervisor, SimHypervisor],
) -> None:
    a, b = hosts
    info = a.create_domain("web", memory_mib=16)

    async def go() -> None:
        link = await start(a, b, info, "web")
        primary, secondary = link.primary, link.secondary
        s_primary, _, c_primary, _ = link.sockets
        assert set(await kv(info.address, [b"PUT k%d v%d" % (i, i) for i in range(500)])) == {b"OK"}
        done = primary.figures.checkpoints
        await wait_for(lambda: primary.figures.checkpoints >= done + 2)
        # the primary host dies: its helper, its sockets, its control channel
        assert primary.session is not None and primary.session.helper is not None
        primary.session.helper.process.kill()
        s_primary.close()
        c_primary.close()
        link.p_task.cancel()
        restored = await asyncio.wait_for(link.s_task, 20)
        assert restored.state == "running" and secondary.figures.state == "failed-over"
        got = await kv(restored.address, [b"GET k%d" % i for i in range(500)])
        assert got == [b"VALUE v%d" % i for i in range(500)]
        assert secondary.figures.checkpoints >= done + 1
        assert max(primary.figures.dirty_pages) > 0  # the writes showed up as dirty pages

    asyncio.run(go())


def test_secondary_death_leaves_the_primary_running(
    hosts: tuple[SimHypervisor, SimHypervisor],
) -> None:
    a, b = hosts
    info = a.create_domain("web", memory_mib=16)

    async def go() -> None:
        link = await start(a, b, info, None)
        _, s_secondary, _, c_secondary = link.sockets
        link.s_task.cancel()
        c_secondary.close()
        s_secondary.close()
        status = await asyncio.wait_for(link.p_task, 20)
        assert status.state == "unprotected" and status.reason
        assert a.lookup("web").state == "running"
        assert await kv(info.address, [b"PUT after yes", b"GET after"]) == [b"OK", b"VALUE yes"]
        with pytest.raises(asyncio.CancelledError):
            await link.s_task

    asyncio.run(go())


def _fake_primary_stream(checkpoints: int, cut_in_checkpoint: int | None, where: str) -> bytes:
    """A Remus stream (libxl layer) as a primary writes it, optionally cut short."""
    from orchestrator.streams import Layer, StreamType, libxc
    from orchestrator.streams.synth import SynthSpec, generate

    spec = SynthSpec(
        domain_type=libxc.DomainType.X86_PV,
        pages=64,
        stream_type=StreamType.REMUS,
        checkpoints=checkpoints,
        dirty_pages=8,
        top_layer=Layer.LIBXL,
    )
    data = b"".join(bytes(c) for c in generate(spec))
    if cut_in_checkpoint is None:
        return data
    # find the records of checkpoint N: cut inside its first PAGE_DATA ("libxc")
    # or between its CHECKPOINT and CHECKPOINT_END ("libxl")
    import io

    from orchestrator.streams import Record, StreamDecoder
    from orchestrator.streams.fileio import iter_events

    n = 0
    for ev in iter_events(io.BytesIO(data), StreamDecoder()):
        if not isinstance(ev, Record):
            continue
        if ev.name.startswith("CHECKPOINT_END"):
            n += 1
        elif n == cut_in_checkpoint - 1 and where == "libxc" and ev.name.startswith("PAGE_DATA"):
            return data[: ev.offset + 100]
        elif n == cut_in_checkpoint - 1 and where == "libxl" and ev.name.startswith("CHECKPOINT "):
            return data[: ev.offset + 8]
    raise AssertionError("cut point not found")


@pytest.mark.parametrize("where", ["libxc", "libxl"])
def test_link_cut_mid_checkpoint_fails_over_to_the_previous_one(
    hosts: tuple[SimHypervisor, SimHypervisor], where: str
) -> None:
    from orchestrator.transport.control import Ack, Hello

    _, b = hosts
    data = _fake_primary_stream(checkpoints=4, cut_in_checkpoint=3, where=where)

    async def go() -> None:
        s_fake, s_secondary = socket.socketpair()
        c_fake, c_secondary = await pair()
        secondary = RemusSecondary(b, s_secondary, c_secondary, SETTINGS, name="cut")
        task = asyncio.create_task(secondary.run())
        config = {
            "c_info": {"name": "cut", "type": "pv", "uuid": "0" * 32},
            "b_info": {"max_memkb": 1024},
        }
        await c_fake.hello(Hello("cut", config), 5)
        await asyncio.to_thread(s_fake.sendall, data)
        acks = []
        c_fake.conn.checkpoint_sent(1)  # the codec lets in only the ACK in flight
        while len(acks) < 2:
            ev = await asyncio.wait_for(c_fake.next(), 10)
            if isinstance(ev, Ack):
                acks.append(ev.seq)
                if len(acks) < 2:
                    c_fake.conn.checkpoint_sent(ev.seq + 1)
        s_fake.close()  # the link is cut mid-checkpoint
        c_fake.close()
        restored = await asyncio.wait_for(task, 20)
        assert acks == [1, 2] and secondary.figures.checkpoints == 2
        assert restored.state == "running"

    asyncio.run(go())


def test_garbage_where_the_libxc_stream_should_start_creates_nothing(
    hosts: tuple[SimHypervisor, SimHypervisor],
) -> None:
    from orchestrator.streams import libxl
    from orchestrator.transport.control import Hello

    _, b = hosts

    async def go() -> None:
        s_fake, s_secondary = socket.socketpair()
        c_fake, c_secondary = await pair()
        secondary = RemusSecondary(b, s_secondary, c_secondary, SETTINGS, name="bad")
        task = asyncio.create_task(secondary.run())
        config = {"c_info": {"name": "bad", "type": "pv"}, "b_info": {"max_memkb": 1024}}
        await c_fake.hello(Hello("bad", config), 5)
        # CHECKPOINT_END with no checkpoint, where libxc's image header belongs
        await asyncio.to_thread(
            s_fake.sendall,
            libxl.Header().encode() + libxl.LIBXC_CONTEXT_RECORD + libxl.CHECKPOINT_END_RECORD,
        )
        s_fake.close()
        with pytest.raises(ReplicationError, match=r"no complete checkpoint|restore helper failed"):
            await asyncio.wait_for(task, 20)
        c_fake.close()

    asyncio.run(go())
    assert b.list_domains() == []
