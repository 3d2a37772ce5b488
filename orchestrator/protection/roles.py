"""Roles that change: what a planned switchover asks of a protection, and the settings
the peer protects the guest back with.

remusd (``service/supervisor.py``) does the asking and the signalling; the rules are
here, next to the status they read, so that the API, the CLI and a test apply the
same ones.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Final

from .host import return_address
from .rescue import redact_url
from .spec import Mode, ProtectionSpec
from .status import ProtectionStatus, State

HELD: Final = "held"  # the lease's state when it is held and its last renewal went through


def switchover_refusal(spec: ProtectionSpec, st: ProtectionStatus) -> tuple[str, str] | None:
    """Why ``spec``'s primary, as its status ``st`` shows it, may not switch over now:
    (error code, message), or None. A switchover hands the guest to a secondary in
    step with it, under a lease that can be handed over.

    The witness first: a primary that loses its lease goes on to fence itself, and
    that is the cause. An uncertain lease (a renewal failed) is valid still, but the
    secondary would not get it from a witness that does not answer us."""
    valid = st.lease_valid_for_s
    if st.witness and (
        st.lease != HELD or (valid is not None and valid < spec.lease_release_margin_s)
    ):
        return (
            "WITNESS_UNHEALTHY",
            f"the lease on {redact_url(st.witness)} is {st.lease}"
            + (f", valid for {valid:g} s" if valid is not None else "")
            + ": it cannot be handed over",
        )
    if st.state is not State.REPLICATING:
        return "LINK_UNHEALTHY", f"{spec.name} is {st.state.value}, not replicating"
    # in step: ACKed checkpoints keep coming (COLO checkpoints when the copies diverge,
    # and at least every max interval). A stall of a second already means the last
    # epoch could keep the guest suspended for as long as an ACK may take
    age = st.last_checkpoint_age_s
    every = spec.checkpoint_max_interval_s if spec.mode is Mode.COLO else spec.interval_s
    bound = 2 * every + min(spec.ack_timeout_s, 1.0)
    if age is None or age > bound:
        when = "never" if age is None else f"{age:.3g} s ago"
        return (
            "LINK_UNHEALTHY",
            f"the last checkpoint of {spec.name} was ACKed {when} (bound {bound:g} s): "
            "the link is not healthy",
        )
    return None


def protect_back_spec(
    spec: ProtectionSpec, listen_host: str, port: int, insecure: bool
) -> ProtectionSpec:
    """The settings the peer protects the guest back to this host with: ours, to the
    replication endpoint here (``listen_host``, ``port``; our endpoint's link mode),
    over the link rather than SSH (this host's remusd receives it)."""
    return replace(
        spec,
        peer=return_address(listen_host, port, spec),
        ssh="",
        insecure_link=insecure,
    )
