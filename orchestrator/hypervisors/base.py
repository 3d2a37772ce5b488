"""The small interface the protection logic needs from a hypervisor, in Xen's terms.

Backends (``sim.py``, the simulated hypervisor, and ``xen.py``, Xen 4.17)
implement it; ``protection/`` never imports a backend directly but opens one
through ``select.open_hypervisor``. What a backend can do beyond the common
operations it declares as :class:`Capability` members, which callers ask
with :meth:`Hypervisor.can` rather than comparing the backend's name (as
Ganeti's hypervisors declare ``CAN_MIGRATE``). What only Xen has stays in
the Xen backend.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

# the unit of a BlockDevice's dirty map, and so of disk replication's DISK frames
BLOCK_SIZE: Final = 4096


class Capability(enum.Enum):
    """What a backend can do beyond the common operations."""

    # a fence guard may destroy the domain when the protecting process dies (Xen; not
    # the simulation by default, whose copies share one machine and cannot split)
    FENCE = "fence"
    # disk_of() gives a BlockDevice with a dirty map (the simulation; Xen's Remus
    # needs DRBD or blktap, which we do not drive)
    DISK_REPLICATION = "disk_replication"
    # memory_digest() can read a domain's memory (the simulation)
    MEMORY_ACCESS = "memory_access"
    # the secondary restores through the toolstack's own receiver (xl
    # migrate-receive), not through the restore helper directly (Xen)
    TOOLSTACK_RESTORE = "toolstack_restore"
    # this backend can run COLO (the simulation; Xen ships COLO for HVM only)
    COLO = "colo"
    # vif_name()/vif_addresses() give the guest's link, where its output can be
    # held and COLO's input injected (the simulation, as root)
    GUEST_NETWORK = "guest_network"


class BlockDevice(Protocol):
    """What disk replication needs from a domain's disk (see ``devices/disk.py``)."""

    @property
    def name(self) -> str:
        """The domain's name, for messages."""
        ...

    @property
    def disk_path(self) -> Path | None:
        """The disk image, None for a diskless domain."""
        ...

    @property
    def disk_blocks(self) -> int:
        """The image's size in blocks of BLOCK_SIZE (0 without a disk)."""
        ...

    def disk_dirty(self) -> mmap.mmap:
        """One byte per block, 1 where the guest wrote since the mark was cleared;
        sized to the image (a replica's image is sized late)."""
        ...


class HypervisorError(Exception):
    """A backend operation that failed; the message says what and on which domain."""


class DomainNotFound(HypervisorError):
    pass


class NotRunning(HypervisorError):
    """The operation needs a running domain (e.g. suspend of a paused one)."""


class SuspendTimeout(HypervisorError):
    pass


@dataclass(frozen=True)
class DomainInfo:
    domid: int
    name: str
    uuid: str
    domain_type: str  # "pv", "pvh" or "hvm"
    memory_bytes: int
    state: str  # running, paused, shutdown, dying
    shutdown_reason: str = ""
    # libxl's domain configuration as JSON (what `xl list -l` prints and an
    # xl savefile header carries)
    config: dict[str, Any] = field(default_factory=dict)
    address: str = ""  # where the guest's service listens, if the backend knows


@dataclass(frozen=True)
class HostMemory:
    """What a host can give a new domain: a peer's pre-flight compares free_bytes
    with the domain's memory."""

    total_bytes: int
    free_bytes: int  # for a new domain now, claims already made deducted
    claimed_bytes: int  # promised to domains still being built (Xen's claims)
    source: str  # where the figures come from


