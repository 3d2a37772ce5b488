"""Request latency of the guest service unprotected, under Remus and under COLO;
COLO checkpoints per minute as the share of nondeterministic replies grows; and
failover time of both, all in one run on the same machine.

Everything is separate processes, as in use: `remusctl protect --foreground` on
simulated host A, `remusctl receive` on host B, and this process as the client
(one persistent connection, one PUT at a time, each timed to its reply). As
root the guests have network namespaces: Remus holds output with NFQUEUE until
the ACK; COLO mirrors input to the secondary guest and compares both guests'
output. The baseline is the same guest unprotected, measured in the same run.

Failover: SIGKILL of the primary's protect process (and its guest destroyed,
the host is gone) to the first reply of the secondary copy.

    .venv/bin/python benchmarks/colo_vs_remus.py [--requests 2000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.hypervisors.sim import SimHypervisor

REMUS_INTERVAL_MS = 100


def remusctl(host: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "--host", str(host), *args]


def status(host: Path) -> dict[str, object]:
    out = subprocess.run(
        remusctl(host, "status", "--local", "--json"), capture_output=True, text=True
    ).stdout
    rows = json.loads(out or "[]")
    return rows[0] if rows else {}


def wait_checkpoints(host: Path, n: int, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = status(host)
        if row and int(row.get("checkpoints") or 0) >= n:  # type: ignore[call-overload]
            return row
        time.sleep(0.05)
    raise TimeoutError(f"no {n} checkpoints on {host}")


class Client:
    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.f = self.sock.makefile("rwb")
        self.i = 0

    def put(self) -> float:
        self.i += 1
        t0 = time.perf_counter()
        self.f.write(f"PUT bench-{self.i} {self.i}\n".encode())
        self.f.flush()
        line = self.f.readline()
        took = time.perf_counter() - t0
        if not line.startswith(b"OK"):
            raise RuntimeError(f"unexpected reply {line!r}")
        return took

    def close(self) -> None:
        self.sock.close()


def latencies(address: str, n: int) -> list[float]:
    c = Client(address)
    for _ in range(20):  # warm up the connection
        c.put()
    out = [c.put() for _ in range(n)]
    c.close()
    return out


def summary(lat: list[float]) -> dict[str, float]:
    lat = sorted(lat)
    return {
        "p50_ms": round(statistics.median(lat) * 1e3, 3),
        "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1e3, 3),
        "n": len(lat),
    }


@contextmanager
def protected(
    a: SimHypervisor, b: SimHypervisor, name: str, mode: str, extra: tuple[str, ...] = ()
) -> Iterator[tuple[subprocess.Popen[str], subprocess.Popen[str]]]:
    port = 30000 + random.randrange(20000)
    recv = subprocess.Popen(
        remusctl(b.host, "receive", "--listen", f"127.0.0.1:{port}"),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert recv.stdout is not None and "receiving on" in recv.stdout.readline()
    args = ["protect", "--foreground", name, "--to", f"127.0.0.1:{port}", "-d", "-F", *extra]
    if mode == "colo":
        args.append("--colo")
    else:
        args += ["-i", str(REMUS_INTERVAL_MS)]
    prot = subprocess.Popen(remusctl(a.host, *args), stderr=subprocess.DEVNULL, text=True)
    try:
        wait_checkpoints(a.host, 2 if mode == "remus" else 1)
        yield prot, recv
    finally:
        for p in (prot, recv):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for hv in (a, b):
            for d in hv.list_domains():
                hv.destroy(d.domid)
            for f in (hv.host / "remus").glob("*.json"):
                f.unlink()


def failover(a: SimHypervisor, b: SimHypervisor, name: str, mode: str) -> float:
    info = a.create_domain(name, memory_mib=16)
    with protected(a, b, name, mode) as (prot, _recv):
        latencies(info.address, 50)  # some state, and a live connection
        time.sleep(random.uniform(0.05, 0.3))
        t0 = time.perf_counter()
        prot.kill()
        prot.wait()
        a.destroy(info.domid)
        while True:  # until the secondary copy answers
            if time.perf_counter() - t0 > 30:
                raise TimeoutError("no failover in 30 s")
            try:
                svm = b.lookup(name)
            except Exception:
                time.sleep(0.002)
                continue
            if svm.state == "running" and svm.address and answers(svm.address):
                return time.perf_counter() - t0
            time.sleep(0.002)


def answers(address: str) -> bool:
    """A PUT answered within 50 ms (COLO's secondary copy runs all along but
    its output is dropped until failover; Remus's copy runs only after it)."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.05) as s:
            s.sendall(b"PUT failover 1\n")
            return s.recv(64).startswith(b"OK")
    except OSError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=10.0, help="per nondeterminism level")
    ap.add_argument("--failovers", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root: the guests' network namespaces, NFQUEUE, the COLO mirror")
        return 2
    random.seed(1)
    with tempfile.TemporaryDirectory() as tmp:
        a, b = SimHypervisor(Path(tmp) / "a"), SimHypervisor(Path(tmp) / "b")
        results: dict[str, object] = {}

        info = a.create_domain("plain", memory_mib=16)
        base = summary(latencies(info.address, args.requests))
        a.destroy(info.domid)
        results["unprotected"] = base
        print(f"unprotected:            p50 {base['p50_ms']:8.3f} ms  p99 {base['p99_ms']:8.3f} ms")

        info = a.create_domain("remus", memory_mib=16)
        with protected(a, b, "remus", "remus"):
            remus = summary(latencies(info.address, max(100, args.requests // 20)))
        results["remus_100ms"] = remus
        print(
            f"Remus -i {REMUS_INTERVAL_MS}:          p50 {remus['p50_ms']:8.3f} ms  "
            f"p99 {remus['p99_ms']:8.3f} ms  ({remus['p50_ms'] / base['p50_ms']:.1f}x)"
        )

        info = a.create_domain("colo", memory_mib=16)
        with protected(a, b, "colo", "colo"):
            colo = summary(latencies(info.address, args.requests))
            row = status(a.host)
        results["colo_deterministic"] = {
            **colo,
            "checkpoints": row.get("checkpoints"),
            "compare_wait_ms_p50": row.get("compare_wait_ms_p50"),
        }
        print(
            f"COLO deterministic:     p50 {colo['p50_ms']:8.3f} ms  p99 {colo['p99_ms']:8.3f} ms"
            f"  ({colo['p50_ms'] / base['p50_ms']:.2f}x unprotected; checkpoints "
            f"{row.get('checkpoints')}, compared {row.get('compared_packets')}, "
            f"mismatches {row.get('mismatches')})"
        )
        # where the extra latency goes: a reply waits in the primary's queue for
        # the secondary copy's same bytes (input mirrored, its guest run, its
        # output reported back)
        print(
            f"  of which the reply waited for the secondary's output: p50 "
            f"{row.get('compare_wait_ms_p50')} ms, p99 {row.get('compare_wait_ms_p99')} ms"
        )

        # each copy draws its token on its own, so about 2 replies in N diverge
        print(
            "COLO, nondeterministic share of replies -> checkpoints per minute "
            "(each copy draws its own tokens: about twice the share diverges):"
        )
        shares = []
        for n in (0, 1000, 100, 20, 5, 2):
            name = f"nd{n}"
            info = a.create_domain(name, memory_mib=16, nondeterministic=n)
            with protected(a, b, name, "colo", ("--checkpoint-max-interval", "5000")):
                c = Client(info.address)
                c0 = int(status(a.host).get("checkpoints") or 0)  # type: ignore[call-overload]
                lat, t0 = [], time.perf_counter()
                while time.perf_counter() - t0 < args.seconds:
                    lat.append(c.put())
                took = time.perf_counter() - t0
                c.close()
                row = status(a.host)
            ckpts = int(row.get("checkpoints") or 0) - c0  # type: ignore[call-overload]
            share = 0.0 if n == 0 else 1 / n
            s = summary(lat)
            entry = {
                "share": share,
                "requests": len(lat),
                "checkpoints_per_min": round(ckpts / took * 60, 1),
                "by_divergence": row.get("checkpoints_by_divergence"),
                "by_held": row.get("checkpoints_by_held_output"),
                "by_timer": row.get("checkpoints_by_timer"),
                **s,
            }
            shares.append(entry)
            print(
                f"  share {share:6.3f}: {entry['checkpoints_per_min']:8.1f}/min over "
                f"{len(lat)} requests (divergence {entry['by_divergence']}, held "
                f"{entry['by_held']}, timer {entry['by_timer']}); p50 {s['p50_ms']:.3f} ms"
            )
        results["nondeterminism"] = shares

        fo: dict[str, list[float]] = {"colo": [], "remus": []}
        for i in range(args.failovers):
            for mode in ("colo", "remus"):  # interleaved: the machine's noise hits both
                fo[mode].append(failover(a, b, f"fo-{mode}-{i}", mode))
        med = {m: statistics.median(v) * 1e3 for m, v in fo.items()}
        results["failover_ms"] = {m: [round(x * 1e3, 1) for x in v] for m, v in fo.items()}
        print(
            f"failover (SIGKILL to the secondary's first reply), median of {args.failovers}: "
            f"COLO {med['colo']:.0f} ms, Remus {med['remus']:.0f} ms "
            f"(ratio {med['colo'] / med['remus']:.2f})"
        )
        ok_colo = colo["p50_ms"] <= 2 * base["p50_ms"]
        print(
            f"goal: COLO p50 within 2x of unprotected: {'met' if ok_colo else 'NOT met'} "
            f"({colo['p50_ms'] / base['p50_ms']:.2f}x); Remus p50 vs its interval: "
            f"{remus['p50_ms'] / REMUS_INTERVAL_MS:.2f}x"
        )
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
