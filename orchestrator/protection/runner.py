"""Running one protection: `remusctl protect --foreground`, `remusctl receive`, remusd's worker.

Each side is one process. It publishes its :class:`~.status.ProtectionStatus`
in ``<state dir>/<name>.json`` (read by `remusctl status` and remusd), stops
cleanly on SIGTERM (unprotect) and, on the secondary, fails over on SIGUSR1
(`remusctl failover`). Both modes run through the same :func:`run_primary`;
what differs is the driver it builds (:mod:`.remus`, :mod:`.colo`) and, for
Remus, the checkpoint devices.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import statistics
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from ..coordination import LeaseKeeper, WitnessError
from ..devices.base import CheckpointDevice
from ..devices.disk import DiskReplica, DiskSender
from ..devices.netbuf_nfqueue import NfqueueNetbuf, nfqueue_available
from ..devices.netbuf_plug import PlugNetbuf, plug_available
from ..devices.netbuf_proxy import ProxyNetbuf
from ..hypervisors.base import Capability, DomainInfo, Hypervisor
from ..transport.channels import connect, parse_addr
from ..transport.control import Hello
from ..transport.control import Role as Side
from ..transport.controlio import Control
from ..transport.endpoint import Endpoint, control_of
from ..transport.stdio import PrimaryLink, open_command, open_stdio
from .colo import ColoPrimary, ColoSecondary
from .fence import FenceGuard, marker_path
from .host import describe_host, link_of
from .lease import close_lease, open_lease, primary_witness, secondary_witness
from .remote import receive_command
from .remus import RemusPrimary, RemusSecondary
from .session import Primary, ReplicationError, Secondary, host_identity
from .spec import Mode, Netbuf, ProtectionSpec
from .status import ProtectionStatus, Role, State, switchover_request
from .xen_receiver import XenRemusSecondary

PUBLISH_EVERY = 0.2  # seconds between status documents


def status_path(hv: Hypervisor, name: str, status_dir: Path | None = None) -> Path:
    """Where a protection publishes its status: the backend's state dir unless remusd says."""
    d = status_dir or hv.state_dir()
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{name}.json"


async def _publish(path: Path, make: Callable[[], ProtectionStatus]) -> None:
    while True:
        make().write(path)
        await asyncio.sleep(PUBLISH_EVERY)


def choose_netbuf(hv: Hypervisor, domid: int, mode: Netbuf) -> Netbuf:
    """auto: what Xen uses (plug qdisc) where the kernel has it, else NFQUEUE on the
    guest's vif, else the userspace proxy."""
    if mode is not Netbuf.AUTO:
        return mode
    if hv.vif_name(domid) is not None:
        if plug_available() is None:
            return Netbuf.PLUG
        if nfqueue_available() is None:
            return Netbuf.NFQUEUE
    return Netbuf.PROXY


class _Output:
    """The Remus primary's output buffer, as chosen, and its figures."""

    def __init__(self, hv: Hypervisor, info: DomainInfo, spec: ProtectionSpec) -> None:
        self.nfqueue: NfqueueNetbuf | None = None
        self.proxy: ProxyNetbuf | None = None
        self.device: CheckpointDevice | None = None
        if spec.no_netbuf:
            self.mode = "none"
            return
        mode = choose_netbuf(hv, info.domid, spec.netbuf)
        self.mode = mode.value
        vif = hv.vif_name(info.domid)
        if mode in (Netbuf.NFQUEUE, Netbuf.PLUG) and vif is None:
            raise ReplicationError(f"{mode.value} buffering needs the guest's vif (root only)")
        if mode is Netbuf.NFQUEUE:
            assert vif is not None
            self.nfqueue = NfqueueNetbuf(vif, 1000 + zlib.crc32(vif.encode()) % 60000)
            self.device = self.nfqueue
        elif mode is Netbuf.PLUG:
            assert vif is not None
            self.device = PlugNetbuf(vif)
        else:
            self.proxy = ProxyNetbuf(info.address)
            self.device = self.proxy

    def fill(self, st: ProtectionStatus) -> None:
        st.netbuf = self.mode
        if self.nfqueue is not None:
            st.held_packets = self.nfqueue.held_packets
        if self.proxy is not None:
            # with the proxy, clients must come through it for their output to be held
            st.service_address, st.held_bytes = self.proxy.address, self.proxy.held_bytes


