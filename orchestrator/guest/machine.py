"""The simulated machine as its guest sees it: the domain directory's shared files.

The simulated hypervisor, the guest and the simulated save helper are
separate processes, as the hypervisor, the guest and libxc are on Xen; this
layout is the "hardware" they share, so it lives at the bottom, where the
guest can use it without knowing the hypervisor. ``hypervisors/simdomain.py``
builds domains on it (creation, vCPU context) and documents the directory::

    config.json   name, uuid, type, memory pages, disk, command line
    state         run state and shutdown reason: one aligned 8-byte word (mmap)
    memory        guest memory, 4 KiB pages (mmap)
    dirty         log-dirty map: one byte per page (mmap)
    disk.dirty    the block backend's dirty map: one byte per disk block (mmap)
    evtchn.sock   the suspend event channel, served by the guest
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final

PAGE_SIZE: Final = 4096
# the granularity of the disk's dirty map: the block backend marks whole blocks
BLOCK_SIZE: Final = 4096
EVTCHN: Final = "evtchn.sock"


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
STATE_WORD: Final = struct.Struct("<II")


@dataclass(frozen=True)
class DomainState:
    state: RunState
    reason: ShutdownReason = ShutdownReason.NONE

    def pack(self) -> bytes:
        return STATE_WORD.pack(_STATES.index(self.state), _REASONS.index(self.reason))

    @classmethod
    def unpack(cls, raw: bytes) -> DomainState:
        s, r = STATE_WORD.unpack(raw)
        return cls(_STATES[s], _REASONS[r])


class NoSuchDomain(LookupError):
    pass


class Machine:
    """Handle on one domain's shared files. Maps memory and the dirty maps lazily."""

    def __init__(self, path: Path) -> None:
        self.path = path
        cfg = path / "config.json"
        if not cfg.exists():
            raise NoSuchDomain(f"no simulated domain at {path}")
        self.config = DomainConfig(**json.loads(cfg.read_text()))
        self._maps: dict[str, mmap.mmap] = {}

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
        return self._map("state", STATE_WORD.size)

    def read_state(self) -> DomainState:
        # one 8-byte aligned load: a writer in another process is seen whole or not at all
        return DomainState.unpack(self._state_map[:8])

    def write_state(self, state: DomainState) -> None:
        self._state_map[:8] = state.pack()

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()
