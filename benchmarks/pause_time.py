"""Guest pause per Remus checkpoint on the simulated hypervisor, against a plain copy.

A simulated domain (a real guest process) is checkpointed through the real
helper boundary (remus-sim-save-helper, stream type REMUS, to /dev/null).
Between checkpoints exactly N scattered pages are dirtied; the pause is
measured from the suspend request to the end of the resume, as the guest
sees it. The baseline is a plain copy of the same N pages out of the same
memory map into a buffer, in the same run.

    .venv/bin/python benchmarks/pause_time.py [--checkpoints 20]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from orchestrator.hypervisors.sim import SimHypervisor
from orchestrator.hypervisors.simdomain import PAGE_SIZE, SimDomain, domain_path
from orchestrator.savehelper import Callbacks, HelperSession, Mode, SaveArgs, StreamType


def plain_copy(mem: memoryview, pages: list[int]) -> float:
    buf = bytearray(len(pages) * PAGE_SIZE)
    t0 = time.perf_counter()
    for i, p in enumerate(pages):
        buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = mem[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]
    return time.perf_counter() - t0


async def measure(hv: SimHypervisor, domid: int, n: int, checkpoints: int) -> tuple[float, float]:
    dom = SimDomain(domain_path(hv.host, domid))
    mem = memoryview(dom.memory)
    rng = random.Random(n)
    scratch = range(dom.pages // 2, dom.pages)  # leave the store's pages alone
    pauses: list[float] = []
    copies: list[float] = []
    t_suspend = 0.0
    count = 0
    current: list[int] = []

    async def suspend() -> int:
        nonlocal t_suspend
        t_suspend = time.perf_counter()
        await hv.suspend(domid)
        return 1

    async def postcopy() -> int:
        await hv.resume(domid)
        pauses.append(time.perf_counter() - t_suspend)
        return 1

    def dirty() -> None:
        current[:] = sorted(rng.sample(scratch, n))
        for p in current:
            mem[p * PAGE_SIZE] = (mem[p * PAGE_SIZE] + 1) & 0xFF
            dom.dirty[p] = 1

    def checkpoint() -> int:
        nonlocal count
        count += 1
        if count > checkpoints:
            return 0
        copies.append(plain_copy(mem, current) if current else 0.0)
        dirty()
        return 1

    session = HelperSession(
        Mode.SAVE, Callbacks(suspend=suspend, postcopy=postcopy, checkpoint=checkpoint)
    )
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        await session.run(
            fd, -1, SaveArgs(domid, session.cbflags, StreamType.REMUS, 1), extra_env=hv.helper_env()
        )
    finally:
        os.close(fd)
        mem.release()
        dom.close()
    # the first pause is the first (full) checkpoint; later ones carry exactly n pages
    return statistics.median(pauses[1:]), statistics.median(copies[1:])


NS = (100, 1000, 10000)


def main() -> None:
    # the run ends by answering 0 to a checkpoint, which the helper logs as an error
    logging.getLogger("orchestrator.savehelper").setLevel(logging.CRITICAL)
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoints", type=int, default=20)
    ap.add_argument("--memory", type=int, default=128, help="MiB")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hv = SimHypervisor(Path(tmp))
        info = hv.create_domain("bench", args.memory)
        try:
            print(
                f"{'dirty pages':>11} {'pause p50':>10} {'copy p50':>9} "
                f"{'pause/copy':>10} {'goal: <= 1.5*copy+0.5ms':>24}"
            )
            for n in NS:
                pause, copy = asyncio.run(measure(hv, info.domid, n, args.checkpoints))
                goal = 1.5 * copy + 0.0005
                verdict = "ok" if pause <= goal else "MISS"
                print(
                    f"{n:>11} {pause * 1e3:>8.2f}ms {copy * 1e3:>7.2f}ms "
                    f"{pause / copy:>10.2f} {goal * 1e3:>21.2f}ms {verdict}"
                )
        finally:
            hv.destroy(info.domid)


if __name__ == "__main__":
    main()