async def run_primary(
    hv: Hypervisor,
    spec: ProtectionSpec,
    status_dir: Path | None = None,
    command: str | None = None,
    fence: bool | None = None,
) -> ProtectionStatus:
    """Protect ``spec.name`` to ``spec.peer`` until replication ends; the guest runs on here.

    ``command``: the stream and control channels run over that shell command's
    stdin and stdout (`xl remus -s`), instead of a TCP connection to the peer.
    ``fence`` (default: where the backend can fence): a guard process destroys
    the domain if this process dies once the secondary holds a checkpoint
    (:mod:`.fence`).
    """
    spec = primary_witness(spec, hv)
    info = hv.lookup(spec.name)
    if spec.replicates_disk and not hv.can(Capability.DISK_REPLICATION):
        raise ReplicationError(
            f"the {hv.name} backend cannot replicate {spec.name}'s disks (Xen's Remus needs "
            "DRBD or blktap, which Debian's libxl lacks): protect with -d -F, and put the "
            "disks on storage both hosts share"
        )
    output = _Output(hv, info, spec) if not spec.colo else None
    lease: LeaseKeeper | None = None
    if spec.witness:
        # the lease before anything else: a copy that may run elsewhere stops us here
        lease = await open_lease(spec, info.uuid, "primary")
        if not await lease.acquire(spec.takeover_window_s):
            await close_lease(lease, release=False)
            raise ReplicationError(
                f"the lease of {spec.name} on {spec.witness} is held by another member "
                f"({lease.reason or lease.state.value}): another copy may be running"
            )
        try:
            await _claim(lease, hv, spec)
        except BaseException:
            await close_lease(lease, release=True)
            raise
    try:
        return await _run_primary(hv, spec, info, output, lease, status_dir, command, fence)
    finally:
        if lease is not None:
            await close_lease(lease, release=True)


async def _claim(lease: LeaseKeeper, hv: Hypervisor, spec: ProtectionSpec) -> None:
    """Holding the lease, before protecting: a takeover by another host since the
    last protection means our copy is stale (the guest runs there now); our own
    mark (we took over, and protect back) is cleared, so that a fenced primary
    later reads only what happened after this start."""
    me = host_identity(hv)
    try:
        others = [h for h in await lease.witness.taken_over(lease.name) if h != me]
        if others:
            raise ReplicationError(
                f"{spec.name} was taken over by host {others[0]} since it was last protected "
                f"from here ({spec.witness}): this copy is stale; destroy it, or protect "
                "back from the host that runs the guest"
            )
        await lease.witness.clear_taken_over(lease.name)
    except WitnessError as exc:
        raise ReplicationError(f"witness {spec.witness}: {exc}") from None


def _lease_fill(st: ProtectionStatus, spec: ProtectionSpec, lease: LeaseKeeper | None) -> None:
    if lease is None:
        return
    st.witness, st.lease = spec.witness, lease.state.value
    until = lease.valid_until
    if until is not None and until != float("inf"):
        st.lease_valid_for_s = round(max(0.0, until - time.monotonic()), 3)


