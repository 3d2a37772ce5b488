"""The simulated hypervisor: the embedded default, one per host directory.

A domain is a directory (``simdomain``) plus, while it runs, a guest process
(``guest.simguest``). Several hosts live side by side on one machine, each with its
own directory (``--host`` or ``$REMUS_SIM_HOST``), so a primary and a
secondary can run on one laptop.

What maps to what:
  pause / unpause    SIGSTOP / SIGCONT of the guest process (vCPUs stop, no cooperation)
  suspend            cooperative: a request on the domain's event-channel socket, the
                     guest acknowledges at a safe point and records shutdown(suspend)
  resume (fast)      the same guest process carries on
  restore            an empty paused domain is filled by the save helper; finishing
                     it starts a fresh guest process on the restored memory
  vif                as root: a network namespace per domain with a veth pair, the
                     host end named like a vif; otherwise a loopback port

Guests' addresses (as root) come from 198.18.0.0/15, the range RFC 2544 sets
aside for test networks, and the root namespace gets an ``unreachable`` route
for the whole range: a guest whose namespace is gone (destroyed, saved)
fails at once with "no route to host" rather than following the default
route off the machine, while live guests' /30 links, more specific, win.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from ..guest.machine import EVTCHN
from .base import (
    Capability,
    DomainInfo,
    DomainNotFound,
    Hypervisor,
    HypervisorError,
    NotRunning,
    SuspendTimeout,
)
from .simdomain import (
    BLOCK_SIZE,
    DEFAULT_DISK_MIB,
    DEFAULT_MEMORY_MIB,
    PAGE_SIZE,
    DomainState,
    NoSuchDomain,
    RunState,
    ShutdownReason,
    SimDomain,
    default_host_dir,
    domain_path,
)

GUEST_PORT: Final = 7000
START_TIMEOUT: Final = 15.0

# the guests' address pool (RFC 2544's benchmarking range): never routed on the
# Internet, and made unreachable here by the route below
ADDRESS_POOL: Final = ipaddress.IPv4Network("198.18.0.0/15")
# 17 bits of pool: 11 for the host, 6 for its guests. A host's /26 holds 16 /30
# links (the first free one from domid % 16 on): 2048 hosts of 16 live guests. The host index folds
# all 16 bits of the host's tag into 11 (with 250 subnets two hosts collided in
# about one demo run of a hundred, and one guest's address routed to the other's
# veth); a collision that remains is refused loudly by _setup_vif.
HOST_BITS: Final = 11
LINKS_PER_HOST: Final = 1 << (ADDRESS_POOL.max_prefixlen - ADDRESS_POOL.prefixlen - HOST_BITS - 2)


def libxl_config(
    name: str, uuid: str, domain_type: str, memory_bytes: int, disk: str = "", cmdline: str = ""
) -> dict[str, Any]:
    """The parts of libxl's domain configuration JSON that a save file carries."""
    kb = memory_bytes // 1024
    config: dict[str, Any] = {
        "c_info": {"type": domain_type, "name": name, "uuid": uuid},
        "b_info": {"max_memkb": kb, "target_memkb": kb, "max_vcpus": 1},
    }
    if cmdline:
        config["b_info"]["type.pv"] = {"cmdline": cmdline}
    if disk:
        config["disks"] = [{"pdev_path": disk, "vdev": "xvda", "format": "raw", "readwrite": 1}]
    return config


def config_cmdline(config: dict[str, Any]) -> str:
    """The guest kernel command line in a libxl config, "" for none."""
    pv = (config.get("b_info") or {}).get("type.pv") or {}
    return str(pv.get("cmdline") or "") if isinstance(pv, dict) else ""


def config_disk(config: dict[str, Any]) -> str:
    """The first disk's image path in a libxl config, "" for none."""
    disks = config.get("disks") or []
    if disks and isinstance(disks[0], dict):
        return str(disks[0].get("pdev_path") or "")
    return ""


