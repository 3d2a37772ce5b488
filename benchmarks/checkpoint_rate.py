"""Remus checkpoint cycles per second for an idle domain at -i 0, and failover time.

Cycles: a domain on a simulated host replicated to a second one (real guest,
real save and restore helpers, socketpairs for the stream and control
channels), checkpoint interval 0, no load: each cycle is suspend, copy,
resume, send, CHECKPOINT_END, ACK. Baseline in the same run: bare
suspend+resume cycles of the same guest (the part no replication can avoid).

Failover: `remusctl demo` runs (separate processes, NFQUEUE buffering),
SIGKILL of the primary to every acknowledged key read back on the secondary;
the default heartbeat (50 ms, timeout 300 ms).

    .venv/bin/python benchmarks/checkpoint_rate.py [--seconds 5] [--failovers 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

from orchestrator.demo import run_demo
from orchestrator.hypervisors.sim import SimHypervisor
from orchestrator.protection.remus import Control, RemusPrimary, RemusSecondary, RemusSettings


async def cycles(seconds: float) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        a, b = SimHypervisor(Path(tmp) / "a"), SimHypervisor(Path(tmp) / "b")
        info = a.create_domain("idle", memory_mib=64)
        try:
            t0 = time.perf_counter()
            n = 0
            while time.perf_counter() - t0 < 1.0:
                await a.suspend(info.domid)
                await a.resume(info.domid)
                n += 1
            bare = n / (time.perf_counter() - t0)
            sp, ss = socket.socketpair()
            ca, cb = socket.socketpair()
            ra, wa = await asyncio.open_connection(sock=ca)
            rb, wb = await asyncio.open_connection(sock=cb)
            settings = RemusSettings(interval=0.0, heartbeat_interval=0.05)
            primary = RemusPrimary(a, info, sp, Control(ra, wa), settings)
            secondary = RemusSecondary(b, ss, Control(rb, wb), settings)
            pt = asyncio.create_task(primary.run())
            st = asyncio.create_task(secondary.run())
            while primary.status.checkpoints < 3:
                await asyncio.sleep(0.01)
            c0, t0 = primary.status.checkpoints, time.perf_counter()
            await asyncio.sleep(seconds)
            rate = (primary.status.checkpoints - c0) / (time.perf_counter() - t0)
            assert primary.session is not None and primary.session.helper is not None
            primary.session.helper.process.kill()
            for s in (sp, wa):
                s.close()
            await asyncio.gather(pt, return_exceptions=True)
            await asyncio.wait_for(st, 30)
            return rate, bare
        finally:
            for hv in (a, b):
                for d in hv.list_domains():
                    hv.destroy(d.domid)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--failovers", type=int, default=5)
    args = ap.parse_args()
    rate, bare = asyncio.run(cycles(args.seconds))
    print(f"idle checkpoint cycles at -i 0: {rate:,.0f}/s  (goal >= 1000/s)")
    print(f"bare suspend+resume cycles:     {bare:,.0f}/s  (ratio cycles/bare {rate / bare:.2f})")
    if os.geteuid() != 0:
        print("failover: skipped (needs root for network namespaces and NFQUEUE)")
        return
    times = [
        asyncio.run(run_demo(duration=1.0, interval_ms=50, clients=4, progress=False)).failover_s
        for _ in range(args.failovers)
    ]
    print(
        f"failover (SIGKILL -> all acked keys read on the secondary): median "
        f"{statistics.median(times) * 1e3:.0f} ms over {len(times)} runs, "
        f"max {max(times) * 1e3:.0f} ms  (goal <= 500 ms)"
    )


if __name__ == "__main__":
    main()