async def _run_primary(
    hv: Hypervisor,
    spec: ProtectionSpec,
    info: DomainInfo,
    output: _Output | None,
    lease: LeaseKeeper | None,
    status_dir: Path | None,
    command: str | None,
    fence: bool | None,
) -> ProtectionStatus:
    sink: _Sink | None = None
    ctl: Control | None
    link: PrimaryLink | None = None
    if spec.blackhole:
        sink = _Sink()
        stream, ctl = sink.stream, None
    elif command is not None:
        stream, ctl, link = await open_command(command)
    elif spec.ssh:
        stream, ctl, link = await _open_ssh(spec)
    else:
        stream, ctl = await connect(spec.peer, info.uuid, link_of(hv, spec.insecure_link))
    path = status_path(hv, spec.name, status_dir)
    disk: DiskSender | None = None
    primary: Primary
    if spec.colo:
        if ctl is None:
            raise ReplicationError("COLO needs a secondary: -b is Remus only")
        primary = ColoPrimary(hv, info, stream, ctl, spec, lease=lease)
    else:
        assert output is not None
        devices = [output.device] if output.device is not None else []
        if ctl is not None and spec.replicates_disk and hv.disk_of(info.domid).disk_blocks:
            disk = DiskSender(hv.disk_of(info.domid), ctl.send)
            devices.append(disk)
        guard: FenceGuard | None = None
        if (hv.can(Capability.FENCE) if fence is None else fence) and ctl is not None:
            with contextlib.suppress(FileNotFoundError):
                marker_path(path.parent, spec.name).unlink()
            guard = FenceGuard(hv.name, info.domid, info.name, path.parent)
        primary = RemusPrimary(hv, info, stream, ctl, spec, devices, fence=guard, lease=lease)
    peer = "blackhole (-b)" if spec.blackhole else spec.target or (command or "")
    if spec.blackhole:
        link_mode = "none"
    elif spec.ssh:
        link_mode = "ssh"
    elif command is not None:
        link_mode = "stdio"
    else:
        link_mode = link_of(hv, spec.insecure_link).mode

    def make() -> ProtectionStatus:
        st = ProtectionStatus(spec.name, Role.PRIMARY, spec.mode, peer=peer, link=link_mode)
        primary.figures.fill(st)
        _lease_fill(st, spec, lease)
        if output is not None:
            output.fill(st)
        if sink is not None:
            st.stream_bytes = sink.received
        if disk is not None:
            sent = list(disk.stats.blocks_sent)
            st.disk_blocks_p50 = statistics.median(sent) if sent else None
            st.disk = "replicated"
        if isinstance(primary, ColoPrimary):
            primary._net_figures()
            st.colo, st.netbuf = primary.colo, "colo-compare" if primary.net else "none"
            st.held_packets = primary.held_packets()
        if primary.switchover_pause_s is not None:
            st.switchover_pause_ms = round(primary.switchover_pause_s * 1e3, 3)
        return st

    publisher = asyncio.create_task(_publish(path, make))
    run = asyncio.create_task(primary.run())
    stopper: list[asyncio.Task[None]] = []

    async def stop() -> None:
        # SIGTERM can come before the helper runs (HELLO, devices being set up),
        # when aborting the session does nothing: ask again until the run ends
        while not run.done():
            await primary.stop()
            await asyncio.sleep(0.05)

    def unprotect() -> None:
        if not stopper:
            stopper.append(asyncio.create_task(stop()))

    def switch_over() -> None:
        # remusd's request: the document the peer protects back with, in the file
        request = switchover_request(path.parent, spec.name)
        try:
            document = request.read_text()
        except OSError:
            document = ""
        request.unlink(missing_ok=True)
        primary.request_switchover(document)

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, unprotect)
    loop.add_signal_handler(signal.SIGUSR2, switch_over)
    try:
        await run
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGUSR2)
        for task in (publisher, *stopper):
            task.cancel()
        final = make()
        final.write(path)
        stream.close()
        if ctl is not None:
            ctl.close()
        if sink is not None:
            sink.close()
        if link is not None:
            link.close()
    return final


async def _open_ssh(spec: ProtectionSpec) -> tuple[socket.socket, Control, PrimaryLink]:
    """``--ssh``: the receiver started over SSH, with the command line ``-s`` runs."""
    # imported here: paramiko (and cryptography) cost every remusctl command 0.4 s
    from ..transport.ssh import open_ssh
    from ..transport.sshtarget import SshError, parse_target

    try:
        return await open_ssh(
            parse_target(spec.ssh),
            receive_command(spec),
            known_hosts=spec.ssh_known_hosts or None,
            identity=spec.ssh_identity or None,
        )
    except SshError as exc:
        raise ReplicationError(str(exc)) from None


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


async def run_secondary_stdio(hv: Hypervisor, spec: ProtectionSpec) -> DomainInfo:
    """`remusctl receive --stdio`: both channels over our stdin and stdout (``-s``)."""
    stream, ctl, link = await open_stdio()
    try:
        return await run_secondary_on(hv, stream, ctl, spec, last_input=lambda: link.last_input)
    finally:
        link.close()


