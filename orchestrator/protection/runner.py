"""Running a protection in the foreground (`remusctl protect` / `remusctl receive`).

Until `remusd` owns protections, each side is one process; it publishes its
status as JSON in ``<host>/remus/<name>.json`` (read by `remusctl status`),
stops cleanly on SIGTERM (`remusctl unprotect`) and, on the secondary, fails
over on SIGUSR1 (`remusctl failover`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import statistics
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..devices.base import CheckpointDevice
from ..devices.disk import DiskReplica, DiskSender
from ..devices.netbuf_nfqueue import NfqueueNetbuf, nfqueue_available
from ..devices.netbuf_plug import PlugNetbuf, plug_available
from ..devices.netbuf_proxy import ProxyNetbuf
from ..hypervisors.base import Hypervisor
from ..transport.channels import Listener, connect, parse_addr
from ..transport.control import Shutdown
from ..transport.stdio import CommandLink, open_command, open_stdio
from .colo import ColoPrimary, ColoSecondary, ColoSettings, ColoStatus
from .fence import FenceGuard, marker_path
from .remus import (
    PAUSE_BUCKETS,
    RECENT,
    Control,
    RemusPrimary,
    RemusSecondary,
    RemusSettings,
    RemusStatus,
)
from .xen_receiver import XenRemusSecondary


def status_path(hv: Hypervisor, name: str, status_dir: Path | None = None) -> Path:
    """Where a protection publishes its status: the backend's state dir unless remusd says."""
    d = status_dir or hv.state_dir()
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{name}.json"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def summarize(role: str, name: str, st: RemusStatus, extra: dict[str, Any]) -> dict[str, Any]:
    pauses, dirty, lags = list(st.pause_seconds), list(st.dirty_pages), list(st.ack_lag_seconds)
    return {
        "name": name,
        "role": role,
        "pid": os.getpid(),
        "state": st.state,
        "checkpoints": st.checkpoints,
        "last_checkpoint_age": round(time.time() - st.last_checkpoint_at, 3)
        if st.last_checkpoint_at
        else None,
        "pause_ms_p50": round(statistics.median(pauses) * 1e3, 3) if pauses else None,
        "ack_lag_ms_p50": round(statistics.median(lags) * 1e3, 3) if lags else None,
        "dirty_pages_p50": statistics.median(dirty) if dirty else None,
        "dirty_bytes_p50": statistics.median(dirty) * 4096 if dirty else None,
        "pause_histogram": {
            "le": list(PAUSE_BUCKETS),
            "counts": list(st.pause_counts),
            "sum": st.pause_sum,
        },
        "epochs": st.epochs,
        "late_epochs": st.late_epochs,
        "reason": st.reason,
        "updated": time.time(),
        **extra,
    }


async def _publish(path: Path, make: Any) -> None:
    while True:
        _write_json(path, make())
        await asyncio.sleep(0.2)


NETBUF_MODES = ("auto", "plug", "nfqueue", "proxy")


def add_netbuf_option(parser: Any) -> None:
    """`--netbuf`, shared by `remusctl protect` and `remusctl demo`."""
    parser.add_argument(
        "--netbuf",
        choices=NETBUF_MODES,
        default="auto",
        help="output buffer: a plug qdisc (Xen's way; needs sch_plug) or NFQUEUE on the "
        "guest's vif (root), or a userspace proxy clients connect through (its address in "
        "`remusctl status`); auto takes the first that works",
    )


def choose_netbuf(hv: Hypervisor, domid: int, mode: str) -> str:
    """auto: what Xen uses (plug qdisc) where the kernel has it, else NFQUEUE on the
    guest's vif, else the userspace proxy."""
    if mode != "auto":
        return mode
    if hv.vif_name(domid) is not None:
        if plug_available() is None:
            return "plug"
        if nfqueue_available() is None:
            return "nfqueue"
    return "proxy"