class Hypervisor(abc.ABC):
    """One host's hypervisor."""

    # for display, and for opening the same backend in another process (select.py)
    name: str = "base"

    @property
    def capabilities(self) -> frozenset[Capability]:
        """What this backend can do; a backend whose answer depends on the host
        (root, say) keeps this a property, the others override it with a constant."""
        return frozenset()

    def can(self, cap: Capability) -> bool:
        return cap in self.capabilities

    @abc.abstractmethod
    def list_domains(self) -> list[DomainInfo]: ...

    @abc.abstractmethod
    def lookup(self, name_or_domid: str | int) -> DomainInfo:
        """By name, or by domid when given an int or a string of digits."""

    @abc.abstractmethod
    async def suspend(self, domid: int, timeout: float = 60.0) -> None:
        """Ask the guest to suspend and wait until it is shut down with reason suspend."""

    @abc.abstractmethod
    async def resume(self, domid: int) -> None:
        """Fast resume (suspend cancelled): the same guest carries on."""

    @abc.abstractmethod
    def pause(self, domid: int) -> None: ...

    @abc.abstractmethod
    def unpause(self, domid: int) -> None: ...

    @abc.abstractmethod
    def destroy(self, domid: int) -> None: ...

    @abc.abstractmethod
    async def switch_logdirty(self, domid: int, enable: bool) -> None:
        """The device model's log-dirty mode (HVM); a no-op where there is none."""

    @abc.abstractmethod
    def create_restore_target(
        self, config: dict[str, Any], name: str, replica_disk: bool = False
    ) -> DomainInfo:
        """An empty, paused domain for an incoming stream.

        ``replica_disk``: its disks are this host's replicas, filled by disk
        replication, rather than the images the configuration names.
        """

    @abc.abstractmethod
    async def finish_restore(self, domid: int, paused: bool = False) -> DomainInfo:
        """Start the restored domain from the last checkpoint applied to it.

        ``paused``: build it but leave it paused (silent on the network), for an
        ``unpause`` once it may run: a secondary builds its copy while it waits
        for the lease, so that taking the lease is all that stands between the
        primary's expiry and a guest that answers.
        """

    @abc.abstractmethod
    def helper_env(self) -> dict[str, str]:
        """Environment for libxl-save-helper (which helper, which host)."""

    def memory(self) -> HostMemory:
        """The memory a restored copy could have here, as this backend counts it.

        By default the host kernel's MemAvailable: a simulated guest is a process
        of this host. A backend with memory of its own (Xen's heap, which dom0's
        /proc/meminfo does not show) says what its hypervisor says."""
        total = available = 0
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                elif line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
        return HostMemory(total, available, 0, "/proc/meminfo MemAvailable")

    def default_witness(self) -> str | None:
        """The witness a protection uses when none is named (tooz's URL), or None when
        this backend has none to offer: a file witness is one machine's, so only a
        backend whose hosts share a machine can default to one."""
        return None

    def state_dir(self) -> Path:
        """Where protections on this host publish their status files."""
        return Path(os.environ.get("REMUS_STATE_DIR", "/var/lib/remus"))

    def tls_dir(self) -> Path:
        """This host's replication identity: its key, its certificate, its pinned peers."""
        return Path(os.environ.get("REMUS_TLS_DIR", "/var/lib/remus/tls"))

    def vif_name(self, domid: int) -> str | None:
        """The host end of the domain's network interface, where its output can be held."""
        return None

    def vif_addresses(self, domid: int) -> tuple[str, str] | None:
        """(host end, guest end) IPv4 addresses of the domain's link, where COLO's
        secondary injects mirrored input; None where the backend has none."""
        return None

    @property
    def supports_disk_replication(self) -> bool:
        """Alias of ``can(Capability.DISK_REPLICATION)``, until protection/ asks that."""
        return self.can(Capability.DISK_REPLICATION)

    def disk_of(self, domid: int) -> BlockDevice:
        """The domain's disk with its block dirty map (Capability.DISK_REPLICATION)."""
        raise HypervisorError(f"the {self.name} backend cannot replicate disks")

    def memory_digest(self, domid: int) -> bytes:
        """sha256 of the domain's whole memory (Capability.MEMORY_ACCESS): what COLO
        compares between the two copies after a checkpoint."""
        raise HypervisorError(f"the {self.name} backend cannot read a domain's memory")
