"""The protection's lease: who may run the guest and release its output (issue 22).

One lease per protection, named after the domain's UUID (both sides know it:
it is the primary's HELLO), on the witness the spec names. The rules, as the
drivers apply them:

* the primary takes the lease before its HELLO and refuses to protect when
  somebody else holds it;
* it releases an epoch's output only when it has the ACK *and* the lease
  stays valid past the release by ``spec.lease_release_margin_s``;
* when it cannot be sure to hold the lease past ``spec.lease_fence_margin_s`` it
  fences itself: the guest is paused, held output is dropped, replication
  ends; once another holder is seen its copy is destroyed;
* the secondary takes over only once it holds the lease, within
  ``spec.takeover_window_s`` of losing the primary; if it cannot, the primary
  runs on and the secondary's copy is dropped;
* a primary whose replication ended while it holds the lease keeps holding
  it for that window before letting go, so that a secondary which lost it
  only now cannot take over behind a guest that runs on here.

Margins are fractions of the TTL (renewals go every TTL/3, so the remaining
validity of a healthy lease never falls much under 2/3 of it).
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from typing import Final

from ..coordination import LeaseKeeper, WitnessError, open_witness
from ..hypervisors.base import Hypervisor
from ..transport.control import Hello
from .session import ReplicationError
from .spec import NO_WITNESS, ProtectionSpec

LEASE_CAPABILITY: Final = "lease"  # in the primary's HELLO: the secondary needs a witness


def primary_witness(spec: ProtectionSpec, hv: Hypervisor) -> ProtectionSpec:
    """The spec with the witness a primary protects under ("" for none).

    A witness is the default: the one named, else the backend's own (the
    simulated hosts of one machine share a directory). Without one, a
    partition can leave two copies running, so none is an unsafe mode: `-F`
    with `--witness none`, or `-F` on a backend with no witness of its own
    (Xen: a file witness would be one host's). `-b` has no secondary to take
    over, so it needs none.
    """
    if spec.blackhole:
        return spec.with_(witness="")
    if spec.witness == NO_WITNESS:
        if not spec.unsafe:
            raise ReplicationError(
                "--witness none requires -F: without a witness a partition can leave two "
                "copies running"
            )
        return spec.with_(witness="")
    if spec.witness:
        return spec
    default = hv.default_witness()
    if default is not None:
        return spec.with_(witness=default)
    if spec.unsafe:
        return spec
    raise ReplicationError(
        f"the {hv.name} backend has no witness of its own: name one that both hosts reach "
        "(--witness etcd3+http://HOST:2379, remusd's [witness] url), or run without one "
        "(-F: a partition can then leave two copies running)"
    )


def secondary_witness(spec: ProtectionSpec, hv: Hypervisor, peer: Hello) -> ProtectionSpec:
    """The spec with the witness this receiver takes over under ("" for none), from
    its own settings and the primary's HELLO; ReplicationError when the two sides
    would not take over by the same rule (one of them on heartbeats alone)."""
    under = LEASE_CAPABILITY in peer.capabilities
    if spec.witness == NO_WITNESS:
        if not spec.unsafe:
            raise ReplicationError("--witness none requires -F")
        if under:
            raise ReplicationError(
                f"the primary protects under a lease ({peer.witness or 'its witness'}), and "
                "this receiver was told --witness none"
            )
        return spec.with_(witness="")
    if spec.witness:
        if not under:
            raise ReplicationError(
                f"this receiver takes over only under a lease ({spec.witness}), and the "
                "primary has no witness"
            )
        return spec
    if not under:
        # the primary chose to run without a witness (its -F): we follow it, as
        # xl's secondary follows `xl remus`
        return spec
    announced = peer.witness
    if not announced:
        raise ReplicationError(
            "the primary protects under a lease and did not say on which witness: "
            "give this receiver --witness URL"
        )
    if urllib.parse.urlsplit(announced).scheme == "file" and announced != hv.default_witness():
        # a file witness is a directory on the primary's machine: the same URL here
        # would be another lock, and both sides would hold "the" lease
        raise ReplicationError(
            f"the primary's witness is {announced}, a directory on its machine: give this "
            "receiver --witness with the URL of the witness it shares with the primary"
        )
    return spec.with_(witness=announced)


def lease_name(domain_uuid: str) -> str:
    return f"protection-{domain_uuid}"


async def open_lease(spec: ProtectionSpec, domain_uuid: str, role: str) -> LeaseKeeper:
    """A started keeper (not yet holding) on the spec's witness."""
    member = f"{socket.gethostname()}-{role}-{os.getpid()}"
    try:
        witness = await open_witness(spec.witness, member, spec.lease_ttl_s)
    except WitnessError as exc:
        raise ReplicationError(f"witness {spec.witness}: {exc}") from None
    # a secondary watches the primary's renewals from the start: its takeover
    # then counts the primary's TTL from the last one (coordination.witness)
    keeper = LeaseKeeper(
        witness, lease_name(domain_uuid), spec.lease_ttl_s, observe=role == "secondary"
    )
    keeper.start()
    return keeper


async def close_lease(keeper: LeaseKeeper, release: bool) -> None:
    await keeper.stop(release=release)
    await keeper.witness.stop()
