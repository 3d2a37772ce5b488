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
from typing import Final

from ..coordination import LeaseKeeper, WitnessError, open_witness
from .session import ReplicationError
from .spec import ProtectionSpec

LEASE_CAPABILITY: Final = "lease"  # in the primary's HELLO: the secondary needs a witness


def lease_name(domain_uuid: str) -> str:
    return f"protection-{domain_uuid}"


async def open_lease(spec: ProtectionSpec, domain_uuid: str, role: str) -> LeaseKeeper:
    """A started keeper (not yet holding) on the spec's witness."""
    member = f"{socket.gethostname()}-{role}-{os.getpid()}"
    try:
        witness = await open_witness(spec.witness, member, spec.lease_ttl_s)
    except WitnessError as exc:
        raise ReplicationError(f"witness {spec.witness}: {exc}") from None
    keeper = LeaseKeeper(witness, lease_name(domain_uuid), spec.lease_ttl_s)
    keeper.start()
    return keeper


async def close_lease(keeper: LeaseKeeper, release: bool) -> None:
    await keeper.stop(release=release)
    await keeper.witness.stop()
