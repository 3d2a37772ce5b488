"""Two helpers under one harness: Xen 4.17's real libxl-save-helper (with the
xc_standin.so LD_PRELOAD stand-in for libxc) and our simulated helper."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from orchestrator.hypervisors.simdomain import (
    DomainState,
    RunState,
    ShutdownReason,
    SimDomain,
)

HERE = Path(__file__).parent
REAL_HELPER = Path("/usr/lib/xen-4.17/bin/libxl-save-helper")
SIM_HELPER = Path(sys.executable).parent / "remus-sim-save-helper"


@pytest.fixture(scope="session")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build xc_standin.so with the system compiler (skip, saying why, if we cannot)."""
    if not REAL_HELPER.exists():
        pytest.skip(f"{REAL_HELPER} missing: install Debian's xen-utils-4.17 (./dev does, as root)")
    if not shutil.which(os.environ.get("CC", "cc")):
        pytest.skip("no C compiler (cc): install gcc")
    if not Path("/usr/include/xenguest.h").exists():
        pytest.skip("/usr/include/xenguest.h missing: install libxen-dev")
    out = tmp_path_factory.mktemp("standin")
    r = subprocess.run(
        ["bash", str(HERE / "build_standin.sh"), str(out)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.fail(f"building the libxc stand-in failed:\n{r.stdout}{r.stderr}")
    return out / "xc_standin.so"


@dataclass
class Kit:
    """One helper and the host it runs against."""

    kind: str
    helper: str
    host: Path
    env: dict[str, str] = field(default_factory=dict)
    domains: dict[int, SimDomain] = field(default_factory=dict)

    def domain(self, domid: int, pages: int = 4, dtype: str = "hvm") -> SimDomain:
        """A domain to save (running) or a restore target (paused, empty)."""
        dom = SimDomain.create(self.host, domid, f"dom{domid}", pages, dtype)
        for pfn in range(pages):
            dom.memory[pfn * 4096 : pfn * 4096 + 8] = pfn.to_bytes(8, "little")
        self.domains[domid] = dom
        if self.kind == "real":
            self.env["XC_STANDIN_DOMTYPE"] = dtype
            self.env["XC_STANDIN_PAGES"] = str(pages)
        return dom

    def running(self, domid: int) -> None:
        self.domains[domid].write_state(DomainState(RunState.RUNNING))

    def mark_suspended(self, domid: int) -> None:
        """What the toolstack's suspend does before it answers the callback."""
        self.domains[domid].write_state(DomainState(RunState.SHUTDOWN, ShutdownReason.SUSPEND))

    def dirty(self, domid: int, pfns: list[int]) -> None:
        for p in pfns:
            self.domains[domid].dirty[p] = 1


@pytest.fixture(params=["sim", "real"])
def kit(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Kit]:
    host = tmp_path / "host"
    (host / "domains").mkdir(parents=True)
    if request.param == "real":
        so = request.getfixturevalue("standin")
        k = Kit("real", str(REAL_HELPER), host, {"LD_PRELOAD": str(so)})
    else:
        if not SIM_HELPER.exists():
            pytest.fail(f"{SIM_HELPER} missing: the package is not installed (./dev setup)")
        k = Kit("sim", str(SIM_HELPER), host, {"REMUS_SIM_HOST": str(host)})
    yield k
    for d in k.domains.values():
        d.close()
