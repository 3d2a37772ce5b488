"""The shared protection session: typed errors on a wrong ACK digest, and on a lost peer."""

from __future__ import annotations

import asyncio
import socket

from orchestrator.hypervisors.sim import SimHypervisor
from orchestrator.protection.remus import RemusPrimary, RemusSecondary
from orchestrator.protection.session import RECENT, PeerLost, PrimaryLink, ack_digest
from orchestrator.protection.spec import ProtectionSpec
from orchestrator.transport.control import Ack

from .test_remus_loop import SETTINGS, pair, wait_for


class Liar(RemusSecondary):
    """ACKs every checkpoint with a digest of something else."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

        async def wrong_ack(seq: int, _digest: bytes) -> None:
            self.link.ctl.send(Ack(seq, ack_digest(seq + 1, None)))
            await self.link.ctl.drain()

        self.link.ack = wrong_ack  # type: ignore[method-assign]


def test_a_wrong_ack_digest_ends_replication_and_the_guest_runs_on(
    hosts: tuple[SimHypervisor, SimHypervisor],
) -> None:
    a, b = hosts
    info = a.create_domain("web", memory_mib=16)

    async def go() -> None:
        s_p, s_s = socket.socketpair()
        c_p, c_s = await pair()
        primary = RemusPrimary(a, info, s_p, c_p, SETTINGS)
        secondary = Liar(b, s_s, c_s, SETTINGS, name="web")
        s_task = asyncio.create_task(secondary.run())
        figures = await asyncio.wait_for(primary.run(), 30)
        assert figures.state == "unprotected"
        assert "ACK digest" in figures.reason and "applied something else" in figures.reason
        assert figures.checkpoints == 0  # nothing was committed on a wrong ACK
        assert a.lookup("web").state == "running"  # resumed: the guest carries on here
        s_p.close()
        c_p.close()
        await asyncio.gather(s_task, return_exceptions=True)

    asyncio.run(go())


def test_every_waiter_gets_peer_lost_when_the_control_connection_closes() -> None:
    async def go() -> None:
        c_p, c_s = await pair()
        lost: list[str] = []

        async def on_lost(reason: str) -> None:
            lost.append(reason)

        link = PrimaryLink(c_p, ProtectionSpec("x", ack_timeout_ms=5000), on_lost=on_lost)
        from orchestrator.transport.control import Hello, Role

        c_s.set_role(Role.SECONDARY)
        peer = asyncio.create_task(c_s.hello(Hello("secondary"), 5))
        await link.open(Hello("x"))
        await peer
        fut = link.expect(1)
        c_s.close()  # the secondary goes away with checkpoint 1 in flight
        try:
            await link.reply(fut, 1, 5.0)
        except PeerLost as exc:
            assert str(exc)  # closed or reset: either way it says so
        else:
            raise AssertionError("a waiter outlived its connection")
        await wait_for(lambda: bool(lost))
        assert link.expect(2).exception() is not None  # and nothing waits after it
        link.close()

    asyncio.run(go())


def test_recent_samples_are_bounded() -> None:
    from orchestrator.protection.session import Figures

    f = Figures()
    for i in range(10 * RECENT):
        f.record_pause(i * 1e-4)
        f.ack_lags.append(0.001)
        f.record_pages(i)
    assert len(f.pauses) == len(f.ack_lags) == len(f.dirty_pages) == RECENT
    assert sum(f.pause_counts) == 10 * RECENT  # the histogram stays cumulative
