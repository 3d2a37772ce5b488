"""The COLO network adapter's queues stay bounded while a checkpoint is under way.

No NFQUEUE or sockets here: the adapter is built but not set up, and fed
packets and reports the way its NFQUEUE callback and the control channel
would feed it.
"""

from __future__ import annotations

from orchestrator.devices import colo_net
from orchestrator.devices.colo_net import MAX_AFTER_MARK, ColoNetPrimary
from orchestrator.transport.control import Event, SvmOutput


class FakePacket:
    """What netfilterqueue hands the callback: a payload and a verdict to give."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.verdict: str | None = None

    def get_payload(self) -> bytes:
        return self.payload

    def accept(self) -> None:
        self.verdict = "accept"

    def drop(self) -> None:
        self.verdict = "drop"


def _primary() -> tuple[ColoNetPrimary, list[Event]]:
    sent: list[Event] = []
    return ColoNetPrimary("vif-test", sent.append, lambda _why: None, 1.0), sent


def test_packets_while_marked_are_bounded() -> None:
    net, _ = _primary()
    net.suspended(1)
    pkts = [FakePacket(b"\x45not tcp") for _ in range(MAX_AFTER_MARK + 10)]
    for p in pkts:
        net._on_output(p)
    assert len(net._after_mark) == MAX_AFTER_MARK
    assert net.dropped_after_mark == 10
    assert all(p.verdict == "drop" for p in pkts[MAX_AFTER_MARK:])
    assert all(p.verdict is None for p in pkts[:MAX_AFTER_MARK])
    # the checkpoint's end takes them all on (non-TCP: held to the next checkpoint)
    net.checkpoint_done(1, first=True)
    assert not net._after_mark and net.comparer.held_packets == MAX_AFTER_MARK


def test_early_reports_are_bounded_in_bytes() -> None:
    net, _ = _primary()
    net.comparer.max_buffer = 10_000
    for i in range(50):
        net.secondary_output(SvmOutput(40000, 80, 5, i * 1000, b"x" * 1000))
    assert len(net._early) == 10 and net.dropped_early_reports == 40
    net.checkpoint_done(5, first=True)
    assert not net._early and net._early_bytes == 0


def test_early_reports_are_bounded_in_number() -> None:
    net, _ = _primary()
    for _ in range(colo_net.MAX_WAITING_REPORTS + 5):
        net.secondary_output(SvmOutput(40000, 80, 5, 0, b""))
    assert len(net._early) == colo_net.MAX_WAITING_REPORTS
    assert net.dropped_early_reports == 5