def have_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


def install_unreachable_route(netns: str | None = None) -> None:
    """The pool's ``unreachable`` route in our namespace (or in ``netns``, a host's
    own), idempotently (as root).

    ``replace`` both adds it and mends a route for the pool that points
    elsewhere, which is exactly the leak this route exists to stop."""
    if not have_netns():
        return
    cmd = _ip(netns, "route", "replace", "unreachable", str(ADDRESS_POOL))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise HypervisorError(f"{' '.join(cmd)}: {r.stderr.strip()}")


def drop_vif_rules(vif: str, netns: str | None = None) -> None:
    """Remove the iptables rules that name a vif being destroyed, as Xen's vif
    hotplug script does on offline: a primary killed while it held the guest's
    output (NFQUEUE) leaves its rule behind, and a later vif of the same name
    would have its packets queued to nobody. ``netns``: the host's own
    namespace, where its vifs (and the rules naming them) live."""
    if shutil.which("iptables") is None:
        return
    iptables = _in_netns(netns, ["iptables", "-w"])
    listing = subprocess.run([*iptables, "-S"], capture_output=True, text=True)  # every chain
    for line in listing.stdout.splitlines():
        words = line.split()
        if words[:1] == ["-A"] and vif in words:
            subprocess.run([*iptables, "-D", *words[1:]], capture_output=True)


def _ip(netns: str | None, *args: str) -> list[str]:
    """An `ip` command in ``netns`` (by name, from whichever namespace we are in)."""
    return ["ip", *(("-n", netns) if netns else ()), *args]


