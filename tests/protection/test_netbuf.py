"""NFQUEUE output buffering in the Remus loop: output waits for the ACK."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from orchestrator.devices.netbuf_nfqueue import NfqueueNetbuf, nfqueue_available
from orchestrator.devices.netbuf_proxy import ProxyNetbuf
from orchestrator.hypervisors.sim import SimHypervisor
from orchestrator.protection.remus import RemusPrimary, RemusSecondary
from orchestrator.protection.spec import ProtectionSpec
from orchestrator.transport.control import Ack
from orchestrator.transport.controlio import Control

NFQUEUE_SKIP = pytest.mark.skipif(
    os.geteuid() != 0 or nfqueue_available() is not None,
    reason="needs root (network namespaces, iptables) and NFQUEUE: "
    + (nfqueue_available() or "not root"),
)


async def control_pair() -> tuple[Control, Control]:
    x, y = socket.socketpair()
    rx, wx = await asyncio.open_connection(sock=x)
    ry, wy = await asyncio.open_connection(sock=y)
    return Control(rx, wx), Control(ry, wy)


@pytest.mark.parametrize("kind", [pytest.param("nfqueue", marks=NFQUEUE_SKIP), "proxy"])
def test_output_is_held_until_ack_and_released_when_replication_ends(
    hosts: tuple[SimHypervisor, SimHypervisor], tmp_path: Path, kind: str
) -> None:
    a, b = hosts
    if kind == "proxy":  # the unprivileged set-up: a loopback guest, clients via the proxy
        a = SimHypervisor(tmp_path / "loopA", use_netns=False)
    info = a.create_domain("web", memory_mib=16)
    settings = ProtectionSpec(
        "web",
        interval_ms=20,
        ack_timeout_ms=1500,
        heartbeat_interval_ms=20,
        heartbeat_timeout_ms=5000,
    )

    async def go() -> None:
        sp, ss = socket.socketpair()
        cp, cs = await control_pair()
        netbuf: NfqueueNetbuf | ProxyNetbuf
        if kind == "nfqueue":
            vif = a.vif_name(info.domid)
            assert vif is not None
            netbuf = NfqueueNetbuf(vif, 3000 + info.domid)
            service = info.address
        else:
            netbuf = ProxyNetbuf(info.address)
        primary = RemusPrimary(a, info, sp, cp, settings, [netbuf])
        secondary = RemusSecondary(b, ss, cs, settings)
        withhold = False
        real_send = cs.send

        def gated_send(event: Any) -> None:
            if not (withhold and isinstance(event, Ack)):
                real_send(event)

        cs.send = gated_send  # type: ignore[method-assign]
        p_task = asyncio.create_task(primary.run())
        s_task = asyncio.create_task(secondary.run())
        while primary.figures.checkpoints < 3:
            await asyncio.sleep(0.01)
        if kind == "proxy":
            service = netbuf.address  # type: ignore[union-attr]
        host, port = service.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"PUT a 1\n")
        assert await asyncio.wait_for(reader.readline(), 5) == b"OK\n"  # ACKs flow: released
        withhold = True
        writer.write(b"PUT b 2\n")
        reply = asyncio.create_task(reader.readline())
        with pytest.raises(TimeoutError):  # the reply is held: its checkpoint is not ACKed
            await asyncio.wait_for(asyncio.shield(reply), 0.5)
        status = await asyncio.wait_for(p_task, 15)
        assert "no ACK for checkpoint" in status.reason
        # replication is over: the held output goes out and the guest serves on here
        assert await asyncio.wait_for(reply, 5) == b"OK\n"
        writer.close()
        s_task.cancel()
        ss.close()
        with pytest.raises(BaseException):  # noqa: B017 - cancelled or failed, either ends it
            await s_task

    try:
        asyncio.run(go())
    finally:
        if kind == "proxy":
            for d in a.list_domains():
                a.destroy(d.domid)
