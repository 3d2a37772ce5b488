"""One protection in its own process: what `remusd` starts for each protection.

remusd keeps each protection's helper, channels and devices in a worker
process of its own, started in a new session, rather than in its own event
loop. A crash, restart or upgrade of remusd then interrupts no checkpoint:
the worker carries on, publishes its status file as before, and the new
remusd re-attaches to it (see ``orchestrator/service/supervisor.py``). A
suspended guest is only ever the worker's to resume, and the worker resumes
it on every way out (``session.Primary.run``'s ``finally``).

    python -m orchestrator.protection.worker --status-dir D [--host H] [--backend B] \\
        primary --spec JSON
    python -m orchestrator.protection.worker --status-dir D [--host H] [--backend B] \\
        secondary --stream-fd N --control-fd M --spec JSON

JSON is a :class:`~.spec.ProtectionSpec` document (``to_json()``): the
worker's settings come as one document, never as flags rebuilt from it. The
secondary's spec carries its timeouts; the mode comes from the primary's
HELLO. SIGTERM on a primary ends replication cleanly (unprotect); SIGUSR1 on
a secondary fails over now.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from pathlib import Path

from ..hypervisors.base import Hypervisor
from ..hypervisors.select import open_hypervisor
from ..transport.controlio import Control
from .runner import run_primary, run_secondary_on
from .session import Unprotected
from .spec import ProtectionSpec


async def _secondary(hv: Hypervisor, spec: ProtectionSpec, args: argparse.Namespace) -> int:
    stream = socket.socket(fileno=args.stream_fd)
    stream.setblocking(True)
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=args.control_fd))
    try:
        info = await run_secondary_on(hv, stream, Control(reader, writer), spec, args.status_dir)
    except Unprotected as exc:
        print(f"replication ended by the primary ({exc}); the copy was dropped", flush=True)
        return 0
    print(f"FAILOVER: {info.name} (domid {info.domid}) runs here; {info.address}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="remus-worker", description=__doc__)
    ap.add_argument("--host", type=Path, help="simulated host directory")
    ap.add_argument("--backend", default=None, help="xen, sim or auto (remusd's own)")
    ap.add_argument("--status-dir", type=Path, required=True)
    sub = ap.add_subparsers(dest="role", required=True)
    p = sub.add_parser("primary")
    p.add_argument("--spec", required=True, help="the ProtectionSpec as JSON")
    s = sub.add_parser("secondary")
    s.add_argument("--stream-fd", type=int, required=True)
    s.add_argument("--control-fd", type=int, required=True)
    s.add_argument("--spec", required=True, help="the ProtectionSpec as JSON")
    args = ap.parse_args(argv)
    spec = ProtectionSpec.from_json(args.spec)
    hv = open_hypervisor(args.backend, args.host)
    if args.role == "secondary":
        return asyncio.run(_secondary(hv, spec, args))
    status = asyncio.run(run_primary(hv, spec, args.status_dir))
    print(f"replication ended after {status.checkpoints} checkpoints: {status.reason}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
