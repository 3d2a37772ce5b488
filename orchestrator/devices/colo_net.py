"""COLO's network half: the input mirror, the output comparer and the secondary's
output filter, as thin adapters over the sans-I/O parts of ``colo_compare``.

Primary (QEMU's filter-mirror + colo-compare):
  * an ``AF_PACKET`` socket on the guest's vif sees every packet the host sends
    into the guest (the client's input) without being in its path, and each is
    sent to the secondary in a MIRROR frame on the control channel;
  * NFQUEUE on the vif holds every packet the guest sends; the comparer
    releases a TCP packet as soon as the secondary guest produced the same
    bytes at the same stream offset, and asks for a checkpoint on a mismatch
    or when a packet has been held longer than the bound. A checkpoint
    releases what was held before the primary was suspended for it.
  * the primary guest's SYN-ACK numbers go to the secondary in a CONN frame
    before the SYN-ACK itself is released, so the client's first ACK can never
    overtake them.

Secondary (QEMU's filter-redirector + filter-rewriter):
  * mirrored packets are rewritten for the secondary guest (its own /30 link
    here; in Xen's COLO both copies have the same MAC and address) with its
    own sequence numbers, and sent into its namespace on a raw socket;
  * NFQUEUE on its vif takes every packet the secondary guest sends, reports
    TCP payload to the primary (SVM_OUTPUT, tagged with the last checkpoint it
    loaded) and drops it: the secondary's output never leaves its host, until
    failover removes the rule.

Epochs: secondary output produced before it loaded checkpoint k comes from a
state that k replaced, so once the primary has taken k it ignores such
output; output tagged k that arrives before the primary has seen k's LOADED
waits. Primary output produced after its resume for checkpoint k waits in
this adapter until k is done, so that k releases only what k covers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from ..transport.control import ConnInfo, Event, Mirror, NetSync, SvmOutput
from .colo_compare import (
    CheckpointNeeded,
    Inject,
    OutputComparer,
    Release,
    Report,
    Rewriter,
    syn_ack_info,
)
from .netbuf_nfqueue import PacketQueue

log = logging.getLogger(__name__)

ETH_P_IP: Final = 0x0800
ETH_P_ALL: Final = 0x0003  # the kernel shows a tap outgoing frames only with this
ETH_HLEN: Final = 14
PACKET_OUTGOING: Final = 4  # linux/if_packet.h: sent by this host
MAX_WAITING_REPORTS: Final = 100_000
# Primary packets taken from NFQUEUE while a checkpoint is under way: the guest
# runs again before the secondary has loaded it, and a stalled secondary must
# not grow us. Past it a packet is dropped, which TCP takes for a loss and
# retransmits; about what the kernel's own NFQUEUE queue holds by default.
MAX_AFTER_MARK: Final = 1024


def _wait_figures(waits: deque[float]) -> dict[str, float | None]:
    if not waits:  # nothing released on a match yet
        return {"compare_wait_ms_p50": None, "compare_wait_ms_p99": None}
    ordered = sorted(waits)
    return {
        "compare_wait_ms_p50": round(statistics.median(ordered) * 1e3, 3),
        "compare_wait_ms_p99": round(ordered[int(0.99 * (len(ordered) - 1))] * 1e3, 3),
    }


def _queue_number(vif: str, base: int) -> int:
    return base + sum(vif.encode()) % 1000


class ColoNetPrimary:
    def __init__(
        self,
        vif: str,
        send: Callable[[Event], None],
        want_checkpoint: Callable[[str], None],
        hold_bound: float,
        may_release: Callable[[], bool] = lambda: True,
    ) -> None:
        self.vif = vif
        # the lease's gate (protection/session.py `may_release`): asked at every
        # packet the comparer lets go, since COLO releases output between
        # checkpoints, not at commits the lease could gate once
        self._may_release = may_release
        # released by the comparer while the gate was shut, kept in order until it
        # opens again or the primary is fenced (then dropped); bounded like _after_mark
        self._gated: deque[Any] = deque()
        self.dropped_gated = 0
        self._send = send
        self._want = want_checkpoint
        self.comparer = OutputComparer(hold_bound)
        self.hold_bound = hold_bound
        self.epoch = 0  # the last checkpoint whose LOADED we took
        self.mirrored = 0
        self.mirrored_bytes = 0
        self.stale_reports = 0
        self.dropped_after_mark = 0
        self.dropped_early_reports = 0
        self._queue = PacketQueue(vif, _queue_number(vif, 2000), self._on_output)
        self._tap: socket.socket | None = None
        self._marked = False  # suspended for a checkpoint that is not done yet
        self._after_mark: deque[tuple[Any, bytes]] = deque()
        self._early: deque[SvmOutput] = deque()  # tagged with a checkpoint not yet taken
        self._early_bytes = 0
        self._ticker: asyncio.Task[None] | None = None

    # -- set-up and teardown --------------------------------------------------------

    async def setup(self) -> None:
        tap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            tap.bind((self.vif, ETH_P_ALL))
            tap.setblocking(False)
            tap.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            await self._queue.open()
        except BaseException:
            tap.close()
            raise
        self._tap = tap
        loop = asyncio.get_running_loop()
        loop.add_reader(tap.fileno(), self._on_input)
        self._ticker = asyncio.create_task(self._tick())

    async def teardown(self, release: bool = True) -> None:
        """COLO ends with the primary serving on alone: what was held goes out (as
        when Remus is unprotected), or, with ``release`` False, is dropped."""
        if self._ticker is not None:
            self._ticker.cancel()
        if self._tap is not None:
            asyncio.get_running_loop().remove_reader(self._tap.fileno())
            self._tap.close()
            self._tap = None
        self._queue.remove_rule()
        self._queue.drain()
        self._marked = False
        self._act(self.comparer.checkpoint_done(), release)
        while self._after_mark:
            handle, _ = self._after_mark.popleft()
            self._let_go(handle) if release else handle.drop()
        if not release or not self._open_gate():
            while self._gated:  # fenced: never covered by a valid lease
                self._gated.popleft().drop()
        self._queue.close()

    # -- packets ----------------------------------------------------------------------

    def _on_input(self) -> None:
        assert self._tap is not None
        while True:
            try:
                frame, addr = self._tap.recvfrom(65536 + ETH_HLEN)
            except BlockingIOError:
                return
            if addr[2] != PACKET_OUTGOING or len(frame) <= ETH_HLEN or addr[1] != ETH_P_IP:
                continue  # the guest's own output seen on the way in, or not IPv4
            packet = frame[ETH_HLEN:]
            self.mirrored += 1
            self.mirrored_bytes += len(packet)
            self._send(Mirror(packet))

    def _on_output(self, pkt: Any) -> None:
        data = pkt.get_payload()
        info = syn_ack_info(data)
        if info is not None:
            (cport, gport), isn, tsval = info
            self._send(ConnInfo(cport, gport, isn, tsval or 0))
        if self._marked:
            if len(self._after_mark) >= MAX_AFTER_MARK:
                pkt.drop()
                self.dropped_after_mark += 1
                return
            self._after_mark.append((pkt, data))
            return
        self._act(self.comparer.primary_packet(pkt, data, time.monotonic()))

    def secondary_output(self, report: SvmOutput) -> None:
        if report.epoch < self.epoch:
            self.stale_reports += 1
            return
        if report.epoch > self.epoch:
            # the comparer would hold no more than max_buffer of them either; one
            # dropped means no match for those bytes, so a checkpoint, never a wrong one
            size = len(report.payload)
            if (
                len(self._early) < MAX_WAITING_REPORTS
                and self._early_bytes + size <= self.comparer.max_buffer
            ):
                self._early.append(report)
                self._early_bytes += size
            else:
                self.dropped_early_reports += 1
            return
        key = (report.client_port, report.guest_port)
        self._act(
            self.comparer.secondary_output(key, report.offset, report.payload, time.monotonic())
        )

    def _act(self, actions: list[Any], release: bool = True) -> None:
        for action in actions:
            if isinstance(action, Release):
                pkt: Any = action.handle  # a netfilterqueue packet
                self._let_go(pkt) if release else pkt.drop()
            elif isinstance(action, CheckpointNeeded):
                self._want(action.reason)

    def _open_gate(self) -> bool:
        """Whether output may leave now; what waited behind a shut gate goes first."""
        if not self._may_release():
            return False
        while self._gated:
            self._gated.popleft().accept()
        return True

    def _let_go(self, pkt: Any) -> None:
        if self._open_gate():
            pkt.accept()
        elif len(self._gated) < MAX_AFTER_MARK:
            self._gated.append(pkt)
        else:  # TCP takes it for a loss; the fence that follows drops the rest
            pkt.drop()
            self.dropped_gated += 1

    async def _tick(self) -> None:
        every = max(0.002, self.hold_bound / 4)
        while True:
            await asyncio.sleep(every)
            if self._gated:
                self._open_gate()
            if not self._marked:
                self._act(self.comparer.tick(time.monotonic()))

    # -- checkpoints ------------------------------------------------------------------

    def suspended(self, seq: int) -> None:
        """The primary guest is suspended for checkpoint ``seq``: all it sent is in
        the queue now, and that is what the checkpoint will release; the secondary
        learns where each connection's output stands, to continue from there."""
        self._queue.drain()
        self._marked = True
        ends = self.comparer.primary_ends()
        self._send(NetSync(seq, tuple((cp, gp, end) for (cp, gp), end in ends.items())))

    def checkpoint_done(self, seq: int, first: bool) -> None:
        """The secondary loaded checkpoint ``seq``: release what it covers, then
        compare what came after it."""
        if first:
            self.comparer.comparing = True  # the secondary copy runs from now on
        self.epoch = seq
        self._marked = False
        self._act(self.comparer.checkpoint_done())
        now = time.monotonic()
        while self._after_mark:
            handle, data = self._after_mark.popleft()
            self._act(self.comparer.primary_packet(handle, data, now))
        early, self._early = self._early, deque()
        self._early_bytes = 0
        for report in early:
            self.secondary_output(report)

    def figures(self, now: float | None = None) -> dict[str, Any]:
        c = self.comparer
        now = time.monotonic() if now is None else now
        return {
            "compared_packets": c.compared_packets,
            "matched_bytes": c.matched_bytes,
            "mismatches": c.mismatches,
            "released_at_once": c.released_at_once,
            "released_at_checkpoint": c.released_at_checkpoint,
            "held_packets": c.held_packets + len(self._after_mark) + len(self._gated),
            "oldest_held_ms": round(c.oldest_held_age(now) * 1e3, 3),
            "mirrored_packets": self.mirrored,
            "mirrored_bytes": self.mirrored_bytes,
            **_wait_figures(c.match_waits),
        }


