"""Two simulated hosts that can be cut apart: a lab of network namespaces (issue 22).

Host A and host B each live in a network namespace of their own, joined by a
veth pair (the replication link), each with an uplink of its own to the root
namespace, where the witness (a real etcd) listens on the root end of both::

    root namespace      etcd on 127.0.0.1 and on the root end of each uplink
      ru<id>a  .1 ----- uplink A            ru<id>b  .1 ----- uplink B
                       uplink .2 rha-<id>                    uplink .2 rhb-<id>
                         repl .1 ======== replication link ======== repl .2
                         vif<tag>.<domid> -> rsim-<tag>-<domid>     (its guests)

The lab's own addresses (link and uplinks) are /30s of 198.19.255.0/24, the
top of the simulated hosts' pool (198.18.0.0/15, RFC 2544's benchmarking
range), the guests' are their host's /26 of it (a host directory is chosen
whose /26 is neither that /24 nor in use): the root namespace has
``unreachable`` for the pool, so nothing leaves the machine. Each host
namespace has that route too (a gone guest is unreachable there as well) and
forwards: the root namespace routes each host's guests' /26 over its uplink.

The hosts are :class:`SimHypervisor`\\ s whose directory records the host's
namespace: their vifs and the iptables rules naming them are there, and their
orchestrator processes are started there (:meth:`HostLab.popen`), so NFQUEUE,
the COLO tap and iptables all see the host's vifs.

Clients: the output buffers (NFQUEUE) and COLO's comparer and output filter
hook the INPUT chain of the guest's host, so a client whose packets the host
forwards (one in the root namespace, over the uplink) would see the guest's
replies unheld. Clients that must see what the protection shows its clients
connect from inside a host's namespace (:meth:`HostLab.connect`), as they did
from the root namespace when it was every host's. The two namespaces hand out
disjoint local ports, so that a connection to one copy never has the ports
of a connection to the other (COLO's secondary reports its guest's output by
ports).

Faults are iptables DROP rules inside a host namespace (packets vanish, as on
a cut wire, rather than being refused): :meth:`~HostLab.cut_link`,
:meth:`~HostLab.cut_witness`, :meth:`~HostLab.kill_host`. :meth:`HostLab.close`
removes everything (processes, guests, namespaces, veths, routes, rules), and
runs however :meth:`HostLab.start` ended.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Literal

from orchestrator.hypervisors.sim import ADDRESS_POOL, SimHypervisor, have_netns

from .etcd import EtcdServer
from .tlshosts import trust_each_other

Host = Literal["a", "b"]
Direction = Literal["both", "a->b", "b->a"]
HOSTS: Final[tuple[Host, Host]] = ("a", "b")

LAB_NET: Final = ipaddress.IPv4Network("198.19.255.0/24")
LOCK: Final = Path("/tmp/remus-hostlab.lock")
# one file per live lab, named by its id, holding its directory: what sweep() needs
# to clean up after a test process that was killed before its own cleanup
MANIFESTS: Final = Path("/tmp/remus-hostlab")
LINK_DEV: Final = "repl"  # the replication link's end in each host namespace
UPLINK_DEV: Final = "uplink"  # the uplink's end in each host namespace
# each host's local ports (ip_local_port_range is per namespace): disjoint
PORTS: Final[dict[Host, tuple[int, int]]] = {"a": (20000, 39999), "b": (40000, 59999)}

_CLONE_NEWNET: Final = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def unavailable() -> str | None:
    """None if a lab can be built here, else why not."""
    if not have_netns():
        return "needs root and iproute2 (network namespaces)"
    if shutil.which("iptables") is None:
        return "needs iptables"
    if etcd_binary() is None:
        return "no etcd binary: apt-get install etcd-server (Debian's etcd)"
    return None


def etcd_binary() -> str | None:
    return shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.returncode}")
    return r


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def socket_in(netns: str, family: int = socket.AF_INET) -> socket.socket:
    """A TCP socket of the namespace ``netns``: made there by this thread, which
    comes straight back (a socket stays in the namespace it was made in)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                return socket.socket(family, socket.SOCK_STREAM)
            finally:
                _setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)


@dataclass
class _Side:
    """One host's namespace and addresses."""

    host: Host
    ns: str
    root_dev: str  # the uplink's end in the root namespace
    root_ip: str  # ... and its address: where this host reaches etcd
    up_ip: str  # the uplink's end in the host namespace
    link_ip: str  # the host's end of the replication link
    hv: SimHypervisor | None = None


