"""Network output buffering with NFQUEUE: the guest's packets held in userspace.

The kernel here has no ``sch_plug`` (what Xen's Remus uses), but it has
NFQUEUE. An iptables rule sends every packet that leaves the guest through
its vif (the host end of its veth) to a queue; this device reads them,
tags each with the current output epoch and holds it. When the secondary
acknowledges the checkpoint of an epoch, exactly the packets of that epoch
and older are accepted. A client therefore never sees a reply whose state
is not yet safe on the secondary. If this process dies, the kernel drops
what was queued: unacknowledged output is lost, never released.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from .base import CheckpointDevice


class NetbufUnavailable(Exception):
    pass


def nfqueue_available() -> str | None:
    """None if NFQUEUE buffering can work here, else why not."""
    try:
        import netfilterqueue  # noqa: F401
    except ImportError:
        return "the netfilterqueue package is not installed (needs libnetfilter-queue-dev)"
    if shutil.which("iptables") is None:
        return "iptables is not installed"
    return None


def remove_stale_rules(vif: str) -> None:
    """Drop NFQUEUE rules left for ``vif`` by a primary that was killed."""
    if shutil.which("iptables") is None:
        return
    listing = subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True)
    for line in listing.stdout.splitlines():
        words = line.split()
        if words[:1] == ["-A"] and f"{vif}" in words and "NFQUEUE" in words:
            subprocess.run(["iptables", "-w", "-D", *words[1:]], capture_output=True)


# Where a guest's output goes: to this host's own sockets (INPUT), or on through
# it to a client elsewhere (FORWARD: a routed guest network, as the simulated
# hosts of the partition tests have). Output held in one and not the other
# would reach routed clients before its checkpoint.
OUTPUT_CHAINS: Final = ("INPUT", "FORWARD")


class PacketQueue:
    """An NFQUEUE bound in this process and the iptables rules that feed it every
    packet ``vif`` sends (in each of :data:`OUTPUT_CHAINS`).

    Each packet goes to ``on_packet`` on the event loop; its verdict is the
    caller's (``accept()``/``drop()``), whenever it likes.
    """

    def __init__(self, vif: str, queue_num: int, on_packet: Callable[[Any], None]) -> None:
        self.queue_num = queue_num
        self._on_packet = on_packet
        self._nfq: Any = None
        self._vif = vif

    def _rules(self) -> list[list[str]]:
        target = ["-j", "NFQUEUE", "--queue-num", str(self.queue_num)]
        return [[chain, "-i", self._vif, *target] for chain in OUTPUT_CHAINS]

    def _iptables(self, op: str) -> subprocess.CompletedProcess[str]:
        """``op`` on every rule; the first failure is the answer (an insert that
        failed half way is undone)."""
        done: list[list[str]] = []
        for rule in self._rules():
            r = subprocess.run(["iptables", "-w", op, *rule], capture_output=True, text=True)
            if r.returncode and op == "-I":
                for d in done:
                    subprocess.run(["iptables", "-w", "-D", *d], capture_output=True)
                return r
            done.append(rule)
        return subprocess.CompletedProcess([], 0, "", "")

    def drain(self) -> None:
        """Take what the kernel has queued now (e.g. just after the guest stopped)."""
        if self._nfq is not None:
            self._nfq.run(block=False)

    async def open(self) -> None:
        why = nfqueue_available()
        if why:
            raise NetbufUnavailable(why)
        from netfilterqueue import NetfilterQueue

        self._nfq = NetfilterQueue()
        # queue numbers are per network namespace: another protection (or another
        # simulated host) may hold ours; take the next free one
        for attempt in range(256):
            try:
                self._nfq.bind(self.queue_num, self._on_packet, max_len=65536)
                break
            except OSError:
                if attempt == 255:
                    raise NetbufUnavailable("no free NFQUEUE number") from None
                self.queue_num = (self.queue_num + 1) % 65536
        # iptables takes its time on a busy host: not on the event loop, where it
        # would hold up the heartbeats the peer's failover watchdog counts on
        r = await asyncio.to_thread(self._iptables, "-I")
        if r.returncode:
            self._nfq.unbind()
            self._nfq = None
            raise NetbufUnavailable(f"iptables: {r.stderr.strip()}")
        asyncio.get_running_loop().add_reader(self._nfq.get_fd(), self.drain)

    def remove_rule(self) -> None:
        """Stop queueing new packets (those queued stay the caller's to decide)."""
        if self._nfq is not None:
            self._iptables("-D")

    def close(self) -> None:
        """Rule gone, queue unbound; call after deciding every held packet."""
        if self._nfq is None:
            return
        asyncio.get_running_loop().remove_reader(self._nfq.get_fd())
        self._nfq.unbind()
        self._nfq = None


class NfqueueNetbuf(CheckpointDevice):
    name = "netbuf-nfqueue"

    def __init__(self, vif: str, queue_num: int) -> None:
        self.vif = vif
        self.epoch = 0
        self.held: deque[tuple[int, Any]] = deque()
        self.released = 0
        self.max_held = 0
        self._queue = PacketQueue(vif, queue_num, self._on_packet)

    @property
    def queue_num(self) -> int:
        return self._queue.queue_num

    def _on_packet(self, pkt: Any) -> None:
        self.held.append((self.epoch, pkt))
        self.max_held = max(self.max_held, len(self.held))

    async def setup(self) -> None:
        await self._queue.open()

    async def postsuspend(self, epoch: int) -> None:
        # packets the guest sent before it stopped may still sit in the kernel queue
        self._queue.drain()
        self.epoch = epoch

    async def preresume(self) -> None:
        pass  # nothing to do: packets keep their epoch tags

    async def commit(self, epoch: int) -> None:
        while self.held and self.held[0][0] <= epoch:
            _, pkt = self.held.popleft()
            pkt.accept()
            self.released += 1

    @property
    def held_packets(self) -> int:
        return len(self.held)

    async def teardown(self, release: bool) -> None:
        self._queue.remove_rule()
        self._queue.drain()
        while self.held:
            _, pkt = self.held.popleft()
            if release:
                pkt.accept()
            else:
                pkt.drop()
        self._queue.close()