async def run_primary(
    hv: Hypervisor,
    name: str,
    to: str,
    settings: RemusSettings,
    netbuf: str = "auto",
    disk: bool = True,
    blackhole: bool = False,
    status_dir: Path | None = None,
    command: str | None = None,
    fence: bool | None = None,
) -> RemusStatus:
    """``command``: the stream and control channels run over that shell command's
    stdin and stdout (`xl remus -s`), instead of a TCP connection to ``to``.

    ``fence`` (default: on Xen): a guard process destroys the domain if this
    process dies once the secondary holds a checkpoint (:mod:`.fence`).
    """
    info = hv.lookup(name)
    if disk and not blackhole and not hv.supports_disk_replication:
        raise RuntimeError(
            f"the {hv.name} backend cannot replicate {name}'s disks (Xen's Remus needs DRBD "
            "or blktap, which Debian's libxl lacks): protect with -d -F, and put the disks "
            "on storage both hosts share"
        )
    devices: list[CheckpointDevice] = []
    netdev: NfqueueNetbuf | None = None
    proxy: ProxyNetbuf | None = None
    mode = choose_netbuf(hv, info.domid, netbuf)
    if mode == "nfqueue":
        vif = hv.vif_name(info.domid)
        if vif is None:
            raise RuntimeError("NFQUEUE buffering needs the guest's vif (root only)")
        netdev = NfqueueNetbuf(vif, 1000 + zlib.crc32(vif.encode()) % 60000)
        devices.append(netdev)
    elif mode == "plug":
        vif = hv.vif_name(info.domid)
        if vif is None:
            raise RuntimeError("plug-qdisc buffering needs the guest's vif (root only)")
        devices.append(PlugNetbuf(vif))
    elif mode == "proxy":
        proxy = ProxyNetbuf(info.address)
        devices.append(proxy)
    sink: _Sink | None = None
    ctl: Control | None
    link: CommandLink | None = None
    if blackhole:
        sink = _Sink()
        stream, ctl = sink.stream, None
    elif command is not None:
        stream, ctl, link = await open_command(command)
    else:
        stream, ctl = await connect(to, info.uuid)
    disk_sender: DiskSender | None = None
    if ctl is not None and disk and hv.disk_of(info.domid).disk_blocks:
        disk_sender = DiskSender(hv.disk_of(info.domid), ctl.send)
        devices.append(disk_sender)
    path = status_path(hv, name, status_dir)
    guard: FenceGuard | None = None
    if (hv.name == "xen" if fence is None else fence) and ctl is not None:
        with contextlib.suppress(FileNotFoundError):
            marker_path(path.parent, name).unlink()
        guard = FenceGuard(hv.name, info.domid, info.name, path.parent)
    primary = RemusPrimary(hv, info, stream, ctl, settings, devices, fence=guard)

    def make() -> dict[str, Any]:
        held = netdev.held_packets if netdev else None
        extra: dict[str, Any] = {"peer": to, "netbuf": mode, "held_packets": held}
        if sink is not None:
            extra.update(peer="blackhole (-b)", stream_bytes=sink.received)
        if disk_sender is not None:
            sent = list(disk_sender.stats.blocks_sent)
            extra["disk_blocks_p50"] = statistics.median(sent) if sent else None
        extra["disk"] = "replicated" if disk_sender is not None else "not replicated"
        if proxy is not None:
            # with the proxy, clients must come through it for their output to be held
            extra.update(service_address=proxy.address, held_bytes=proxy.held_bytes)
        return summarize("primary", name, primary.status, extra)

    publisher = asyncio.create_task(_publish(path, make))
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    aborts: list[asyncio.Future[None]] = []

    def unprotect() -> None:
        stopping.set()
        primary.status.reason = "unprotected"
        if ctl is not None:
            with contextlib.suppress(Exception):
                ctl.send(Shutdown("unprotect"))
        if primary.session is not None:
            aborts.append(asyncio.ensure_future(primary.session.abort()))

    loop.add_signal_handler(signal.SIGTERM, unprotect)
    try:
        status = await primary.run()
    finally:
        publisher.cancel()
        _write_json(path, make())
        stream.close()
        if ctl is not None:
            ctl.close()
        if sink is not None:
            sink.close()
        if link is not None:
            link.close()
    return status


