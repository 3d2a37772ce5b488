"""On-disk form of a simulated domain, shared by every process that touches it.

The simulated hypervisor (the embedded default), the guest service running
"inside" a domain and the simulated save helper are separate processes, as
the hypervisor, the guest and libxc are on Xen. They meet in a per-host
state directory::

    <host>/domains/<domid>/
        config.json   name, uuid, type (pv/hvm), memory pages: fixed at creation
        state         run state and shutdown reason: two u32 codes in one aligned
                      8-byte word, shared with mmap (the domain's "hypervisor page")
        memory        guest memory, 4 KiB pages, shared with mmap
        dirty         log-dirty map: one byte per page (1 = dirtied)
        vcpu          vCPU context blob
        disk.dirty    the block backend's dirty map: one byte per disk block

    <host>/disks/<name>.img   the domain's virtual disk (xvda), raw, 4 KiB blocks

The disk image lives outside the domain directory, as a Xen domain's disk
lives outside the domain: it outlives a destroy, and a domain restored from
a save file on the same host finds it again through its configuration.
Whoever writes a block marks it in ``disk.dirty`` (as blktap's tapdisk would
see the write go past), which is what Remus's disk replication sends.

One byte per page (not one bit) so that the guest setting a page's mark and
the saver clearing another page's mark never race on a shared byte.

The files the guest shares (memory, dirty maps, state word) are defined in
``orchestrator.guest.machine``, below this layer, so that the guest program
needs nothing of the hypervisor's; this module adds what only the
hypervisor and the save helper do: creating a domain and its vCPU context.
"""

from __future__ import annotations

import json
import os
import uuid as uuidlib
from dataclasses import asdict
from pathlib import Path
from typing import Final

from ..guest.machine import (
    BLOCK_SIZE,
    PAGE_SIZE,
    DomainConfig,
    DomainState,
    Machine,
    NoSuchDomain,
    RunState,
    ShutdownReason,
)
from .base import BLOCK_SIZE as DEVICE_BLOCK_SIZE

__all__ = [
    "BLOCK_SIZE",
    "DEFAULT_DISK_MIB",
    "DEFAULT_MEMORY_MIB",
    "HOST_ENV",
    "PAGE_SIZE",
    "DomainConfig",
    "DomainState",
    "NoSuchDomain",
    "RunState",
    "ShutdownReason",
    "SimDomain",
    "default_host_dir",
    "domain_path",
]

DEFAULT_DISK_MIB: Final = 4
DEFAULT_MEMORY_MIB: Final = 128
HOST_ENV: Final = "REMUS_SIM_HOST"

# the disk's dirty map is what disk_of() hands out as a BlockDevice: one mark per
# block of the interface's size, or disk replication would send the wrong ranges
if BLOCK_SIZE != DEVICE_BLOCK_SIZE:
    raise ImportError(
        f"simulated disk blocks of {BLOCK_SIZE} bytes, devices use {DEVICE_BLOCK_SIZE}"
    )


def default_host_dir() -> Path:
    env = os.environ.get(HOST_ENV)
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/remus-sim/default")
    state = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state"))
    return state / "remus-sim/default"


class SimDomain(Machine):
    """A domain as the hypervisor and the save helper handle it (a BlockDevice too)."""

    @classmethod
    def create(
        cls,
        host: Path,
        domid: int,
        name: str,
        pages: int,
        domain_type: str = "pv",
        uuid: str | None = None,
        disk: Path | None = None,
        cmdline: str = "",
    ) -> SimDomain:
        path = host / "domains" / str(domid)
        path.mkdir(parents=True, exist_ok=False)
        config = DomainConfig(
            name, uuid or str(uuidlib.uuid4()), domid, domain_type, pages, str(disk or ""), cmdline
        )
        with open(path / "memory", "wb") as f:
            f.truncate(config.memory_bytes)
        with open(path / "dirty", "wb") as f:
            f.truncate(pages)
        (path / "vcpu").write_bytes(b"")
        (path / "state").write_bytes(DomainState(RunState.PAUSED).pack())
        _atomic_write(path / "config.json", json.dumps(asdict(config)))
        return cls(path)

    @property
    def domid(self) -> int:
        return self.config.domid

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def pages(self) -> int:
        return self.config.pages

    def read_vcpu(self) -> bytes:
        return (self.path / "vcpu").read_bytes()

    def write_vcpu(self, blob: bytes) -> None:
        _atomic_write(self.path / "vcpu", blob)


def domain_path(host: Path, domid: int) -> Path:
    return host / "domains" / str(domid)


def _atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, str):
        data = data.encode()
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
