"""Flat memory: the protecting process's RSS over many checkpoints at -i 0.

A protection runs for months at 5-40 checkpoints a second, so nothing in
the primary may grow per checkpoint. This runs the real CLI processes, as
tests/protection/test_cli_remus.py does: a simulated host A with a small
idle domain, `remusctl receive` on host B (127.0.0.1), and `remusctl
protect NAME --to ... -i 0 --foreground` on A, a checkpoint as fast as
they go. The checkpoint count comes from the primary's status document (the
one `remusctl status --local --json` reads); RSS is VmRSS from
/proc/PID/status of the protect process (and, for reference, of its save
helper and of the receiver).

Figures: RSS right after the first checkpoint (the baseline), after 1,000
checkpoints (the protection has settled: every pool, cache and bounded
record has filled), and at the end; growth is end minus the 1,000 figure,
against the goal of < 1 MB.

    .venv/bin/python benchmarks/rss_checkpoints.py [--checkpoints 10000] [--memory 8] \\
        [--timeout 900] [--root DIR]

``--root`` runs another checkout's code (e.g. a `git worktree` of HEAD, for a
"before" figure): its tree goes first on the processes' PYTHONPATH.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NAME = "rss"
SETTLED = 1000  # checkpoints after which nothing should grow any more
POLL = 0.02  # s; the status document itself is rewritten every 0.2 s


@dataclass
class Sample:
    checkpoints: int
    rss_kib: int
    at: float


def vm_rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None  # a zombie has no VmRSS line


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(c) for c in text.split()]


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return ""


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def save_helper_of(pid: int) -> int | None:
    """The protect process's save helper (its child running the helper program)."""
    for c in children(pid):
        if "save-helper" in cmdline(c) or "save-helper" in comm(c):
            return c
    return None


