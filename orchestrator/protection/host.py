"""This host as a protection sees it: facts, pre-flight checks, and rescue after a crash.

remusd (``orchestrator/service/``) and ``remusctl`` ask here instead of reaching
into ``hypervisors/``, ``devices/``, ``savehelper/`` and ``transport/``
themselves: which backend runs, whether a save helper is installed, which
output buffers can work for a domain, whether a protection as asked can run
at all (the pre-flight), and how to put a domain back on its feet when the
worker that protected it died. The layering rule of the design (the service
calls only ``protection/``) then holds by construction, and a check that
changes (a new netbuf kind, a new backend) changes in one place.

The exception classes the service must tell apart are re-exported here, so
that it catches them without importing the layer that raises them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ..devices.netbuf_nfqueue import nfqueue_available, remove_stale_rules
from ..devices.netbuf_plug import plug_available
from ..hypervisors.base import (
    Capability,
    DomainInfo,
    DomainNotFound,
    Hypervisor,
    HypervisorError,
)
from ..hypervisors.select import BACKENDS, open_hypervisor
from ..savehelper.spawn import HelperNotFound, find_helper
from ..transport.channels import ChannelError, parse_addr, probe
from ..transport.control import PROTOCOL_VERSION, ControlError
from ..transport.endpoint import Endpoint, IncomingPair
from ..transport.sshtarget import parse_target
from ..transport.tls import PLAIN, Identity, Link, LinkError, Pin
from .fence import marker_path
from .spec import Mode, Netbuf, ProtectionSpec, SpecError

__all__ = [
    "BACKENDS",
    "PROTOCOL_VERSION",
    "DomainInfo",
    "DomainNotFound",
    "Endpoint",
    "Hypervisor",
    "HypervisorError",
    "IncomingPair",
    "Link",
    "LinkError",
    "Reason",
    "check_peer",
    "describe_host",
    "host_facts",
    "identity_facts",
    "link_of",
    "netbuf_options",
    "open_host",
    "preflight",
    "rescue_domain",
    "return_address",
    "sim_host_dir",
    "tls_identity",
]

log = logging.getLogger(__name__)

PROBE_TIMEOUT: Final = 3.0  # s: a peer slower than this to say HELLO is not one to replicate to
NO_VIF: Final = "the guest has no vif (not root)"


@dataclass(frozen=True)
class Reason:
    """One failed pre-flight check: its name (the API's ``check``) and why."""

    check: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"check": self.check, "message": self.message}


def open_host(backend: str | None = None, sim_host: Path | None = None) -> Hypervisor:
    """Xen where this is a dom0 (``$REMUS_BACKEND`` overrides), else the simulation."""
    return open_hypervisor(backend, sim_host)


def sim_host_dir(hv: Hypervisor) -> Path | None:
    """The simulated host's directory (what a worker's ``--host`` names), or None."""
    # the simulated backend names its host for the helper it spawns, and only it does
    where = hv.helper_env().get("REMUS_SIM_HOST")
    return Path(where) if where else None


def check_peer(peer: str) -> tuple[str, int]:
    """``HOST[:PORT]`` as a connect would take it, or :class:`SpecError` naming ``peer``.

    A host name must be ASCII here: the resolver's IDNA step raises UnicodeError
    (not OSError) for many non-ASCII names, which would surface as a crash deep in
    a connect instead of as a refused setting.
    """
    if not peer.isascii():
        raise SpecError("peer", f"{peer!r} is not ASCII (a host name or an address)")
    try:
        host, port = parse_addr(peer)
    except ValueError:
        raise SpecError("peer", f"{peer!r} is not HOST[:PORT]") from None
    if not 0 < port < 65536 or any(c.isspace() for c in host):
        raise SpecError("peer", f"{peer!r} is not HOST[:PORT]")
    return host, port


