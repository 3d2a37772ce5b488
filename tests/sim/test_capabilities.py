"""Backends say what they can do; imports between the layers run downward."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest

from orchestrator.hypervisors import base
from orchestrator.hypervisors.base import BlockDevice, Capability, HypervisorError
from orchestrator.hypervisors.sim import SimHypervisor
from orchestrator.hypervisors.simdomain import BLOCK_SIZE as SIM_BLOCK_SIZE
from orchestrator.hypervisors.xen import XenHypervisor

PACKAGE = Path(__file__).resolve().parents[2] / "orchestrator"


def test_capability_members() -> None:
    assert {c.name for c in Capability} == {
        "FENCE",
        "DISK_REPLICATION",
        "MEMORY_ACCESS",
        "TOOLSTACK_RESTORE",
        "COLO",
        "GUEST_NETWORK",
    }


def test_the_simulation_declares_its_capabilities(tmp_path: Path) -> None:
    hv = SimHypervisor(tmp_path / "lo", use_netns=False)
    assert hv.capabilities == {
        Capability.DISK_REPLICATION,
        Capability.MEMORY_ACCESS,
        Capability.COLO,
    }
    assert hv.can(Capability.DISK_REPLICATION) and hv.supports_disk_replication
    assert not hv.can(Capability.FENCE) and not hv.can(Capability.TOOLSTACK_RESTORE)
    # the guest's link exists only with network namespaces (as root)
    with_ns = SimHypervisor(tmp_path / "ns", use_netns=True)
    assert with_ns.can(Capability.GUEST_NETWORK)


def test_xen_declares_its_capabilities_without_a_dom0() -> None:
    # a class attribute: readable without opening the backend (this is no dom0)
    assert XenHypervisor.capabilities == {Capability.FENCE, Capability.TOOLSTACK_RESTORE}


def test_memory_digest(tmp_path: Path) -> None:
    hv = SimHypervisor(tmp_path / "h", use_netns=False)
    info = hv.create_domain("m", memory_mib=8, disk_mib=0)
    try:
        hv.pause(info.domid)  # the guest writes no page while we read them
        digest = hv.memory_digest(info.domid)
        expect = hashlib.sha256(hv.memory_path(info.domid).read_bytes()).digest()
        assert digest == expect
    finally:
        hv.destroy(info.domid)


def test_a_backend_without_memory_access_says_which_it_is() -> None:
    xen = object.__new__(XenHypervisor)  # no dom0 here: the interface's defaults only
    assert not xen.can(Capability.MEMORY_ACCESS) and not xen.supports_disk_replication
    with pytest.raises(HypervisorError, match="the xen backend cannot read a domain's memory"):
        xen.memory_digest(1)
    with pytest.raises(HypervisorError, match="the xen backend cannot replicate disks"):
        xen.disk_of(1)


def test_the_disk_is_a_block_device(tmp_path: Path) -> None:
    hv = SimHypervisor(tmp_path / "d", use_netns=False)
    info = hv.create_domain("d", memory_mib=8, disk_mib=1)
    try:
        disk: BlockDevice = hv.disk_of(info.domid)
        assert disk.name == "d" and disk.disk_blocks == (1 << 20) // base.BLOCK_SIZE
        assert len(disk.disk_dirty()) == disk.disk_blocks
    finally:
        hv.destroy(info.domid)
    assert SIM_BLOCK_SIZE == base.BLOCK_SIZE


def _imports(path: Path) -> set[str]:
    """Absolute names of the orchestrator modules a file imports."""
    pkg = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parent = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                out.add(f"{parent}.{node.module}" if node.module else parent)
            elif node.module:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("orchestrator")}


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("guest", ("hypervisors", "devices", "transport", "protection", "service")),
        ("hypervisors", ("devices", "transport", "protection", "service")),
    ],
)
def test_imports_run_downward(package: str, forbidden: tuple[str, ...]) -> None:
    for path in sorted((PACKAGE / package).glob("*.py")):
        for name in _imports(path):
            layer = name.split(".")[1] if "." in name else ""
            assert layer not in forbidden, f"{path.name} imports {name}"


def test_devices_know_no_simulated_backend() -> None:
    for path in sorted((PACKAGE / "devices").glob("*.py")):
        for name in _imports(path):
            assert not name.startswith(("orchestrator.hypervisors.sim", "orchestrator.guest")), (
                f"{path.name} imports {name}"
            )