class HostLab:
    """Hosts A and B in namespaces of their own, etcd reachable from each by its own
    path; faults made and healed with iptables inside the host namespaces."""

    def __init__(self, workdir: Path, etcd: str | None = None) -> None:
        self.workdir = workdir
        self.id = f"{os.getpid()}-{os.urandom(2).hex()}"
        tag = os.urandom(3).hex()
        self._sides: dict[Host, _Side] = {
            h: _Side(h, f"rh{h}-{self.id}", f"ru{tag}{h}", "", "", "") for h in HOSTS
        }
        binary = etcd or etcd_binary()
        if binary is None:
            raise RuntimeError("no etcd binary")
        self._etcd_binary = binary
        self.etcd: EtcdServer | None = None
        self._rules: list[tuple[Host, str, list[str]]] = []  # (host, kind, rule)
        self._procs: list[subprocess.Popen[Any]] = []
        self._logs: list[IO[bytes]] = []

    # -- building and taking down ---------------------------------------------------

    def __enter__(self) -> HostLab:
        self.start()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _exc: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        why = unavailable()
        if why:
            raise RuntimeError(f"a host lab {why}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            with _locked():  # another lab choosing addresses at the same time
                sweep()
                MANIFESTS.mkdir(exist_ok=True)
                (MANIFESTS / self.id).write_text(str(self.workdir.resolve()))
                self._build()
            assert self.etcd is not None
            self.etcd.start()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        link, up_a, up_b = _free_slots(3)
        for side, up in zip(self._sides.values(), (up_a, up_b), strict=True):
            side.root_ip, side.up_ip = str(up[1]), str(up[2])
            side.link_ip = str(link[1] if side.host == "a" else link[2])
        a, b = self._sides["a"], self._sides["b"]
        for side in (a, b):
            _run("ip", "netns", "add", side.ns)
            _run("ip", "-n", side.ns, "link", "set", "lo", "up")
            low, high = PORTS[side.host]
            for key, value in (
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.ip_local_port_range", f"{low} {high}"),
            ):
                _run("ip", "netns", "exec", side.ns, "sysctl", "-qw", f"{key}={value}")
        _run(
            "ip", "-n", a.ns, "link", "add", LINK_DEV, "type", "veth",
            "peer", "name", LINK_DEV, "netns", b.ns,
        )  # fmt: skip
        for side in (a, b):
            _run("ip", "-n", side.ns, "addr", "add", f"{side.link_ip}/30", "dev", LINK_DEV)
            _run("ip", "-n", side.ns, "link", "set", LINK_DEV, "up")
            _run(
                "ip", "link", "add", side.root_dev, "type", "veth",
                "peer", "name", UPLINK_DEV, "netns", side.ns,
            )  # fmt: skip
            _run("ip", "addr", "add", f"{side.root_ip}/30", "dev", side.root_dev)
            _run("ip", "link", "set", side.root_dev, "up")
            _run("ip", "-n", side.ns, "addr", "add", f"{side.up_ip}/30", "dev", UPLINK_DEV)
            _run("ip", "-n", side.ns, "link", "set", UPLINK_DEV, "up")
            # a gone guest's address fails at once here too, rather than going up
            _run("ip", "-n", side.ns, "route", "replace", "unreachable", str(ADDRESS_POOL))
        taken: set[ipaddress.IPv4Network] = set()
        for side in (a, b):
            side.hv = self._new_host(side, taken)
            subnet = side.hv.host_subnet()
            taken.add(subnet)
            _run("ip", "route", "replace", str(subnet), "via", side.up_ip, "dev", side.root_dev)
        # as an admin sets two hosts up: `host init` on each, each trusting the other's
        # certificate (the replication link is mutual TLS by default)
        assert a.hv is not None and b.hv is not None
        trust_each_other(a.hv, b.hv)
        self.etcd = EtcdServer(
            self._etcd_binary, self.workdir / "etcd-data", [a.root_ip, b.root_ip]
        )

    def _new_host(self, side: _Side, taken: set[ipaddress.IPv4Network]) -> SimHypervisor:
        """A host directory whose guests' subnet is free: not the lab's, not the other
        host's, not routed on this machine already (another host's guests)."""
        for k in range(64):
            hv = SimHypervisor(self.workdir / f"host{side.host.upper()}{k or ''}", netns=side.ns)
            subnet = hv.host_subnet()
            if subnet.overlaps(LAB_NET) or subnet in taken:
                continue
            if _run("ip", "-4", "route", "show", "to", "root", str(subnet)).stdout.strip():
                continue
            return hv
        raise RuntimeError(f"no free guest subnet for host {side.host}")

    def close(self) -> None:
        """Everything goes, whatever state the lab is in; never raises."""
        for side in self._sides.values():
            with contextlib.suppress(Exception):
                self._kill_pids(side.host)
        for proc in self._procs:
            with contextlib.suppress(Exception):
                _kill(proc)
        self._procs.clear()
        for side in self._sides.values():
            if side.hv is not None:
                with contextlib.suppress(Exception):
                    self._destroy_all(side.hv)
        if self.etcd is not None:
            with contextlib.suppress(Exception):
                self.etcd.kill()
        for side in self._sides.values():
            if side.hv is not None:
                _run("ip", "route", "del", str(side.hv.host_subnet()), check=False)
            _run("ip", "link", "del", side.root_dev, check=False)
            # its veths, addresses, routes and iptables rules go with it
            _run("ip", "netns", "del", side.ns, check=False)
        self._rules.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()
        (MANIFESTS / self.id).unlink(missing_ok=True)

    def reset(self) -> None:
        """Between runs: every fault healed, every process started here and every
        guest of both hosts gone, status files removed, etcd up."""
        self.heal()
        for proc in self._procs:
            _kill(proc)
        self._procs.clear()
        for side in self._sides.values():
            self._kill_pids(side.host)
            assert side.hv is not None
            self._destroy_all(side.hv)
            for f in side.hv.state_dir().glob("*.json"):
                f.unlink()
        for log in self._logs:
            log.close()
        self._logs.clear()
        assert self.etcd is not None
        if not self.etcd.running:
            self.etcd.start()

    @staticmethod
    def _destroy_all(hv: SimHypervisor) -> None:
        for d in hv.list_domains():
            with contextlib.suppress(Exception):
                hv.destroy(d.domid)

    # -- what tests use -------------------------------------------------------------

    @property
    def a(self) -> SimHypervisor:
        return self.hv("a")

    @property
    def b(self) -> SimHypervisor:
        return self.hv("b")

    def hv(self, host: Host) -> SimHypervisor:
        hv = self._sides[host].hv
        assert hv is not None, "the lab is not started"
        return hv

    def netns(self, host: Host) -> str:
        return self._sides[host].ns

    def link_address(self, host: Host) -> str:
        """The host's end of the replication link (where a receiver there listens)."""
        return self._sides[host].link_ip

    def witness(self, host: Host) -> str:
        """The witness URL as ``host`` reaches it: over its own uplink."""
        assert self.etcd is not None
        return self.etcd.url_at(self._sides[host].root_ip)

    def remusctl(self, host: Host, *args: str) -> list[str]:
        """`remusctl --host DIR ARGS` run in the host's namespace."""
        cli = [sys.executable, "-m", "orchestrator.cli", "--host", str(self.hv(host).host)]
        return ["ip", "netns", "exec", self.netns(host), *cli, *args]

    def popen(self, host: Host, *args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
        """`remusctl ARGS` on ``host`` as a process (output into ``log``), killed by
        :meth:`reset` and :meth:`close` if still running."""
        out: IO[bytes] | int = subprocess.DEVNULL
        if log is not None:
            out = open(log, "ab")  # noqa: SIM115 (closed by reset and close)
            self._logs.append(out)
        proc = subprocess.Popen(
            self.remusctl(host, *args), stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
        self._procs.append(proc)
        return proc

    def run(self, host: Host, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.remusctl(host, *args), capture_output=True, text=True, timeout=timeout
        )

    def connect(self, host: Host, address: str, timeout: float) -> socket.socket:
        """A TCP connection to ``address`` (HOST:PORT) from inside ``host``'s namespace."""
        ip, port = address.rsplit(":", 1)
        s = socket_in(self.netns(host))
        try:
            s.settimeout(timeout)
            s.connect((ip, int(port)))
        except BaseException:
            s.close()
            raise
        return s

    # -- faults -----------------------------------------------------------------------

    def cut_link(self, direction: Direction = "both") -> None:
        """The replication link loses what goes ``a->b``, ``b->a``, or both ways
        (dropped as it arrives: the sender's kernel sends it all the same)."""
        receivers: dict[Direction, tuple[Host, ...]] = {
            "a->b": ("b",),
            "b->a": ("a",),
            "both": HOSTS,
        }
        for host in receivers[direction]:
            self._rule(host, "link", ["INPUT", "-i", LINK_DEV, "-j", "DROP"])

    def heal_link(self) -> None:
        self._unrule(lambda _host, kind: kind == "link")

    def cut_witness(self, host: Host) -> None:
        """``host`` loses its path to etcd, both ways (the other host keeps its own)."""
        assert self.etcd is not None
        port = str(self.etcd.port)
        self._rule(host, "witness", ["OUTPUT", "-o", UPLINK_DEV, "-p", "tcp", "--dport", port,
                                     "-j", "DROP"])  # fmt: skip
        self._rule(host, "witness", ["INPUT", "-i", UPLINK_DEV, "-p", "tcp", "--sport", port,
                                     "-j", "DROP"])  # fmt: skip

    def heal_witness(self, host: Host) -> None:
        self._unrule(lambda h, kind: h == host and kind == "witness")

    def heal(self) -> None:
        """Every fault gone (a killed host's processes stay dead)."""
        self._unrule(lambda _host, _kind: True)

    def kill_host(self, host: Host, silent: bool = True) -> None:
        """``host`` dies: its orchestrator processes and its guests are SIGKILLed.
        ``silent``: as a host that loses power, it says nothing more (no FIN, no
        RST): everything it would send on the link and the uplink is dropped first."""
        if silent:
            for chain, io in (("INPUT", "-i"), ("OUTPUT", "-o")):
                for dev in (LINK_DEV, UPLINK_DEV):
                    self._rule(host, "dead", [chain, io, dev, "-j", "DROP"])
        self._kill_pids(host)
        hv = self.hv(host)
        for pid_file in (hv.host / "domains").glob("*/guest.pid"):
            with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)

    def pids(self, host: Host) -> list[int]:
        """The processes in the host's namespace (its orchestrator and helpers; not
        this test, whose threads only visit it)."""
        r = _run("ip", "netns", "pids", self.netns(host), check=False)
        return [int(p) for p in r.stdout.split() if p.isdigit() and int(p) != os.getpid()]

    def _kill_pids(self, host: Host) -> None:
        killed = self.pids(host)
        for pid in killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self._procs:  # ours are reaped, not left as zombies
            if proc.pid in killed:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)

    def _rule(self, host: Host, kind: str, rule: list[str]) -> None:
        _run("ip", "netns", "exec", self.netns(host), "iptables", "-w", "-I", *rule)
        self._rules.append((host, kind, rule))

    def _unrule(self, which: Callable[[Host, str], bool]) -> None:
        keep = []
        for host, kind, rule in self._rules:
            if which(host, kind):
                _run("ip", "netns", "exec", self.netns(host), "iptables", "-w", "-D", *rule,
                     check=False)  # fmt: skip
            else:
                keep.append((host, kind, rule))
        self._rules = keep


def _kill(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()  # stopped or not
    proc.wait(10)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    with open(LOCK, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _free_slots(n: int) -> list[ipaddress.IPv4Network]:
    """``n`` /30s of the lab's /24 that no interface of the root namespace uses."""
    slots = list(LAB_NET.subnets(new_prefix=30))
    start = int.from_bytes(os.urandom(1), "little") % len(slots)
    free: list[ipaddress.IPv4Network] = []
    for k in range(len(slots)):
        slot = slots[(start + k) % len(slots)]
        if not _run("ip", "-o", "-4", "addr", "show", "to", str(slot)).stdout.strip():
            free.append(slot)
            if len(free) == n:
                return free
    raise RuntimeError(f"fewer than {n} free /30s in {LAB_NET}")


def wait_exit(proc: subprocess.Popen[Any], timeout: float) -> bool:
    """True once ``proc`` has exited; False if it still runs after ``timeout``."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
        return True
    return False


def _alive(pid: int) -> bool:
    """Running, or stopped: not gone and not a zombie nobody reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def sweep() -> None:
    """What labs whose test process is gone (killed before its cleanup) left: their
    hosts' guests, the processes in their namespaces, the namespaces."""
    for manifest in MANIFESTS.glob("*-*") if MANIFESTS.exists() else ():
        pid = manifest.name.split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            for host_dir in Path(manifest.read_text()).glob("host[AB]*"):
                with contextlib.suppress(Exception):
                    hv = SimHypervisor(host_dir)
                    for d in hv.list_domains():
                        hv.destroy(d.domid)
            manifest.unlink(missing_ok=True)
    for path in Path("/run/netns").glob("rh[ab]-*-*"):
        pid = path.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            left = _run("ip", "netns", "pids", path.name, check=False).stdout.split()
            for p in left:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(p), signal.SIGKILL)
            _run("ip", "netns", "del", path.name, check=False)


def poll(cond: Callable[[], object], timeout: float, every: float = 0.05) -> bool:
    """``cond()`` true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)
