"""One protection in its own process: what `remusd` starts for each protection.

remusd keeps each protection's helper, channels and devices in a worker
process of its own, started in a new session, rather than in its own event
loop. A crash, restart or upgrade of remusd then interrupts no checkpoint:
the worker carries on, publishes its status file as before, and the new
remusd re-attaches to it (see ``orchestrator/service/supervisor.py``). A
suspended guest is only ever the worker's to resume, and the worker resumes
it on every way out (``RemusPrimary.run``'s ``finally``).

    python -m orchestrator.protection.worker --status-dir D [--host H] \\
        primary NAME --to PEER [-i MS] [--netbuf MODE] [-n] [-d] [-b]
    python -m orchestrator.protection.worker --status-dir D [--host H] \\
        primary NAME --to PEER --colo [--checkpoint-max-interval S] \\
        [--compare-timeout MS] [-n]
    python -m orchestrator.protection.worker --status-dir D [--host H] \\
        secondary --stream-fd N --control-fd M

SIGTERM on a primary ends replication cleanly (unprotect); SIGUSR1 on a
secondary fails over now. A COLO primary (``--colo``; ``-n``: output is not
compared) needs no COLO flag on the other side: the secondary learns it from
the primary's HELLO.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import socket
import sys
from pathlib import Path

from ..hypervisors.base import Hypervisor
from ..hypervisors.select import open_hypervisor
from .colo import ColoSettings
from .remus import Control, RemusSettings, Unprotected
from .runner import NETBUF_MODES, run_primary, run_primary_colo, run_secondary_on


def _settings(args: argparse.Namespace) -> RemusSettings:
    return RemusSettings(
        interval=args.interval / 1000.0, heartbeat_timeout=args.heartbeat_timeout / 1000.0
    )


def _colo_settings(args: argparse.Namespace) -> ColoSettings:
    return ColoSettings(
        **dataclasses.asdict(_settings(args)),
        checkpoint_max_interval=args.checkpoint_max_interval,
        compare_timeout=args.compare_timeout / 1000.0,
        compare_output=not args.unchecked_output,
        # a digest of the whole memory on both sides at every checkpoint: for tests
        # and audits (`remusctl protect --foreground --verify-memory`), not a service
        verify_memory=False,
    )


async def _secondary(hv: Hypervisor, args: argparse.Namespace) -> int:
    stream = socket.socket(fileno=args.stream_fd)
    stream.setblocking(True)
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=args.control_fd))
    try:
        info = await run_secondary_on(
            hv, stream, Control(reader, writer), _settings(args), args.status_dir
        )
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
    ap.add_argument("-i", dest="interval", type=float, default=200.0)
    ap.add_argument("--heartbeat-timeout", type=float, default=300.0, help="ms")
    sub = ap.add_subparsers(dest="role", required=True)
    p = sub.add_parser("primary")
    p.add_argument("name")
    p.add_argument("--to", default="")
    p.add_argument("--netbuf", choices=[*NETBUF_MODES, "none"], default="auto")
    p.add_argument("-d", dest="no_disk", action="store_true")
    p.add_argument("-b", dest="blackhole", action="store_true")
    p.add_argument("--colo", action="store_true")
    p.add_argument("--checkpoint-max-interval", type=float, default=5.0, help="s (COLO)")
    p.add_argument("--compare-timeout", type=float, default=100.0, help="ms (COLO)")
    p.add_argument(
        "-n",
        dest="unchecked_output",
        action="store_true",
        help="output leaves at once: Remus buffers none (--netbuf none), COLO compares none",
    )
    s = sub.add_parser("secondary")
    s.add_argument("--stream-fd", type=int, required=True)
    s.add_argument("--control-fd", type=int, required=True)
    args = ap.parse_args(argv)
    hv = open_hypervisor(args.backend, args.host)
    if args.role == "secondary":
        return asyncio.run(_secondary(hv, args))
    if args.colo:
        colo = asyncio.run(
            run_primary_colo(hv, args.name, args.to, _colo_settings(args), args.status_dir)
        )
        print(
            f"COLO ended after {colo.checkpoints} checkpoints ({colo.by_divergence} on "
            f"divergence, {colo.by_held} for held output, {colo.by_timer} on the timer): "
            f"{colo.reason}",
            flush=True,
        )
        return 0
    status = asyncio.run(
        run_primary(
            hv,
            args.name,
            args.to,
            _settings(args),
            "none" if args.unchecked_output else args.netbuf,
            disk=not args.no_disk,
            blackhole=args.blackhole,
            status_dir=args.status_dir,
        )
    )
    print(f"replication ended after {status.checkpoints} checkpoints: {status.reason}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
