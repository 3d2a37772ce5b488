"""Verify throughput on a large checkpointed stream, against plain readinto.

Generates a Remus stream (xl > libxl > libxc, HVM) with >= 512 MiB of page
data in PAGE_DATA batches of up to 1024 pfns and a few hundred checkpoints,
then times, alternately, `verify_file` and a bare `readinto` loop over the
same file (page cache warm for both). Prints medians and their ratio.

    .venv/bin/python benchmarks/stream_verify.py [--runs 5] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time

from orchestrator.streams.decoder import StreamType
from orchestrator.streams.fileio import verify_file
from orchestrator.streams.synth import SynthSpec, generate, write_all


def plain_readinto(path: str) -> int:
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    total = 0
    with io.FileIO(path, "rb") as f:
        while n := f.readinto(view):
            total += n
    return total


def timed(fn: object, path: str) -> float:
    t0 = time.perf_counter()
    fn(path)  # type: ignore[operator]
    return time.perf_counter() - t0


def verify(path: str) -> None:
    with io.FileIO(path, "rb") as f:
        summary = verify_file(f)
    assert summary.page_bytes >= 512 << 20, summary.page_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--first-pass-pages", type=int, default=16384)
    ap.add_argument("--checkpoints", type=int, default=200)
    ap.add_argument("--dirty-pages", type=int, default=640)
    args = ap.parse_args()

    spec = SynthSpec(
        pages=args.first_pass_pages,
        stream_type=StreamType.REMUS,
        checkpoints=args.checkpoints,
        dirty_pages=args.dirty_pages,
    )
    fd, path = tempfile.mkstemp(prefix="remus-bench-", suffix=".xl", dir=args.dir)
    try:
        with os.fdopen(fd, "wb") as f:
            size = write_all(f, generate(spec))
        with io.FileIO(path, "rb") as f:
            summary = verify_file(f)
        print(
            f"stream: {size / 1e6:.1f} MB, {summary.page_bytes / 2**20:.0f} MiB page data, "
            f"{summary.checkpoints} checkpoints, {sum(summary.records.values())} records"
        )
        plain_readinto(path)  # warm the page cache
        t_verify, t_read = [], []
        for _ in range(args.runs):
            t_read.append(timed(plain_readinto, path))
            t_verify.append(timed(verify, path))
        mv, mr = statistics.median(t_verify), statistics.median(t_read)
        print(f"readinto baseline: median {mr * 1e3:.1f} ms = {size / mr / 1e9:.2f} GB/s")
        print(f"stream verify:     median {mv * 1e3:.1f} ms = {size / mv / 1e9:.2f} GB/s")
        print(f"ratio verify/readinto throughput: {mr / mv:.2f}  (goal >= 0.5, >= 1 GB/s)")
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
