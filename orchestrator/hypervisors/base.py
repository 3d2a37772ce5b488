"""The small interface the protection logic needs from a hypervisor, in Xen's terms.

Backends (``sim.py``, later ``xen.py``) implement it; ``protection/`` never
imports a backend directly. What only Xen has stays in the Xen backend.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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


class Hypervisor(abc.ABC):
    """One host's hypervisor."""

    name: str = "base"

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
    async def finish_restore(self, domid: int) -> DomainInfo:
        """Start the restored domain from the last checkpoint applied to it."""

    @abc.abstractmethod
    def helper_env(self) -> dict[str, str]:
        """Environment for libxl-save-helper (which helper, which host)."""

    def state_dir(self) -> Path:
        """Where protections on this host publish their status files."""
        return Path(os.environ.get("REMUS_STATE_DIR", "/var/lib/remus"))

    def vif_name(self, domid: int) -> str | None:
        """The host end of the domain's network interface, where its output can be held."""
        return None

    def vif_addresses(self, domid: int) -> tuple[str, str] | None:
        """(host end, guest end) IPv4 addresses of the domain's link, where COLO's
        secondary injects mirrored input; None where the backend has none."""
        return None

    # disk replication needs a backend that can hand out a block dirty map
    supports_disk_replication: bool = False

    def disk_of(self, domid: int) -> Any:
        raise HypervisorError(f"the {self.name} backend cannot replicate disks")
