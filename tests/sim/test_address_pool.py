"""Simulated guests' addresses never route off the machine.

Before the pool moved to 198.18.0.0/15, a destroyed guest's 10.x address
followed the default route out: `ip route get` went via the gateway and a
probe got an answer from something outside.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from orchestrator.hypervisors.sim import ADDRESS_POOL, LINKS_PER_HOST, SimHypervisor

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="guests get network namespaces and the pool its route only as root with iproute2",
)


def route_get(address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "route", "get", address], capture_output=True, text=True)


def test_every_link_is_inside_the_pool(tmp_path: Path) -> None:
    # pure arithmetic: no namespaces are made
    hosts = [SimHypervisor(tmp_path / f"h{i}", use_netns=False) for i in range(8)]
    links: set[str] = set()
    for hv in hosts:
        for domid in range(1, LINKS_PER_HOST + 1):
            _, _, host_ip, guest_ip = hv._netns(domid)
            net = ipaddress.IPv4Network(f"{host_ip}/30", strict=False)
            assert net.subnet_of(ADDRESS_POOL)
            assert ipaddress.IPv4Address(guest_ip) in net
            links.add(str(net))
    # one host's LINKS_PER_HOST consecutive domids never share a link
    assert len({hosts[0]._netns(d)[2] for d in range(1, LINKS_PER_HOST + 1)}) == LINKS_PER_HOST


@needs_root
def test_a_destroyed_guests_address_is_unreachable_not_routed_away(tmp_path: Path) -> None:
    hv = SimHypervisor(tmp_path / "pool")
    assert hv.use_netns
    shown = subprocess.run(
        ["ip", "route", "show", "exact", str(ADDRESS_POOL)], capture_output=True, text=True
    ).stdout
    assert shown.startswith("unreachable"), shown

    info = hv.create_domain("gone", memory_mib=8, disk_mib=0)
    try:
        address = info.address.rsplit(":", 1)[0]
        assert ipaddress.IPv4Address(address) in ADDRESS_POOL
        live = route_get(address)
        # the live guest's /30 is more specific than the pool's unreachable route
        assert live.returncode == 0 and f"dev {hv.vif_name(info.domid)}" in live.stdout
        assert " via " not in live.stdout
    finally:
        hv.destroy(info.domid)

    dead = route_get(address)
    assert " via " not in dead.stdout + dead.stderr, dead.stdout
    assert dead.returncode != 0 and "No route to host" in dead.stderr, (dead.stdout, dead.stderr)
    # and a client fails at once with "no route" (a route off the machine would time
    # out instead, or be answered by someone else)
    with pytest.raises(OSError) as exc, socket.socket() as s:
        s.settimeout(5)
        s.connect((address, int(info.address.rsplit(":", 1)[1])))
    assert exc.value.errno == errno.EHOSTUNREACH


@needs_root
def test_the_route_is_installed_idempotently(tmp_path: Path) -> None:
    SimHypervisor(tmp_path / "one")
    SimHypervisor(tmp_path / "two")
    shown = subprocess.run(
        ["ip", "route", "show", "exact", str(ADDRESS_POOL)], capture_output=True, text=True
    ).stdout.splitlines()
    assert [line.strip() for line in shown] == [f"unreachable {ADDRESS_POOL}"]


def test_a_guest_whose_link_is_taken_gets_the_next_free_one(tmp_path: Path) -> None:
    """Domids LINKS_PER_HOST apart would share a /30; the second takes the next free
    link instead (a second copy of a link would route one guest's traffic to the other)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    hv = SimHypervisor(tmp_path / "host")
    first = hv.create_domain("first", memory_mib=4)
    try:
        for i in range(LINKS_PER_HOST + 1):  # domids go up: one comes to first's slot
            d = hv.create_domain(f"g{i}", memory_mib=4)
            if d.domid % LINKS_PER_HOST == first.domid % LINKS_PER_HOST:
                break
            hv.destroy(d.domid)
        else:
            raise AssertionError("no domid came back to the first one's slot")
        addresses = {hv.lookup(first.domid).address, hv.lookup(d.domid).address}
        assert len(addresses) == 2  # each its own link
    finally:
        for d in hv.list_domains():
            hv.destroy(d.domid)