async def run_secondary(hv: Hypervisor, listen: str, spec: ProtectionSpec) -> DomainInfo:
    host, port = parse_addr(listen)
    link = link_of(hv, spec.insecure_link)
    if link.identity is not None:
        link.require()  # no identity: said now, not when the first primary comes
    endpoint = Endpoint(host, port, lambda: describe_host(hv), link=link)
    await endpoint.start()
    print(f"receiving on {host}:{endpoint.port} ({link.mode})", flush=True)
    try:
        pair = await endpoint.next_pair()
    finally:
        await endpoint.close()
    return await run_secondary_on(hv, pair.stream, await control_of(pair), spec)


async def run_secondary_on(
    hv: Hypervisor,
    stream: socket.socket,
    ctl: Control,
    spec: ProtectionSpec,
    status_dir: Path | None = None,
    last_input: Callable[[], float] | None = None,
) -> DomainInfo:
    """The secondary of one protection, on connections someone else accepted.

    ``last_input``: when the peer was last heard on any channel, for links
    (``-s``) where control frames queue behind stream data. The mode comes
    from the primary's HELLO.
    """
    ctl.set_role(Side.SECONDARY)  # before the HELLO: the codec's rules are per side
    peer = await ctl.receive_hello(spec.ack_timeout_s)
    mode = Mode.COLO if "colo" in peer.capabilities else Mode.REMUS
    lease: LeaseKeeper | None = None
    # one side taking over on heartbeats alone is refused, on both sides' word
    spec = secondary_witness(spec, hv, peer)
    if spec.witness:
        lease = await open_lease(spec, peer.protection, "secondary")
    try:
        return await _run_secondary(
            hv, stream, ctl, spec, peer, mode, lease, status_dir, last_input
        )
    finally:
        if lease is not None:
            await close_lease(lease, release=True)


async def _run_secondary(
    hv: Hypervisor,
    stream: socket.socket,
    ctl: Control,
    spec: ProtectionSpec,
    peer: Hello,
    mode: Mode,
    lease: LeaseKeeper | None,
    status_dir: Path | None,
    last_input: Callable[[], float] | None,
) -> DomainInfo:
    secondary: Secondary
    if mode is Mode.COLO:
        if not hv.can(Capability.COLO):
            raise ReplicationError(
                f"COLO on the {hv.name} backend is not supported (Xen ships COLO for HVM only)"
            )
        secondary = ColoSecondary(hv, stream, ctl, spec)
        secondary.lease = lease
    elif hv.can(Capability.TOOLSTACK_RESTORE):  # Xen's own restore, fed whole checkpoints
        secondary = XenRemusSecondary(hv, stream, ctl, spec, last_input=last_input)
        secondary.lease = lease
    else:
        replica = None
        if hv.can(Capability.DISK_REPLICATION):

            def replica(t: DomainInfo) -> DiskReplica:
                return DiskReplica(hv.disk_of(t.domid))

        secondary = RemusSecondary(
            hv, stream, ctl, spec, disk_replica=replica, last_input=last_input
        )
        secondary.lease = lease
    names = ["incoming"]

    def make() -> ProtectionStatus:
        st = ProtectionStatus(names[0], Role.SECONDARY, mode)
        # last_input is given by the command-pipe links (-s, --stdio, ssh) only
        st.link = "stdio" if last_input is not None else link_of(hv, spec.insecure_link).mode
        secondary.figures.fill(st)
        _lease_fill(st, spec, lease)
        st.last_heartbeat_age_s = round(secondary.link.seconds_since_heard(), 3)
        handed = secondary.link.switchover
        if handed is not None and secondary.figures.state is State.FAILED_OVER:
            st.protect_back = handed.protect_back  # remusd protects back with it
        if isinstance(secondary, ColoSecondary):
            secondary._net_figures()
            st.colo = secondary.colo
        elif isinstance(secondary, RemusSecondary) and secondary.replica is not None:
            st.disk = "replicated"
        return st

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, secondary.force_failover)
    task = asyncio.create_task(secondary.run())
    try:
        while secondary.target is None and not task.done():
            await asyncio.sleep(0.01)
        if secondary.target is None:
            return await task  # failed before it had a domain: nothing to publish
        names[0] = secondary.target.name
        path = status_path(hv, names[0], status_dir)
        publisher = asyncio.create_task(_publish(path, make))
        try:
            return await task
        finally:
            publisher.cancel()
            make().write(path)
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
        stream.close()
        ctl.close()
