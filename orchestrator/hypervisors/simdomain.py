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
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import uuid as uuidlib
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final

PAGE_SIZE: Final = 4096
BLOCK_SIZE: Final = 4096
DEFAULT_DISK_MIB: Final = 4
DEFAULT_MEMORY_MIB: Final = 128
HOST_ENV: Final = "REMUS_SIM_HOST"


class RunState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"  # with a reason, e.g. suspend
    DYING = "dying"


class ShutdownReason(StrEnum):
    NONE = ""
    POWEROFF = "poweroff"
    REBOOT = "reboot"
    SUSPEND = "suspend"
    CRASH = "crash"


def default_host_dir() -> Path:
    env = os.environ.get(HOST_ENV)
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/remus-sim/default")
    state = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state"))
    return state / "remus-sim/default"


@dataclass(frozen=True)
class DomainConfig:
    name: str
    uuid: str
    domid: int
    domain_type: str  # "pv" or "hvm"
    pages: int
    disk: str = ""  # path of the raw disk image, "" for a diskless domain
    # the guest's kernel command line (libxl's b_info type.pv cmdline): what the
    # guest service is told at boot, so that a restored or COLO secondary copy
    # runs the same program as the primary
    cmdline: str = ""

    @property
    def memory_bytes(self) -> int:
        return self.pages * PAGE_SIZE


_STATES: Final = list(RunState)
_REASONS: Final = list(ShutdownReason)
_STATE_WORD: Final = struct.Struct("<II")


@dataclass(frozen=True)
class DomainState:
    state: RunState
    reason: ShutdownReason = ShutdownReason.NONE

    def pack(self) -> bytes:
        return _STATE_WORD.pack(_STATES.index(self.state), _REASONS.index(self.reason))

    @classmethod
    def unpack(cls, raw: bytes) -> DomainState:
        s, r = _STATE_WORD.unpack(raw)
        return cls(_STATES[s], _REASONS[r])


class NoSuchDomain(LookupError):
    pass


class SimDomain:
    """Handle on one domain's files. Maps memory and the dirty map lazily."""

    def __init__(self, path: Path) -> None:
        self.path = path
        cfg = path / "config.json"
        if not cfg.exists():
            raise NoSuchDomain(f"no simulated domain at {path}")
        self.config = DomainConfig(**json.loads(cfg.read_text()))
        self._maps: dict[str, mmap.mmap] = {}

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
    def pages(self) -> int:
        return self.config.pages

    def _map(self, name: str, size: int) -> mmap.mmap:
        """The shared mapping of one of the domain's files, made on first use."""
        m = self._maps.get(name)
        if m is None:
            with open(self.path / name, "r+b") as f:
                m = self._maps[name] = mmap.mmap(f.fileno(), size)
        return m

    @property
    def memory(self) -> mmap.mmap:
        return self._map("memory", self.config.memory_bytes)

    @property
    def dirty(self) -> mmap.mmap:
        return self._map("dirty", self.config.pages)

    @property
    def disk_path(self) -> Path | None:
        return Path(self.config.disk) if self.config.disk else None

    @property
    def disk_blocks(self) -> int:
        d = self.disk_path
        return d.stat().st_size // BLOCK_SIZE if d is not None and d.exists() else 0

    def disk_dirty(self) -> mmap.mmap:
        """The block dirty map, (re)sized to the image: a replica's image is sized late."""
        blocks = self.disk_blocks
        if blocks == 0:
            raise ValueError(f"domain {self.config.name} has no disk")
        f = self.path / "disk.dirty"
        m = self._maps.get("disk.dirty")
        if m is not None and len(m) == blocks:
            return m
        if m is not None:
            m.close()
            del self._maps["disk.dirty"]
        with open(f, "ab") as fh:
            fh.truncate(blocks)
        return self._map("disk.dirty", blocks)

    @property
    def _state_map(self) -> mmap.mmap:
        return self._map("state", _STATE_WORD.size)

    def read_state(self) -> DomainState:
        # one 8-byte aligned load: a writer in another process is seen whole or not at all
        return DomainState.unpack(self._state_map[:8])

    def write_state(self, state: DomainState) -> None:
        self._state_map[:8] = state.pack()

    def read_vcpu(self) -> bytes:
        return (self.path / "vcpu").read_bytes()

    def write_vcpu(self, blob: bytes) -> None:
        _atomic_write(self.path / "vcpu", blob)

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()


def domain_path(host: Path, domid: int) -> Path:
    return host / "domains" / str(domid)


def _atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, str):
        data = data.encode()
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