class ColoNetSecondary:
    def __init__(
        self, vif: str, host_ip: str, guest_ip: str, send: Callable[[Event], None]
    ) -> None:
        self.vif, self.guest_ip = vif, guest_ip
        self._send = send
        self.rewriter = Rewriter(socket.inet_aton(guest_ip), socket.inet_aton(host_ip))
        self.epoch = 0  # the last checkpoint loaded into our copy
        self.inject_errors = 0
        self._queue = PacketQueue(vif, _queue_number(vif, 3000), self._on_output)
        self._raw: socket.socket | None = None
        self.filtering = False
        self._syncs: dict[int, NetSync] = {}

    async def setup(self) -> None:
        """Before the secondary copy first runs: from then on none of its output
        leaves this host until failover."""
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        raw.setblocking(False)
        try:
            await self._queue.open()
        except BaseException:
            raw.close()
            raise
        self._raw = raw
        self.filtering = True

    def _on_output(self, pkt: Any) -> None:
        data = pkt.get_payload()
        pkt.drop()
        self._act(self.rewriter.secondary_output(data))

    def mirrored(self, frame: Mirror) -> None:
        if self._raw is not None:
            self._act(self.rewriter.mirrored(frame.packet))

    def conn_info(self, frame: ConnInfo) -> None:
        out = self.rewriter.primary_syn_ack(
            (frame.client_port, frame.guest_port), frame.isn, frame.tsval or None
        )
        if out:
            self._act(out)

    def _act(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Inject):
                try:
                    assert self._raw is not None
                    self._raw.sendto(action.packet, (self.guest_ip, 0))
                except (OSError, AssertionError):
                    # no guest link yet (before the first checkpoint), or a full
                    # socket buffer: TCP recovers like from a lost packet
                    self.inject_errors += 1
            elif isinstance(action, Report):
                cport, gport = action.key
                self._send(SvmOutput(cport, gport, self.epoch, action.offset, action.payload))

    def net_sync(self, frame: NetSync) -> None:
        self._syncs[frame.seq] = frame
        for old in [s for s in self._syncs if s < frame.seq - 8]:
            del self._syncs[old]

    def suspended(self) -> None:
        """Our copy is suspended: report everything it sent before."""
        self._queue.drain()

    def loaded(self, seq: int) -> None:
        """Checkpoint ``seq`` is in our memory, our copy about to run again: what it
        sends from now on continues the primary's output where the checkpoint left
        it (a NETSYNC that has not arrived leaves the old alignment, and the
        comparer then sees a mismatch: one checkpoint more, never a wrong match)."""
        self._queue.drain()  # anything left is still of the old state
        sync = self._syncs.pop(seq, None)
        if sync is not None:
            for cport, gport, end in sync.ends:
                self.rewriter.realign((cport, gport), end)
        self.epoch = seq
        # COLO checkpoints at least every checkpoint_max_interval: often enough a
        # clock for an idle timeout of hours
        self.rewriter.tick(time.monotonic())

    async def teardown(self) -> None:
        """Failover (or the end): our copy's output flows from now on."""
        self.filtering = False
        self._queue.remove_rule()
        with contextlib.suppress(Exception):
            self._queue.drain()
        self._queue.close()
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    def figures(self) -> dict[str, Any]:
        r = self.rewriter
        return {
            "injected_packets": r.injected,
            "reported_bytes": r.reported_bytes,
            "dropped_unknown": r.dropped_unknown,
            "inject_errors": self.inject_errors,
            "output_filtered": self.filtering,
        }