def return_address(listen_host: str, port: int, spec: ProtectionSpec) -> str:
    """``HOST:PORT`` at which ``spec``'s peer reaches this host's replication endpoint
    (listening on ``listen_host``, ``port``): what a switchover tells the peer to
    protect the guest back to. A wildcard listen address is no answer: then it is the
    address this host's packets to the peer leave from (the kernel's route choice,
    asked with a UDP socket's connect, which sends nothing)."""
    try:
        wildcard = not listen_host or ipaddress.ip_address(listen_host).is_unspecified
    except ValueError:  # a host name: the administrator's own answer
        wildcard = False
    host = listen_host
    if wildcard:
        target = parse_target(spec.ssh).host if spec.ssh else check_peer(spec.peer)[0]
        family, kind, proto, _, addr = socket.getaddrinfo(target, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.connect(addr)
            host = str(s.getsockname()[0])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def link_of(hv: Hypervisor, insecure: bool) -> Link:
    """The replication link as asked: mutual TLS with this host's identity, unless
    ``insecure`` (``--insecure-link``, ``replication.insecure``) asks for plain TCP."""
    return PLAIN if insecure else Link(Identity(hv.tls_dir()))


def tls_identity(hv: Hypervisor) -> Identity:
    """This host's key, certificate and pinned peers (``remusctl host init|trust``)."""
    return Identity(hv.tls_dir())


def identity_facts(hv: Hypervisor) -> dict[str, Any]:
    """The identity as GET /v1/host and `remusctl host info` show it."""
    ident = tls_identity(hv)

    def pin(p: Pin) -> dict[str, Any]:
        return {"name": p.name, "fingerprint": p.fingerprint, "certificate": p.cert_pem is not None}

    return {
        "directory": str(ident.directory),
        "certificate": str(ident.cert_path) if ident.exists() else None,
        "fingerprint": ident.fingerprint if ident.exists() else None,
        "trusted": [pin(p) for p in ident.pins()],
    }


def netbuf_options(hv: Hypervisor, domid: int) -> dict[str, str | None]:
    """Each output-buffer kind for this domain and why it cannot be used (None: it can)."""
    vif = hv.vif_name(domid)
    return {
        Netbuf.PLUG.value: plug_available() if vif else NO_VIF,
        Netbuf.NFQUEUE.value: nfqueue_available() if vif else NO_VIF,
        Netbuf.PROXY.value: None,
    }


def describe_host(hv: Hypervisor) -> dict[str, Any]:
    """What this host tells a primary's PROBE: room, names taken, backend."""
    return {
        # 0 if the hypervisor cannot tell: the peer's pre-flight then refuses
        "free_memory_bytes": int(_memory_facts(hv).get("free_bytes", 0)),
        "domains": [d.name for d in hv.list_domains()],
        "backend": hv.name,
        # what the peer's pre-flight checks (COLO needs it here), never our name
        "capabilities": sorted(c.name.lower() for c in hv.capabilities),
    }


def host_facts(hv: Hypervisor) -> dict[str, Any]:
    """Backend, Xen, save helper, libvirt and output buffering: remusd's GET /v1/host."""
    try:
        helper: str | None = find_helper(hv.helper_env())
        helper_error = None
    except HelperNotFound as exc:
        helper, helper_error = None, str(exc)
    host = sim_host_dir(hv)
    return {
        "backend": hv.name,
        "sim_host": str(host) if host is not None else None,
        "xen_version": _xen_version(),
        "helper": {"path": helper, "version": _helper_version(helper), "error": helper_error},
        "libvirt": _libvirt_status(),
        # host-wide: whether the kernel (and our privileges) allow each kind at all
        "netbuf": {
            Netbuf.PLUG.value: plug_available() or "available",
            Netbuf.NFQUEUE.value: nfqueue_available() or "available",
            Netbuf.PROXY.value: "available",
        },
        "protocol_version": PROTOCOL_VERSION,
        "identity": identity_facts(hv),
        # what a primary's pre-flight reads from this host as its peer
        "memory": _memory_facts(hv),
    }


def _memory_facts(hv: Hypervisor) -> dict[str, Any]:
    try:
        return dataclasses.asdict(hv.memory())
    except HypervisorError as exc:
        return {"error": str(exc)}


async def preflight(hv: Hypervisor, spec: ProtectionSpec) -> list[Reason]:
    """Every reason ``spec`` cannot be protected from this host (empty: it can).

    All of them, not the first: an administrator fixes a list at once. The peer is
    asked (PROBE) only when its address is one.
    """
    reasons: list[Reason] = []

    def fail(check: str, message: str) -> None:
        reasons.append(Reason(check, message))

    info = None
    try:
        info = hv.lookup(spec.name)
        if info.state != "running":
            fail("domain_running", f"domain {spec.name} is {info.state}, not running")
    except DomainNotFound as exc:
        fail("domain_exists", str(exc))
    unsafe = spec.unsafe_flags()
    if unsafe and not spec.unsafe:
        fail("unsafe", f"{' '.join(unsafe)} needs unsafe (-F), as with xl remus")
    try:
        find_helper(hv.helper_env())
    except HelperNotFound as exc:
        fail("helper", str(exc))
    if spec.mode is Mode.COLO:
        _preflight_colo(hv, spec, info, fail)
    elif info is not None and not spec.no_netbuf and spec.netbuf is not Netbuf.AUTO:
        why = netbuf_options(hv, info.domid).get(spec.netbuf.value)
        if why:
            fail("netbuf", f"{spec.netbuf.value}: {why}")
    if spec.blackhole:
        return reasons  # -b: nobody on the other end to ask
    if spec.ssh:
        # the peer has no endpoint to PROBE (its receiver starts with the SSH session):
        # its sshd answering is all there is to ask here; the worker's connect finds
        # out about the host key, the login and the command
        await _preflight_ssh(spec, fail)
        return reasons
    try:
        check_peer(spec.peer)
    except SpecError:
        if not spec.peer:
            fail("peer_address", "no peer: give peer (HOST[:PORT]) or ssh ([USER@]HOST[:PORT])")
            return reasons
        fail("peer_address", f"peer {spec.peer!r} is not HOST[:PORT]")
        return reasons
    try:
        peer = await probe(spec.peer, link_of(hv, spec.insecure_link), timeout=PROBE_TIMEOUT)
    except (OSError, TimeoutError, ChannelError, LinkError) as exc:
        fail("peer_reachable", f"peer {spec.peer}: {exc or type(exc).__name__}")
    except ControlError as exc:
        fail("peer_version", f"peer {spec.peer}: {exc}")
    else:
        free = int(peer.config.get("free_memory_bytes", 0))
        if info is not None and free < info.memory_bytes:
            fail(
                "peer_memory",
                f"peer has {free >> 20} MiB free, the domain needs {info.memory_bytes >> 20}",
            )
        if spec.name in peer.config.get("domains", []):
            fail("peer_name", f"peer already runs a domain named {spec.name}")
        if spec.mode is Mode.COLO and "colo" not in peer.config.get("capabilities", ()):
            fail("colo", f"peer {spec.peer}'s backend cannot run COLO (Xen has none for PV)")
    return reasons


async def _preflight_ssh(spec: ProtectionSpec, fail: Any) -> None:
    target = parse_target(spec.ssh)  # the spec has parsed it already
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(target.host, target.port), PROBE_TIMEOUT
        )
    except (OSError, TimeoutError) as exc:
        fail("peer_reachable", f"ssh {target}: {exc or type(exc).__name__}")
        return
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def _preflight_colo(
    hv: Hypervisor, spec: ProtectionSpec, info: DomainInfo | None, fail: Any
) -> None:
    if not hv.can(Capability.COLO):
        fail(
            "colo", f"COLO on the {hv.name} backend is not supported (Xen ships COLO for HVM only)"
        )
    if info is None or spec.no_netbuf:
        return
    # the worker would find this out only after connecting to the peer
    why = nfqueue_available() if hv.vif_name(info.domid) else NO_VIF
    if why:
        fail(
            "colo_compare",
            f"COLO compares the guest's output with NFQUEUE: {why} "
            "(-n -F runs COLO without comparing: output leaves unchecked)",
        )