class Run:
    def __init__(self, base: Path, root: Path, memory: int, log: Path) -> None:
        self.a, self.b = base / "hostA", base / "hostB"
        self.root = root
        self.memory = memory
        self.log = log
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
        self.env = env
        self.procs: list[subprocess.Popen[bytes]] = []

    def remusctl(self, host: Path, *args: str) -> list[str]:
        return [sys.executable, "-m", "orchestrator.cli", "--host", str(host), *args]

    def run(self, host: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.remusctl(host, *args),
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.root,
            timeout=timeout,
        )

    def start(self, host: Path, *args: str, name: str) -> subprocess.Popen[bytes]:
        with open(self.log / f"{name}.out", "wb") as out:  # the child keeps its own copy
            proc = subprocess.Popen(
                self.remusctl(host, *args),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.root,
            )
        self.procs.append(proc)
        return proc

    def status(self) -> dict[str, Any] | None:
        """The primary's status document (what `remusctl status --local` lists)."""
        path = self.a / "remus" / f"{NAME}.json"
        try:
            doc: dict[str, Any] = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None  # not written yet, or caught between write and rename
        return doc

    def stop(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.run(self.a, "unprotect", "--local", NAME, timeout=20)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        for host in (self.a, self.b):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.run(host, "domain", "destroy", NAME, timeout=20)


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return ""


def measure(args: argparse.Namespace, base: Path) -> int:
    log = base / "logs"
    log.mkdir()
    run = Run(base, Path(args.root).resolve(), args.memory, log)
    r = run.run(run.a, "domain", "create", NAME, "--memory", str(args.memory))
    if r.returncode != 0:
        print(f"domain create failed: {r.stderr.strip()}", file=sys.stderr)
        return 1
    try:
        port = 30000 + random.randrange(10000)
        recv = run.start(run.b, "receive", "--listen", f"127.0.0.1:{port}", name="receive")
        until = time.monotonic() + 30
        while "receiving on" not in tail(log / "receive.out"):
            if recv.poll() is not None or time.monotonic() > until:
                print(f"remusctl receive did not start:\n{tail(log / 'receive.out')}")
                return 1
            time.sleep(POLL)
        prot = run.start(
            run.a,
            "protect",
            "--foreground",
            NAME,
            "--to",
            f"127.0.0.1:{port}",
            "-i",
            "0",
            name="protect",
        )
        deadline = time.monotonic() + args.timeout
        baseline = settled = last = None
        # a few points on the way, to tell a bound filling up from a steady leak
        marks = [SETTLED + (args.checkpoints - SETTLED) * q // 4 for q in (1, 2, 3)]
        on_the_way: list[Sample] = []
        helper = None
        t_first = 0.0
        while time.monotonic() < deadline:
            if prot.poll() is not None:
                print(f"protect exited {prot.returncode} early:\n{tail(log / 'protect.out')}")
                return 1
            st = run.status()
            n = int(st.get("checkpoints") or 0) if st else 0
            rss = vm_rss_kib(prot.pid)
            if n >= 1 and rss is not None:
                now = time.monotonic()
                last = Sample(n, rss, now)
                if baseline is None:
                    baseline, t_first = last, now
                    helper = save_helper_of(prot.pid)
                if settled is None and n >= SETTLED:
                    settled = last
                if marks and n >= marks[0]:
                    marks.pop(0)
                    on_the_way.append(last)
                if n >= args.checkpoints:
                    break
            time.sleep(POLL)
        helper_rss = vm_rss_kib(helper) if helper is not None else None
        recv_rss = vm_rss_kib(recv.pid)
        if baseline is None or last is None:
            print(f"no checkpoint within {args.timeout:g} s:\n{tail(log / 'protect.out')}")
            return 1
        rate = (last.checkpoints - baseline.checkpoints) / max(last.at - t_first, 1e-9)
        print(
            f"protect process (pid {prot.pid}), {args.memory} MiB idle domain, -i 0, "
            f"{last.checkpoints:,} checkpoints at {rate:,.0f}/s:"
        )
        print(
            f"  baseline RSS after the first checkpoint (#{baseline.checkpoints}): "
            f"{baseline.rss_kib / 1024:.2f} MiB"
        )
        if settled is None:
            print(f"  did not reach {SETTLED:,} checkpoints within {args.timeout:g} s")
            return 1
        print(
            f"  RSS after {SETTLED:,} checkpoints (#{settled.checkpoints}): "
            f"{settled.rss_kib / 1024:.2f} MiB"
        )
        for mid in on_the_way:
            print(f"  RSS at #{mid.checkpoints}: {mid.rss_kib / 1024:.2f} MiB")
        print(f"  RSS at the end (#{last.checkpoints}): {last.rss_kib / 1024:.2f} MiB")
        growth = last.rss_kib - settled.rss_kib
        span = last.checkpoints - settled.checkpoints
        per_1k = growth / span * 1000 if span else 0.0
        verdict = "met" if growth < 1024 else "NOT met"
        print(
            f"  growth from #{settled.checkpoints} to #{last.checkpoints}: "
            f"{growth / 1024:+.2f} MiB ({growth:+,} KiB, {per_1k:+.1f} KiB per 1,000 "
            f"checkpoints)  (goal < 1 MB: {verdict})"
        )
        if on_the_way:
            q = on_the_way[-1]
            print(
                f"  growth over the last quarter, #{q.checkpoints} to #{last.checkpoints}: "
                f"{last.rss_kib - q.rss_kib:+,} KiB"
            )
        print(
            f"  ratio end/baseline {last.rss_kib / baseline.rss_kib:.3f}, "
            f"end/after-{SETTLED:,} {last.rss_kib / settled.rss_kib:.3f}"
        )
        if helper_rss is not None:
            print(f"  (its save helper, pid {helper}, at the end: {helper_rss / 1024:.2f} MiB)")
        if recv_rss is not None:
            print(f"  (remusctl receive, pid {recv.pid}, at the end: {recv_rss / 1024:.2f} MiB)")
        if last.checkpoints < args.checkpoints:
            print(f"  stopped at the {args.timeout:g} s bound before {args.checkpoints:,}")
            return 1
        return 0 if growth < 1024 else 2
    finally:
        run.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoints", type=int, default=10_000)
    ap.add_argument("--memory", type=int, default=8, help="guest MiB (default 8)")
    ap.add_argument("--timeout", type=float, default=900.0, help="give up after S seconds")
    ap.add_argument("--root", default=str(ROOT), help="the checkout whose code runs")
    args = ap.parse_args()
    if args.checkpoints <= SETTLED:
        ap.error(f"--checkpoints must be more than {SETTLED}")
    with tempfile.TemporaryDirectory(prefix="rss-checkpoints-") as tmp:
        sys.exit(measure(args, Path(tmp)))


if __name__ == "__main__":
    main()
