"""Callback round trips per second through the real helper pipe protocol.

The simulated helper, in its ping-pong mode, sends `checkpoint` frames back
to back and waits for each reply; our asyncio HelperSession answers. The
baseline is a bare Python pipe ping-pong between two processes with the
same frame sizes (4 bytes each way), measured in the same run.

    .venv/bin/python benchmarks/helper_roundtrip.py [--n 50000] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from orchestrator.savehelper import Callbacks, HelperSession, Mode, SaveArgs, StreamType

SIM = str(Path(sys.executable).parent / "remus-sim-save-helper")

BARE_CHILD = r"""
import os, sys
n = int(sys.argv[1])
frame = b"\x02\x00\x05\x00"
for _ in range(n):
    os.write(1, frame)
    got = b""
    while len(got) < 4:
        got += os.read(0, 4 - len(got))
"""


def bare(n: int) -> float:
    p = subprocess.Popen(
        [sys.executable, "-c", BARE_CHILD, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert p.stdin and p.stdout
    rfd, wfd = p.stdout.fileno(), p.stdin.fileno()
    reply = b"\x01\x00\x00\x00"
    t0 = time.perf_counter()
    for _ in range(n):
        got = b""
        while len(got) < 4:
            got += os.read(rfd, 4 - len(got))
        os.write(wfd, reply)
    dt = time.perf_counter() - t0
    p.wait()
    return n / dt


def session(n: int, host: str, sync: bool) -> float:
    async def acheckpoint() -> int:
        return 1

    def scheckpoint() -> int:
        return 1

    checkpoint = scheckpoint if sync else acheckpoint

    async def go() -> float:
        s = HelperSession(
            Mode.SAVE, Callbacks(suspend=checkpoint, postcopy=checkpoint, checkpoint=checkpoint)
        )
        fd = os.open(os.devnull, os.O_WRONLY)
        t0 = time.perf_counter()
        r = await s.run(
            fd,
            -1,
            SaveArgs(1, s.cbflags, StreamType.REMUS),
            helper=SIM,
            extra_env={"REMUS_SIM_HELPER_PINGPONG": str(n), "REMUS_SIM_HOST": host},
        )
        dt = time.perf_counter() - t0
        os.close(fd)
        assert r.counts["checkpoint"] == n  # the trace keeps only the recent ones
        return n / dt

    return asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as host:
        os.mkdir(os.path.join(host, "domains"))
        b, s, a = [], [], []
        for _ in range(args.runs):
            b.append(bare(args.n))
            s.append(session(args.n, host, sync=True))
            a.append(session(args.n, host, sync=False))
    mb, ms, ma = statistics.median(b), statistics.median(s), statistics.median(a)
    print(f"bare pipe ping-pong (sync, 2 processes): median {mb:,.0f} round trips/s")
    print(
        f"helper session, int callbacks:           median {ms:,.0f} round trips/s "
        f"= bare/{mb / ms:.2f}"
    )
    print(
        f"helper session, coroutine callbacks:     median {ma:,.0f} round trips/s "
        f"= bare/{mb / ma:.2f}"
    )
    print("(session figures include helper start-up; goal >= 20,000/s and within 3x of bare)")


if __name__ == "__main__":
    main()