def _in_netns(netns: str | None, cmd: list[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *cmd] if netns else cmd


NETNS_FILE: Final = "netns"  # in a host directory: the host's own network namespace


class SimHypervisor(Hypervisor):
    """``netns``: the host lives in that network namespace of its own (recorded in
    the host directory, so every process of the host finds it): its guests' vifs
    and the iptables rules naming them are there, and its orchestrator processes
    run there (``ip netns exec``), so that a test can cut one host off from the
    other or from the witness. None: whatever the directory records, by default
    the namespace we run in; "": none, and the record is removed."""

    name = "sim"

    def __init__(
        self, host: Path | None = None, use_netns: bool | None = None, netns: str | None = None
    ) -> None:
        self.host = Path(host) if host is not None else default_host_dir()
        (self.host / "domains").mkdir(parents=True, exist_ok=True)
        self.use_netns = have_netns() if use_netns is None else use_netns
        record = self.host / NETNS_FILE
        if netns is not None:
            if netns:
                record.write_text(netns + "\n")
            else:
                record.unlink(missing_ok=True)
        self.netns = (record.read_text().strip() or None) if record.exists() else None
        # as root even without namespaces of our own: another host on this machine
        # may have left guests' addresses behind
        install_unreachable_route()
        if self.use_netns and self.netns:
            install_unreachable_route(self.netns)
        self.tag = f"{zlib.crc32(str(self.host.resolve()).encode()) & 0xFFFF:04x}"
        # one event-channel connection per domain, reused while the event loop lives
        self._evtchn: dict[
            int, tuple[asyncio.AbstractEventLoop, asyncio.StreamReader, asyncio.StreamWriter]
        ] = {}
        self._doms: dict[int, SimDomain] = {}

    @property
    def capabilities(self) -> frozenset[Capability]:
        caps = {Capability.DISK_REPLICATION, Capability.MEMORY_ACCESS, Capability.COLO}
        if self.use_netns:
            caps.add(Capability.GUEST_NETWORK)
        return frozenset(caps)

    # -- bookkeeping ------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.host / "lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _new_domid(self) -> int:
        counter = self.host / "next_domid"
        domid = int(counter.read_text()) if counter.exists() else 1
        counter.write_text(str(domid + 1))
        return domid

    def _domain(self, domid: int) -> SimDomain:
        # cached: a suspend/resume cycle must not re-read files (domids are never reused)
        dom = self._doms.get(domid)
        if dom is not None and dom.path.exists():
            return dom
        try:
            dom = self._doms[domid] = SimDomain(domain_path(self.host, domid))
        except NoSuchDomain:
            raise DomainNotFound(f"no domain {domid} on simulated host {self.host}") from None
        return dom

    def _info(self, dom: SimDomain) -> DomainInfo:
        st = dom.read_state()
        cfg = dom.config
        addr_file = dom.path / "address"
        address = addr_file.read_text().strip() if addr_file.exists() else ""
        state = st.state.value
        if st.state is RunState.RUNNING and not self._guest_alive(dom):
            state = RunState.SHUTDOWN.value  # the guest process is gone: it crashed
        return DomainInfo(
            cfg.domid,
            cfg.name,
            cfg.uuid,
            cfg.domain_type,
            cfg.memory_bytes,
            state,
            st.reason.value,
            libxl_config(
                cfg.name, cfg.uuid, cfg.domain_type, cfg.memory_bytes, cfg.disk, cfg.cmdline
            ),
            address,
        )

    def list_domains(self) -> list[DomainInfo]:
        out = []
        for path in sorted((self.host / "domains").iterdir(), key=lambda p: int(p.name)):
            with contextlib.suppress(NoSuchDomain, FileNotFoundError):
                dom = SimDomain(path)
                out.append(self._info(dom))
        return out

    def lookup(self, name_or_domid: str | int) -> DomainInfo:
        for info in self.list_domains():
            if str(name_or_domid) in (info.name, str(info.domid)):
                return info
        raise DomainNotFound(f"no domain {name_or_domid!r} on simulated host {self.host}")

    # -- life cycle --------------------------------------------------------------

    def create_domain(
        self,
        name: str,
        memory_mib: int = DEFAULT_MEMORY_MIB,
        domain_type: str = "pv",
        dirty_rate: int = 0,
        disk_mib: int = DEFAULT_DISK_MIB,
        nondeterministic: int = 0,
    ) -> DomainInfo:
        """`xl create`: a new domain with a fresh guest service and a blank disk.

        ``nondeterministic`` N > 0: about one PUT reply in N carries a random
        token (``remus_sim.nondeterministic=N`` on the guest's command line), so
        that two copies' output diverges on demand (COLO)."""
        disk = self._new_disk(name, disk_mib * (1 << 20)) if disk_mib else None
        cmdline = f"remus_sim.nondeterministic={nondeterministic}" if nondeterministic else ""
        dom = self._allocate(
            name, memory_mib * (1 << 20) // PAGE_SIZE, domain_type, disk=disk, cmdline=cmdline
        )
        try:
            self._start_guest(dom, dirty_rate)
        except BaseException:
            self.destroy(dom.domid)
            raise
        return self._info(dom)

    def _new_disk(self, name: str, size: int) -> Path:
        """A blank raw image (sparse) for a new domain's xvda."""
        if not name or "/" in name:
            raise HypervisorError(f"bad domain name {name!r}")
        if size % BLOCK_SIZE:
            raise HypervisorError(f"disk size {size} is not a multiple of {BLOCK_SIZE}")
        path = self.host / "disks" / f"{name}.img"
        path.parent.mkdir(exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def _allocate(
        self,
        name: str,
        pages: int,
        domain_type: str,
        uuid: str | None = None,
        disk: Path | None = None,
        cmdline: str = "",
    ) -> SimDomain:
        if not name or "/" in name:
            raise HypervisorError(f"bad domain name {name!r}")
        with self._locked():
            if any(d.name == name for d in self.list_domains()):
                raise HypervisorError(f"domain {name!r} already exists on {self.host}")
            return SimDomain.create(
                self.host, self._new_domid(), name, pages, domain_type, uuid, disk, cmdline
            )

    def create_restore_target(
        self, config: dict[str, Any], name: str, replica_disk: bool = False
    ) -> DomainInfo:
        """A paused, empty domain to restore into.

        Its disk: the image the configuration names, which a restore on the
        same host finds where the saved domain left it; or, for a Remus
        secondary (``replica_disk``), this host's own copy of it.
        """
        try:
            kb = int(config["b_info"]["max_memkb"])
            dtype = str(config["c_info"].get("type", "pv"))
            uuid = config["c_info"].get("uuid")
        except (KeyError, TypeError, ValueError) as exc:
            raise HypervisorError(f"domain config lacks {exc}: cannot size the domain") from None
        disk: Path | None = None
        if config_disk(config) and replica_disk:
            # this host's copy of the disk; disk replication (DiskReplica) blanks and
            # fills it, and without replication it is whatever this host last had
            disk = self.host / "disks" / f"{name}.img"
            disk.parent.mkdir(exist_ok=True)
            disk.touch()
        elif config_disk(config):
            disk = Path(config_disk(config))
        dom = self._allocate(
            name, kb * 1024 // PAGE_SIZE, dtype, uuid, disk, config_cmdline(config)
        )
        return self._info(dom)

    def state_dir(self) -> Path:
        return self.host / "remus"

    def tls_dir(self) -> Path:
        return self.host / "tls"

    def memory_path(self, domid: int) -> Path:
        """The domain's memory file."""
        return domain_path(self.host, domid) / "memory"

    def memory_digest(self, domid: int) -> bytes:
        self._domain(domid)  # DomainNotFound rather than a bare FileNotFoundError
        with open(self.memory_path(domid), "rb") as f:
            return hashlib.file_digest(f, "sha256").digest()

    def disk_of(self, domid: int) -> SimDomain:
        """The domain's handle, a BlockDevice for disk replication (image and dirty map)."""
        return self._domain(domid)

    async def finish_restore(self, domid: int, paused: bool = False) -> DomainInfo:
        dom = self._domain(domid)
        (dom.path / "address").unlink(missing_ok=True)
        await asyncio.to_thread(self._start_guest, dom, 0, paused)
        return self._info(dom)

    def host_subnet(self) -> ipaddress.IPv4Network:
        """The part of the pool this host's guests' /30 links come from (a /26)."""
        t = int(self.tag, 16)
        host_index = (t ^ (t >> HOST_BITS)) & ((1 << HOST_BITS) - 1)  # all 16 bits count
        first = ADDRESS_POOL.network_address + 4 * host_index * LINKS_PER_HOST
        return ipaddress.IPv4Network((first, ADDRESS_POOL.prefixlen + HOST_BITS))

    def _netns(self, domid: int) -> tuple[str, str, str, str]:
        """(namespace, host-side vif, host address, guest address) of a domain."""
        subnet = self.host_subnet()
        link = subnet.network_address + 4 * self._link_slot(domid)
        return (
            f"rsim-{self.tag}-{domid}",
            f"vif{self.tag}.{domid}"[:15],
            str(link + 1),
            str(link + 2),
        )

    def vif_addresses(self, domid: int) -> tuple[str, str] | None:
        """(host end, guest end) addresses of the domain's /30 link, None without netns."""
        if not self.use_netns:
            return None
        _, _, host_ip, guest_ip = self._netns(domid)
        return host_ip, guest_ip

    def vif_name(self, domid: int) -> str | None:
        """The host end of the domain's veth, where its output can be held."""
        return self._netns(domid)[1] if self.use_netns else None

    def _link_slot(self, domid: int) -> int:
        """Which of the host's /30 links the domain has (chosen at its first vif)."""
        try:
            return int((domain_path(self.host, domid) / "link").read_text())
        except (OSError, ValueError):
            return domid % LINKS_PER_HOST

    def _choose_link(self, domid: int) -> None:
        """The first free /30 of this host's subnet from domid % LINKS_PER_HOST on.

        Free means no interface on this machine has its host address: a domain of
        this host still alive LINKS_PER_HOST domids on, or of a host whose tag folds
        to the same subnet, keeps its link, and a second copy of a link would route
        one guest's traffic to the other's veth.
        """
        held: list[str] = []
        first = self._link_slot(domid)
        for k in range(LINKS_PER_HOST):
            slot = (first + k) % LINKS_PER_HOST
            (domain_path(self.host, domid) / "link").write_text(str(slot))
            host_ip = self._netns(domid)[2]
            show = ["-o", "-4", "addr", "show", "to", f"{host_ip}/30"]
            held = []
            # ours (in the host's namespace) and any other host's in the one we run in
            for ns in dict.fromkeys([self.netns, None]):
                r = subprocess.run(_ip(ns, *show), capture_output=True, text=True)
                held += r.stdout.split()
            if not held:
                return
        raise HypervisorError(
            f"no free link for domain {domid}: all {LINKS_PER_HOST} of host {self.host}'s "
            f"subnet are in use (the last on {held[1]})"
        )

    def _setup_vif(self, domid: int) -> str:
        self._teardown_vif(domid)
        install_unreachable_route(self.netns)
        self._choose_link(domid)  # ours is gone now: any holder is another domain
        ns, vif, host_ip, guest_ip = self._netns(domid)
        h = self.netns  # the host's own namespace, where the vif lives (None: ours)
        cmds = [
            ["ip", "netns", "add", ns],
            _ip(h, "link", "add", vif, "type", "veth", "peer", "name", "eth0", "netns", ns),
            _ip(h, "addr", "add", f"{host_ip}/30", "dev", vif),
            _ip(h, "link", "set", vif, "up"),
            ["ip", "-n", ns, "addr", "add", f"{guest_ip}/30", "dev", "eth0"],
            ["ip", "-n", ns, "link", "set", "eth0", "up"],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
        ]
        if h:
            # a host of its own forwards its clients' traffic in: the guest answers
            # whoever asks through its host, not only the host's own address
            cmds.append(["ip", "-n", ns, "route", "add", "default", "via", host_ip])
        for cmd in cmds:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise HypervisorError(f"{' '.join(cmd)}: {r.stderr.strip()}")
        return ns

    def _teardown_vif(self, domid: int) -> None:
        ns, vif, _, _ = self._netns(domid)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(_ip(self.netns, "link", "del", vif), capture_output=True)

    def _start_guest(self, dom: SimDomain, dirty_rate: int, paused: bool = False) -> None:
        cmd = [sys.executable, "-m", "orchestrator.guest.simguest", str(dom.path)]
        if dirty_rate:
            cmd += ["--dirty-rate", str(dirty_rate)]
        if dom.config.cmdline:
            cmd += ["--cmdline", dom.config.cmdline]
        if paused:
            cmd.append("--paused")
        if self.use_netns:
            ns = self._setup_vif(dom.domid)
            if paused:  # silent until unpaused, as pause() leaves a domain
                self._guest_link(dom.domid, up=False, vif=True)
            cmd = [
                "ip",
                "netns",
                "exec",
                ns,
                *cmd,
                "--listen",
                f"{self._netns(dom.domid)[3]}:{GUEST_PORT}",
            ]
        with open(dom.path / "guest.log", "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                env={**os.environ, "PYTHONPATH": _package_root()},
            )
        (dom.path / "guest.pid").write_text(str(proc.pid))
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (dom.path / "guest.log").read_text(errors="replace")[-400:]
                raise HypervisorError(f"guest of domain {dom.domid} exited at start: {tail}")
            ready = RunState.PAUSED if paused else RunState.RUNNING
            if (
                (dom.path / "address").exists()
                and dom.read_state().state is ready
                and (not paused or _stopped(proc.pid))
            ):
                return
            time.sleep(0.02)
        proc.kill()
        raise HypervisorError(f"guest of domain {dom.domid} did not start in {START_TIMEOUT} s")

    def _guest_pid(self, dom: SimDomain) -> int | None:
        pid_file = dom.path / "guest.pid"
        return int(pid_file.read_text()) if pid_file.exists() else None

    def _guest_alive(self, dom: SimDomain) -> bool:
        pid = self._guest_pid(dom)
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # a zombie counts as dead: ours is reaped here; another process's (a worker
        # that built the copy and exited leaves it to init, which may reap it only
        # seconds later: this machine's does) holds no memory and no socket
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return False
        return not _zombie(pid)

    def _signal(self, dom: SimDomain, sig: signal.Signals) -> None:
        pid = self._guest_pid(dom)
        if pid is None or not self._guest_alive(dom):
            raise NotRunning(f"domain {dom.domid} ({dom.config.name}) has no running guest")
        os.killpg(pid, sig)

    def pause(self, domid: int) -> None:
        dom = self._domain(domid)
        self._signal(dom, signal.SIGSTOP)
        st = dom.read_state()
        if st.state is RunState.RUNNING:
            dom.write_state(DomainState(RunState.PAUSED))
        self._guest_link(domid, up=False)

    def unpause(self, domid: int) -> None:
        dom = self._domain(domid)
        # on the network before it says it runs: whoever sees "running" may connect
        self._guest_link(domid, up=True)
        self._signal(dom, signal.SIGCONT)
        if dom.read_state().state is RunState.PAUSED:
            dom.write_state(DomainState(RunState.RUNNING))

    def _guest_link(self, domid: int, up: bool, vif: bool = False) -> None:
        """A paused domain is silent, as a Xen domain whose vCPUs, and so its network
        stack, stand still. The simulated guest's TCP lives in this kernel, not in the
        stopped process: without this it goes on retransmitting, past an output
        buffer that has just dropped what it held (a fenced primary's replies that no
        checkpoint covers would reach their clients)."""
        if not self.use_netns:
            return
        ns, vif_name, host_ip, _ = self._netns(domid)
        cmds = [["ip", "-n", ns, "link", "set", "eth0", "up" if up else "down"]]
        if vif or up:
            # A copy built paused (a secondary waiting for the lease) is not on the
            # network at all: its host end down too, so that the host's unreachable
            # route answers a client's SYN at once instead of the veth swallowing
            # it. Coming up, the kernel puts the /30's route back. The guest's end
            # goes up first: a packet to a host end whose peer is down leaves an
            # unanswered ARP behind, and everything after it waits for the next
            # probe, a second later.
            host_end = _ip(self.netns, "link", "set", vif_name, "up" if up else "down")
            cmds.insert(len(cmds) if up else 0, host_end)
        if up and self.netns:  # the default route went down with the link
            cmds.append(["ip", "-n", ns, "route", "replace", "default", "via", host_ip])
        for cmd in cmds:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise HypervisorError(f"{' '.join(cmd)}: {r.stderr.strip()}")

    def destroy(self, domid: int) -> None:
        dom = self._domain(domid)
        dom.write_state(DomainState(RunState.DYING))
        self._drop_evtchn(domid)
        pid = self._guest_pid(dom)
        if pid is not None and self._guest_alive(dom):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while self._guest_alive(dom) and time.monotonic() < deadline:
                time.sleep(0.01)
        if self.use_netns:
            self._teardown_vif(domid)
            drop_vif_rules(self._netns(domid)[1], self.netns)
        dom.close()
        self._doms.pop(domid, None)
        shutil.rmtree(dom.path, ignore_errors=True)

    # -- suspend / resume ----------------------------------------------------------

    async def _request(self, domid: int, req: bytes, timeout: float) -> bytes:
        dom = self._domain(domid)
        loop = asyncio.get_running_loop()
        conn = self._evtchn.get(domid)
        if conn is None or conn[0] is not loop or conn[2].is_closing():
            self._drop_evtchn(domid)
            # through /proc/self/fd: short whatever the host directory's length
            dirfd = os.open(dom.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(f"/proc/self/fd/{dirfd}/{EVTCHN}"), timeout
                )
            finally:
                os.close(dirfd)
            self._evtchn[domid] = (loop, reader, writer)
        else:
            _, reader, writer = conn
        writer.write(req)
        try:
            await writer.drain()
            answer = await asyncio.wait_for(reader.readexactly(1), timeout)
        except (ConnectionError, asyncio.IncompleteReadError):
            self._drop_evtchn(domid)
            raise NotRunning(f"domain {domid}: the guest closed its event channel") from None
        except TimeoutError:
            self._drop_evtchn(domid)
            raise
        return answer

    def _drop_evtchn(self, domid: int) -> None:
        conn = self._evtchn.pop(domid, None)
        if conn is not None and not conn[0].is_closed():
            conn[2].close()

    async def suspend(self, domid: int, timeout: float = 60.0) -> None:
        dom = self._domain(domid)
        st = dom.read_state()
        if st.state is not RunState.RUNNING:
            raise NotRunning(
                f"cannot suspend domain {domid} ({dom.config.name}): it is {st.state.value}"
                + (f" ({st.reason.value})" if st.reason.value else "")
            )
        try:
            answer = await self._request(domid, b"S", timeout)
        except TimeoutError:
            raise SuspendTimeout(
                f"domain {domid} ({dom.config.name}) did not acknowledge the suspend "
                f"request within {timeout:g} s"
            ) from None
        st = dom.read_state()
        if answer != b"s" or (st.state, st.reason) != (RunState.SHUTDOWN, ShutdownReason.SUSPEND):
            raise HypervisorError(f"domain {domid} answered {answer!r} and is {st.state.value}")

    async def resume(self, domid: int) -> None:
        dom = self._domain(domid)
        st = dom.read_state()
        if (st.state, st.reason) != (RunState.SHUTDOWN, ShutdownReason.SUSPEND):
            raise NotRunning(f"cannot resume domain {domid}: it is {st.state.value}, not suspended")
        if await self._request(domid, b"R", 10.0) != b"r":
            raise HypervisorError(f"domain {domid} did not resume")

    async def switch_logdirty(self, domid: int, enable: bool) -> None:
        # no device model: the simulated guest marks its own pages
        self._domain(domid)

    def helper_env(self) -> dict[str, str]:
        helper = os.environ.get("LIBXL_SAVE_HELPER") or _sim_helper()
        return {"LIBXL_SAVE_HELPER": helper, "REMUS_SIM_HOST": str(self.host)}

    def default_witness(self) -> str | None:
        """One directory per machine: every simulated host here shares it, whatever
        their own directories (tooz's file driver: an fcntl lock per protection)."""
        return f"file://{default_witness_dir()}"


def _zombie(pid: int) -> bool:
    """The process has exited and waits to be reaped (its state in /proc is Z)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # gone meanwhile
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def _stopped(pid: int) -> bool:
    """The process is stopped by a signal (its state in /proc is T)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] == "T"


def default_witness_dir() -> Path:
    """``$REMUS_SIM_WITNESS``, else /run/remus-sim/witness (root) or the user's runtime
    directory: a tmpfs, so that leases and takeover marks go with a reboot, as the
    simulated guests do."""
    env = os.environ.get("REMUS_SIM_WITNESS")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/remus-sim/witness")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/remus-sim-{os.geteuid()}"
    return Path(runtime) / "remus-sim" / "witness"


def _sim_helper() -> str:
    beside = Path(sys.executable).parent / "remus-sim-save-helper"
    if beside.exists():
        return str(beside)
    found = shutil.which("remus-sim-save-helper")
    if found:
        return found
    raise HypervisorError("remus-sim-save-helper is not installed (./dev setup installs it)")


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])
