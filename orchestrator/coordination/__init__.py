"""Coordination: one lease per protection on a witness (issue 22).

The bottom layer: it imports nothing from the rest of the orchestrator, so
protection drivers, the service and the CLI can all sit on top of it.

- `lease`: the sans-I/O rules of one lease as one holder sees it.
- `witness`: the witness interface and its tooz implementation
  (`file:///DIR`, `etcd3+http://HOST:PORT`).
- `keeper`: an asyncio task that acquires, renews and feeds a `Lease`.
"""

from orchestrator.coordination.keeper import LeaseKeeper
from orchestrator.coordination.lease import Lease, LeaseEvent, LeaseState
from orchestrator.coordination.witness import (
    Refresh,
    RefreshOutcome,
    ToozWitness,
    Witness,
    WitnessError,
    open_witness,
)

__all__ = [
    "Lease",
    "LeaseEvent",
    "LeaseKeeper",
    "LeaseState",
    "Refresh",
    "RefreshOutcome",
    "ToozWitness",
    "Witness",
    "WitnessError",
    "open_witness",
]