class _Sink:
    """`-b`: the stream's far end, read and thrown away (xl remus writes to /dev/null).

    A socket rather than /dev/null itself, so the primary's stream code is the
    same either way, and the bytes can be counted.
    """

    def __init__(self) -> None:
        self.stream, self._far = socket.socketpair()
        self.received = 0
        self._thread = threading.Thread(target=self._drain, name="remus-blackhole", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        buf = bytearray(1 << 20)
        with contextlib.suppress(OSError):
            while n := self._far.recv_into(buf):
                self.received += n

    def close(self) -> None:
        self._far.close()


async def run_primary_colo(
    hv: Hypervisor,
    name: str,
    to: str,
    settings: ColoSettings,
    status_dir: Path | None = None,
    command: str | None = None,
) -> ColoStatus:
    """COLO from this process: both copies run; the secondary takes each checkpoint."""
    info = hv.lookup(name)
    link: CommandLink | None = None
    if command is not None:
        stream, ctl, link = await open_command(command)
    else:
        stream, ctl = await connect(to, info.uuid)
    primary = ColoPrimary(hv, info, stream, ctl, settings)
    path = status_path(hv, name, status_dir)

    def make() -> dict[str, Any]:
        st = primary.status
        pauses = st.pause_seconds[-RECENT:]
        return {
            "name": name,
            "role": "primary",
            "mode": "colo",
            "pid": os.getpid(),
            "state": st.state,
            "checkpoints": st.checkpoints,
            "checkpoints_by_divergence": st.by_divergence,
            "checkpoints_by_held_output": st.by_held,
            "checkpoints_by_timer": st.by_timer,
            "memory_verified": st.memory_verified,
            **(primary.net.figures() if primary.net is not None else st.net),
            "pause_ms_p50": round(statistics.median(pauses) * 1e3, 3) if pauses else None,
            "peer": to,
            "reason": st.reason,
            "updated": time.time(),
        }

    publisher = asyncio.create_task(_publish(path, make))
    run = asyncio.create_task(primary.run())
    stoppers: list[asyncio.Task[None]] = []

    async def stop() -> None:
        # SIGTERM can come before the helper runs (HELLO, the vif's queues being set
        # up), when aborting the session does nothing: ask again until it runs, and
        # cancel outright what comes before the session, when no checkpoint can be
        # half done
        while not run.done():
            session = primary.session
            if session is None:
                with contextlib.suppress(Exception):
                    ctl.send(Shutdown("unprotect"))
                run.cancel()
                return
            await session.abort()
            await asyncio.sleep(0.05)

    def unprotect() -> None:
        primary.status.reason = primary.status.reason or "unprotected"
        if not stoppers:
            stoppers.append(asyncio.create_task(stop()))

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, unprotect)
    try:
        try:
            return await run
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if not stoppers or (me is not None and me.cancelling()):
                raise  # we are cancelled ourselves, not stopped by SIGTERM
            primary.status.state = "stopped"
            return primary.status
    finally:
        publisher.cancel()
        _write_json(path, make())
        stream.close()
        ctl.close()
        if link is not None:
            link.close()


async def run_secondary_stdio(hv: Hypervisor, settings: RemusSettings) -> Any:
    """`remusctl receive --stdio`: both channels over our stdin and stdout (``-s``)."""
    stream, ctl, link = await open_stdio()
    try:
        return await run_secondary_on(hv, stream, ctl, settings, last_input=lambda: link.last_input)
    finally:
        link.close()


async def run_secondary(hv: Hypervisor, listen: str, settings: RemusSettings) -> Any:
    host, port = parse_addr(listen)
    listener = Listener(host, port)
    await listener.start()
    print(f"receiving on {host}:{listener.port}", flush=True)
    _pid, stream, ctl = await listener.pairs.get()
    listener.close()
    return await run_secondary_on(hv, stream, ctl, settings)


async def run_secondary_on(
    hv: Hypervisor,
    stream: socket.socket,
    ctl: Control,
    settings: RemusSettings,
    status_dir: Path | None = None,
    last_input: Callable[[], float] | None = None,
) -> Any:
    """The secondary of one protection, on connections someone else accepted.

    ``last_input``: when the peer was last heard on any channel, for links
    (``-s``) where control frames queue behind stream data.
    """
    secondary: RemusSecondary
    peer = await ctl.receive_hello(settings.ack_timeout)
    if "colo" in peer.capabilities:
        if hv.name == "xen":
            raise RuntimeError("COLO on Xen is not supported (Xen ships COLO for HVM only)")
        colo = ColoSettings(
            **dataclasses.asdict(settings), verify_memory="verify-memory" in peer.capabilities
        )
        secondary = ColoSecondary(hv, stream, ctl, colo)
    elif hv.name == "xen":  # Xen's own restore, fed whole checkpoints
        secondary = XenRemusSecondary(hv, stream, ctl, settings, last_input=last_input)
    else:
        secondary = RemusSecondary(
            hv,
            stream,
            ctl,
            settings,
            disk_replica=lambda t: DiskReplica(hv.disk_of(t.domid)),
            last_input=last_input,
        )
    name_box: dict[str, str] = {"name": "incoming"}

    def make() -> dict[str, Any]:
        extra: dict[str, Any] = {"last_heartbeat_age": round(time.monotonic() - ctl.last_heard, 3)}
        if isinstance(secondary, ColoSecondary):
            extra["mode"] = "colo"
            if secondary.net is not None:
                extra.update(secondary.net.figures())
        return summarize("secondary", name_box["name"], secondary.status, extra)

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, secondary.force_failover)
    task = asyncio.create_task(secondary.run())
    while secondary.target is None and not task.done():
        await asyncio.sleep(0.01)
    if secondary.target is None:
        return await task  # failed before it had a domain: nothing to publish
    name_box["name"] = secondary.target.name
    path = status_path(hv, name_box["name"], status_dir)
    publisher = asyncio.create_task(_publish(path, make))
    try:
        return await task
    finally:
        publisher.cancel()
        _write_json(path, make())
        stream.close()
        ctl.close()
