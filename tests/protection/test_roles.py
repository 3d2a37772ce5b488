"""What a switchover asks of a protection (``protection/roles.py``), as a table."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from orchestrator.protection.roles import protect_back_spec, switchover_refusal
from orchestrator.protection.spec import Mode, ProtectionSpec
from orchestrator.protection.status import ProtectionStatus, Role, State

REMUS = ProtectionSpec(name="vm1", peer="127.0.0.1:8002", interval_ms=50)
COLO = ProtectionSpec(name="vm1", peer="127.0.0.1:8002", mode=Mode.COLO, no_disk=True,
                      checkpoint_max_interval_ms=1000)  # fmt: skip


def status(
    age: float | None = 0.01, state: State = State.REPLICATING, **kw: object
) -> Callable[[], ProtectionStatus]:
    """A primary's status, made when the test runs (its checkpoint's age from then)."""

    def make() -> ProtectionStatus:
        at = None if age is None else time.time() - age
        return ProtectionStatus("vm1", Role.PRIMARY, state=state, last_checkpoint_at=at, **kw)  # type: ignore[arg-type]

    return make


@pytest.mark.parametrize(
    ("spec", "st", "code", "says"),
    [
        (REMUS, status(), None, ""),
        (REMUS, status(witness="file:///w", lease="held"), None, ""),
        (REMUS, status(witness="etcd3+http://h:1", lease="held", lease_valid_for_s=2.5), None, ""),
        # the lease: not held, held but a renewal failed, or about to run out
        (REMUS, status(witness="file:///w", lease="lost"), "WITNESS_UNHEALTHY", "is lost"),
        (
            REMUS,
            status(witness="etcd3+http://h:1", lease="uncertain", lease_valid_for_s=1.0),
            "WITNESS_UNHEALTHY",
            "is uncertain, valid for 1 s",
        ),
        (
            REMUS,
            status(witness="etcd3+http://h:1", lease="held", lease_valid_for_s=0.01),
            "WITNESS_UNHEALTHY",
            "cannot be handed over",
        ),
        # the witness is the cause when both are wrong (a fencing primary)
        (
            REMUS,
            status(state=State.FENCED, witness="file:///w", lease="expired"),
            "WITNESS_UNHEALTHY",
            "is expired",
        ),
        (REMUS, status(state=State.STARTING), "LINK_UNHEALTHY", "is starting, not replicating"),
        (REMUS, status(age=None), "LINK_UNHEALTHY", "ACKed never"),
        # Remus: two intervals and a second
        (REMUS, status(age=1.0), None, ""),
        (REMUS, status(age=1.2), "LINK_UNHEALTHY", "bound 1.1 s"),
        # COLO checkpoints when the copies diverge, and at least every max interval
        (COLO, status(age=2.5), None, ""),
        (COLO, status(age=3.5), "LINK_UNHEALTHY", "bound 3 s"),
    ],
)
def test_switchover_refusals(
    spec: ProtectionSpec, st: Callable[[], ProtectionStatus], code: str | None, says: str
) -> None:
    got = switchover_refusal(spec, st())  # made now: its checkpoint's age counts from now
    if code is None:
        assert got is None
    else:
        assert got is not None and got[0] == code and says in got[1], got


def test_the_peer_protects_back_to_our_endpoint_with_our_settings() -> None:
    back = protect_back_spec(REMUS, "0.0.0.0", 8123, insecure=False)
    # a wildcard listen address: the one our packets to the peer leave from
    assert back.peer == "127.0.0.1:8123"
    assert (back.name, back.interval_ms, back.mode) == ("vm1", 50, Mode.REMUS)
    named = protect_back_spec(REMUS, "xen-a.example", 8002, insecure=True)
    assert named.peer == "xen-a.example:8002" and named.insecure_link
    over_ssh = ProtectionSpec(name="vm1", ssh="root@127.0.0.1:22")
    back = protect_back_spec(over_ssh, "", 8002, insecure=False)
    assert (back.peer, back.ssh) == ("127.0.0.1:8002", "")  # the link, not SSH, back
