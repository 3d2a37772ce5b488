"""Which witness a protection runs under: the rules of `protection/lease.py`.

A witness is the default; running without one is an unsafe mode that needs
-F; a receiver follows the primary's HELLO unless told otherwise, and never
takes a file witness of another machine for its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.hypervisors.sim import SimHypervisor, default_witness_dir
from orchestrator.protection.lease import LEASE_CAPABILITY, primary_witness, secondary_witness
from orchestrator.protection.session import ReplicationError
from orchestrator.protection.spec import ProtectionSpec, SpecError
from orchestrator.transport.control import ControlConnection, Hello, Role, encode_event

ETCD = "etcd3+http://witness.test:2379"


class WitnesslessHost(SimHypervisor):
    """A backend with no witness of its own, as Xen (a file witness would be one host's)."""

    def default_witness(self) -> str | None:
        return None


def _spec(**kw: object) -> ProtectionSpec:
    return ProtectionSpec(name="vm", peer="127.0.0.1:8002", **kw)  # type: ignore[arg-type]


def test_the_primary_runs_under_a_witness_unless_told_otherwise_with_f(tmp_path: Path) -> None:
    sim = SimHypervisor(tmp_path / "a")
    assert primary_witness(_spec(), sim).witness == f"file://{default_witness_dir()}"
    assert primary_witness(_spec(witness=ETCD), sim).witness == ETCD
    with pytest.raises(ReplicationError, match="requires -F"):
        primary_witness(_spec(witness="none"), sim)
    assert primary_witness(_spec(witness="none", unsafe=True), sim).witness == ""
    # -b has no secondary to take over: no lease to hold
    assert primary_witness(_spec(blackhole=True, unsafe=True), sim).witness == ""

    xen_like = WitnesslessHost(tmp_path / "b")
    with pytest.raises(ReplicationError, match="no witness of its own"):
        primary_witness(_spec(), xen_like)
    assert primary_witness(_spec(unsafe=True), xen_like).witness == ""
    assert primary_witness(_spec(witness=ETCD), xen_like).witness == ETCD


def test_the_receiver_follows_the_primary_by_the_same_rule(tmp_path: Path) -> None:
    sim, xen_like = SimHypervisor(tmp_path / "a"), WitnesslessHost(tmp_path / "b")
    leased = Hello("uuid", {}, ("ack", LEASE_CAPABILITY), witness=ETCD)
    bare = Hello("uuid", {}, ("ack",))
    # no witness of its own: the primary's, which the HELLO carries across the wire
    conn = ControlConnection(Role.SECONDARY)
    conn.receive_data(encode_event(leased))
    wire = conn.next_event()
    assert isinstance(wire, Hello) and wire == leased
    assert secondary_witness(_spec(), xen_like, wire).witness == ETCD
    # the primary runs without one (its -F): so does its secondary
    assert secondary_witness(_spec(), sim, bare).witness == ""
    # one side on the lease, the other on heartbeats alone: refused
    with pytest.raises(ReplicationError, match="primary has no witness"):
        secondary_witness(_spec(witness=ETCD), sim, bare)
    with pytest.raises(ReplicationError, match="--witness none"):
        secondary_witness(_spec(witness="none", unsafe=True), sim, leased)
    # a file witness is a directory on the primary's machine: here only if it is ours
    mine = Hello("uuid", {}, (LEASE_CAPABILITY,), witness=f"file://{default_witness_dir()}")
    assert secondary_witness(_spec(), sim, mine).witness == mine.witness
    theirs = Hello("uuid", {}, (LEASE_CAPABILITY,), witness="file:///elsewhere/witness")
    with pytest.raises(ReplicationError, match="a directory on its machine"):
        secondary_witness(_spec(), sim, theirs)
    with pytest.raises(ReplicationError, match="a directory on its machine"):
        secondary_witness(_spec(), xen_like, mine)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("bogus://x", "unknown scheme"),
        ("file://relative/dir", "file:///ABSOLUTE/DIR"),
        ("etcd3+http://host", "HOST:PORT"),
        ("etcd3+http://host:notaport", "HOST:PORT"),
        ("http://host:2379", "unknown scheme"),
    ],
)
def test_a_malformed_witness_url_is_refused_before_anything_connects(url: str, why: str) -> None:
    with pytest.raises(SpecError, match=why):
        _spec(witness=url)
