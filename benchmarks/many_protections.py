"""Many protections at once under remusd: do checkpoints keep to the interval?

Two remusd processes (host A primary, host B secondary) on this machine; N
simulated domains (16 MiB, the guest dirtying some pages each second) all
protected at the same interval through the API; after they have settled,
each worker's epoch counters are read at the start and the end of the
measured window. An epoch is late when suspend-to-suspend took more than
1.5 times the interval. Baseline, in the same run: one domain protected
alone for a shorter window.

    .venv/bin/python benchmarks/many_protections.py [--domains 16] [--seconds 60] \\
        [--interval 100] [--dirty-rate 50]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.hypervisors.sim import SimHypervisor  # noqa: E402
from orchestrator.service.client import ApiClient  # noqa: E402


def start_remusd(base: Path, port: int) -> subprocess.Popen[bytes]:
    base.mkdir(parents=True)
    (base / "empty.toml").write_text("")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator.service.daemon",
            "--config",
            str(base / "empty.toml"),
            "--set",
            f"api.socket={base / 'api.sock'}",
            "--set",
            f"state.dir={base / 'state'}",
            "--set",
            f"state.host={base / 'host'}",
            "--set",
            f"replication.listen=127.0.0.1:{port}",
            "--set",
            "metrics.listen=",
        ],
        stderr=open(base / "remusd.log", "wb"),  # noqa: SIM115 (the process owns it)
        cwd=ROOT,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with ApiClient(base / "api.sock", timeout=2) as c:
                c.get("/v1/health")
            return proc
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"remusd at {base} did not start")


def statuses(base: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for n in names:
        out[n] = json.loads((base / "state" / "workers" / f"{n}.json").read_text())
    return out


def measure(
    a: Path, b_port: int, names: list[str], interval: int, seconds: float
) -> dict[str, Any]:
    with ApiClient(a / "api.sock", timeout=60) as c:
        for n in names:
            c.post(
                "/v1/protections",
                {"name": n, "peer": f"127.0.0.1:{b_port}", "interval_ms": interval},
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if all(c.get(f"/v1/protections/{n}")["checkpoints"] >= 5 for n in names):
                break
            time.sleep(0.5)
        else:
            late = [
                (n, p["state"], p["checkpoints"], p["reason"])
                for n in names
                for p in [c.get(f"/v1/protections/{n}")]
                if p["checkpoints"] < 5
            ]
            logs = sorted((a.parent / "b" / "state" / "workers").glob("*.log"))
            tails = "\n".join(f"{p.name}: {p.read_text()[-600:]}" for p in logs[-4:])
            raise RuntimeError(f"protections did not settle: {late}\n{tails}")
        time.sleep(2)  # let the first, larger checkpoints pass
        before, t0 = statuses(a, names), time.monotonic()
        time.sleep(seconds)
        after, elapsed = statuses(a, names), time.monotonic() - t0
        for n in names:
            c.delete(f"/v1/protections/{n}")
    per = {}
    for n in names:
        epochs = after[n]["epochs"] - before[n]["epochs"]
        late = after[n]["late_epochs"] - before[n]["late_epochs"]
        per[n] = {
            "epochs": epochs,
            "late": late,
            "rate": epochs / elapsed,
            "pause_ms_p50": after[n]["pause_ms_p50"],
        }
    epochs = sum(p["epochs"] for p in per.values())
    late = sum(p["late"] for p in per.values())
    return {
        "epochs": epochs,
        "late": late,
        "late_share": late / epochs if epochs else float("nan"),
        "worst_domain_late_share": max(p["late"] / max(p["epochs"], 1) for p in per.values()),
        "rate_per_domain_p50": statistics.median(p["rate"] for p in per.values()),
        "pause_ms_p50": statistics.median(p["pause_ms_p50"] for p in per.values()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--domains", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--baseline-seconds", type=float, default=15.0)
    ap.add_argument("--interval", type=int, default=100, help="ms")
    ap.add_argument("--dirty-rate", type=int, default=50, help="pages/s each guest dirties")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="remus-bench-") as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        port = 40000 + random.randrange(10000)
        procs = [start_remusd(a, port), start_remusd(b, port + 1)]
        hv_a, hv_b = SimHypervisor(a / "host"), SimHypervisor(b / "host")
        try:
            names = [f"vm{i:02d}" for i in range(args.domains)]
            for n in names:
                hv_a.create_domain(n, memory_mib=16, dirty_rate=args.dirty_rate)
            base = measure(a, port + 1, names[:1], args.interval, args.baseline_seconds)
            many = measure(a, port + 1, names, args.interval, args.seconds)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
            for w in Path("/proc").iterdir():
                if w.name.isdigit():
                    try:
                        argv = (w / "cmdline").read_bytes()
                    except OSError:
                        continue
                    if b"orchestrator.protection.worker" in argv and tmp.encode() in argv:
                        os.kill(int(w.name), signal.SIGKILL)
            for hv in (hv_a, hv_b):
                for d in hv.list_domains():
                    hv.destroy(d.domid)
    iv = args.interval
    print(f"{args.domains} domains at -i {iv} for {args.seconds:g} s on {os.cpu_count()} cores:")
    print(
        f"  late epochs (> {1.5 * iv:g} ms): {many['late']} of {many['epochs']} = "
        f"{100 * many['late_share']:.2f}%  (goal < 1%); worst domain "
        f"{100 * many['worst_domain_late_share']:.2f}%"
    )
    print(
        f"  checkpoints per domain: {many['rate_per_domain_p50']:.2f}/s (median; "
        f"{1000 / iv:.1f}/s if none ran late); pause {many['pause_ms_p50']:.2f} ms (median)"
    )
    print(
        f"baseline, 1 domain alone for {args.baseline_seconds:g} s: late "
        f"{100 * base['late_share']:.2f}% of {base['epochs']}, "
        f"{base['rate_per_domain_p50']:.2f} checkpoints/s, pause {base['pause_ms_p50']:.2f} ms"
    )
    ratio = many["rate_per_domain_p50"] / base["rate_per_domain_p50"]
    print(f"ratio checkpoints/s per domain, {args.domains} vs 1: {ratio:.3f}")


if __name__ == "__main__":
    main()