# resumes started by rescue_domain, held until done: a bare task may be collected
# mid-flight; the set holds only unfinished ones, so it stays as small as the work
_RESCUES: set[asyncio.Task[None]] = set()


def rescue_domain(hv: Hypervisor, name: str, status_dir: Path) -> list[tuple[str, str]]:
    """Put back a domain whose worker died: its guest may be left suspended or paused
    mid-checkpoint, and its NFQUEUE rules (with nobody reading the queue) would keep
    every packet it sends. Returns what was done, as (event kind, message) pairs.

    A domain its fence guard stopped is left alone: the secondary runs the guest
    now, and resuming this copy would make two.
    """
    if marker_path(status_dir, name).exists():
        return [("fenced", "domain was fenced by its guard: not resumed")]
    try:
        info = hv.lookup(name)
    except DomainNotFound:
        return []
    vif = hv.vif_name(info.domid)
    if vif is not None:
        remove_stale_rules(vif)
    try:
        if info.state == "shutdown" and info.shutdown_reason == "suspend":
            task = asyncio.get_running_loop().create_task(hv.resume(info.domid))
            _RESCUES.add(task)
            task.add_done_callback(_RESCUES.discard)
            return [("resumed", "domain was left suspended: resumed")]
        if info.state == "paused":
            hv.unpause(info.domid)
            return [("resumed", "domain was left paused: unpaused")]
    except HypervisorError as exc:
        return [("error", f"could not resume the domain: {exc}")]
    return []


def _xen_version() -> str | None:
    try:
        major = Path("/sys/hypervisor/version/major").read_text().strip()
        minor = Path("/sys/hypervisor/version/minor").read_text().strip()
    except OSError:
        return None  # not running on Xen: the simulated backend
    return f"{major}.{minor}"


def _helper_version(path: str | None) -> str | None:
    """libxl-save-helper has no --version; its install directory names the Xen release."""
    if path is None:
        return None
    for part in Path(path).parts:
        if part.startswith("xen-") and part[4:].replace(".", "").isdigit():
            return part[4:]
    return "simulated" if "sim" in Path(path).name else None


def _libvirt_status() -> dict[str, Any]:
    try:
        import libvirt  # type: ignore[import-untyped]
    except ImportError as exc:
        return {"available": False, "error": str(exc)}
    sock = Path("/run/libvirt/libvirt-sock")
    return {
        "available": True,
        "library_version": libvirt.getVersion(),
        "libvirtd_running": sock.exists(),
        "uri": "xen:///system" if _xen_version() else None,
    }
