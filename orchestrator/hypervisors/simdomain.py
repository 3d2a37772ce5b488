"""On-disk form of a simulated domain, shared by every process that touches it.

The simulated hypervisor (the embedded default), the guest service running
"inside" a domain and the simulated save helper are separate processes, as
the hypervisor, the guest and libxc are on Xen. They meet in a per-host
state directory::

    <host>/domains/<domid>/
        config.json   name, uuid, type (pv/hvm), memory pages: fixed at creation
        state.json    run state and shutdown reason: replaced atomically
        memory        guest memory, 4 KiB pages, shared with mmap
        dirty         log-dirty map: one byte per page (1 = dirtied)
        vcpu          vCPU context blob

One byte per page (not one bit) so that the guest setting a page's mark and
the saver clearing another page's mark never race on a shared byte.
"""

from __future__ import annotations

import json
import mmap
import os
import uuid as uuidlib
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

PAGE_SIZE: Final = 4096
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

    @property
    def memory_bytes(self) -> int:
        return self.pages * PAGE_SIZE


@dataclass(frozen=True)
class DomainState:
    state: RunState
    reason: ShutdownReason = ShutdownReason.NONE
    # A suspend request pending for the guest, as control/shutdown = "suspend" in xenstore
    control: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state.value, "reason": self.reason.value, "control": self.control}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DomainState:
        return cls(RunState(d["state"]), ShutdownReason(d.get("reason", "")), d.get("control", ""))


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
        self._memory: mmap.mmap | None = None
        self._dirty: mmap.mmap | None = None

    @classmethod
    def create(
        cls, host: Path, domid: int, name: str, pages: int, domain_type: str = "pv"
    ) -> SimDomain:
        path = host / "domains" / str(domid)
        path.mkdir(parents=True, exist_ok=False)
        config = DomainConfig(name, str(uuidlib.uuid4()), domid, domain_type, pages)
        with open(path / "memory", "wb") as f:
            f.truncate(config.memory_bytes)
        with open(path / "dirty", "wb") as f:
            f.truncate(pages)
        (path / "vcpu").write_bytes(b"")
        _atomic_write(path / "state.json", json.dumps(DomainState(RunState.PAUSED).to_json()))
        _atomic_write(path / "config.json", json.dumps(asdict(config)))
        return cls(path)

    @property
    def domid(self) -> int:
        return self.config.domid

    @property
    def pages(self) -> int:
        return self.config.pages

    @property
    def memory(self) -> mmap.mmap:
        if self._memory is None:
            with open(self.path / "memory", "r+b") as f:
                self._memory = mmap.mmap(f.fileno(), self.config.memory_bytes)
        return self._memory

    @property
    def dirty(self) -> mmap.mmap:
        if self._dirty is None:
            with open(self.path / "dirty", "r+b") as f:
                self._dirty = mmap.mmap(f.fileno(), self.config.pages)
        return self._dirty

    def read_state(self) -> DomainState:
        return DomainState.from_json(json.loads((self.path / "state.json").read_text()))

    def write_state(self, state: DomainState) -> None:
        _atomic_write(self.path / "state.json", json.dumps(state.to_json()))

    def read_vcpu(self) -> bytes:
        return (self.path / "vcpu").read_bytes()

    def write_vcpu(self, blob: bytes) -> None:
        _atomic_write(self.path / "vcpu", blob)

    def close(self) -> None:
        for m in (self._memory, self._dirty):
            if m is not None:
                m.close()
        self._memory = self._dirty = None


def domain_path(host: Path, domid: int) -> Path:
    return host / "domains" / str(domid)


def _atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, str):
        data = data.encode()
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
