"""Remus under a witness: failover time after host death, and the checkpoint rate,
with the file witness, with etcd, and with none (the baseline), in one run.

Real processes, as in tests/protection/test_lease_failover.py: `remusctl protect
NAME --foreground --to 127.0.0.1:PORT -i MS` on simulated host A, `remusctl receive
--listen 127.0.0.1:PORT` on host B, both with the same witness: `file:///TMP/witness`
(a directory both hosts share; an fcntl lock the kernel drops when its holder dies),
`etcd3+http://127.0.0.1:PORT` (Debian's /usr/bin/etcd started here with a 100 ms
election timeout, so that 1 s leases hold; a lease outlives a dead holder by its
TTL), or none. Leases of --lease-ttl (1000 ms).

Each run, one protection: after 3 checkpoints, clients write keys over persistent
connections (each PUT answered once its checkpoint is ACKed); the checkpoint rate
is the primary's status document (`<host>/remus/<name>.json`, rewritten every
0.2 s) read at both ends of a fixed window: checkpoints over the document's own
`updated` clock. Then one more key is written, the protect process SIGKILLed and
its guest destroyed (the host is gone), and failover time is from the SIGKILL to
the secondary copy (`SimHypervisor(B).lookup(name).address`) answering `GET` of
that key with its value; with etcd, a thread polls the lock's key every 10 ms
from the SIGKILL on, for when etcd drops the dead primary's lease and when the
secondary's takes the key. Runs alternate (none, file, etcd, none, file, ...), so
the machine's noise falls on all three; medians, ratios to no witness (of the
medians, and "paired": the median over rounds of a run's rate over that round's
no-witness rate).

Goals: failover within the lease TTL + 0.3 s; checkpoint rate within 5% of none.

"No witness" is `--witness none -F` on both processes once a witness is the
default; before that, no `--witness` at all. The run tries the first on a
receiver and falls back, and checks each status document for the witness it asked.

    .venv/bin/python benchmarks/witness_failover.py [--rounds 5] [--seconds 4] \\
        [--interval 20] [--lease-ttl 1000]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.hypervisors.sim import SimHypervisor  # noqa: E402
from orchestrator.transport.tls import Identity  # noqa: E402
from tests.etcd import EtcdServer, free_port  # noqa: E402

MODES = ("none", "file", "etcd")
# the key tooz's etcd3gw lock puts (orchestrator/coordination/witness.py, protection/lease.py)
ETCD_LOCK_KEY = "/tooz/locksremus-protection-{uuid}"
WRITERS = 4  # client connections writing keys during the window
SETTLE_S = 0.5  # after the third checkpoint, before the window opens
ATTEMPTS = 3  # a run whose protection does not get going is tried again, this many times
GAVE_UP = ("unprotected", "stopped", "fenced")  # primary states: no replication


def remusctl(host: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "--host", str(host), *args]


def no_witness_args(b: SimHypervisor) -> list[str]:
    """How this CLI spells "no witness": `--witness none -F` if a receiver takes it
    (a witness is the default), else nothing (no witness is the default)."""
    args = ["--witness", "none", "-F"]
    recv = subprocess.Popen(
        remusctl(b.host, "receive", "--listen", f"127.0.0.1:{free_port()}", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert recv.stdout is not None
    try:
        return args if "receiving on" in recv.stdout.readline() else []
    finally:
        recv.kill()
        recv.wait()


class Writers:
    """Clients writing keys over persistent connections (one PUT at a time each)."""

    def __init__(self, address: str, n: int) -> None:
        self.address, self.stop = address, threading.Event()
        self.counts = [0] * n  # PUTs answered OK, per connection
        self.threads = [threading.Thread(target=self._run, args=(c,)) for c in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, c: int) -> None:
        host, port = self.address.rsplit(":", 1)
        i = 0
        while not self.stop.is_set():
            try:
                with socket.create_connection((host, int(port)), timeout=2) as s:
                    f = s.makefile("rwb")
                    while not self.stop.is_set():
                        i += 1
                        f.write(f"PUT w{c}-{i % 500} {i}\n".encode())
                        f.flush()
                        if not f.readline().startswith(b"OK"):
                            break
                        self.counts[c] += 1
            except OSError:
                time.sleep(0.05)

    @property
    def acked(self) -> int:
        return sum(self.counts)

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def kv(address: str, line: bytes, timeout: float = 10) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(line + b"\n")
        return s.makefile("rb").readline().rstrip(b"\n")


def answers(b: SimHypervisor, name: str, key: str) -> bool:
    """The copy on B runs and answers GET ``key`` with its value within 50 ms."""
    try:
        d = b.lookup(name)
    except Exception:
        return False
    if d.state != "running" or not d.address:
        return False
    try:
        return kv(d.address, f"GET {key}".encode(), timeout=0.05) == b"VALUE yes"
    except OSError:
        return False


def status(host: Path, name: str) -> dict[str, Any]:
    try:
        row: dict[str, Any] = json.loads((host / "remus" / f"{name}.json").read_text())
        return row
    except (OSError, ValueError):
        return {}


def fresh_status(host: Path, name: str, after: float) -> dict[str, Any]:
    """The first status document written after wall-clock ``after``."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        row = status(host, name)
        if float(row.get("updated") or 0) > after:
            return row
        time.sleep(0.01)
    raise TimeoutError(f"no status document of {name} on {host} after {after}")


class LockWatch:
    """Polls etcd every 10 ms for a lock key from the SIGKILL on: when the dead
    primary's lease is gone from etcd, and when another lease holds the key."""

    def __init__(self, port: int, key: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        self.body = json.dumps({"key": base64.b64encode(key.encode()).decode()})
        self.lease = self._lease()
        if self.lease is None:
            raise RuntimeError(f"etcd has no lock key {key!r}")
        self.gone_at: float | None = None
        self.taken_at: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _lease(self) -> str | None:
        self.conn.request("POST", "/v3/kv/range", self.body)
        kvs = json.loads(self.conn.getresponse().read()).get("kvs") or []
        return str(kvs[0].get("lease")) if kvs else None

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set() and self.taken_at is None:
            try:
                lease = self._lease()
            except (OSError, http.client.HTTPException, ValueError):
                lease = self.lease
            now = time.perf_counter()
            if lease != self.lease and self.gone_at is None:
                self.gone_at = now
            if lease not in (None, self.lease):
                self.taken_at = now
            time.sleep(0.01)

    def join(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.conn.close()


@dataclass
class Run:
    mode: str
    rate: float  # checkpoints/s over the window
    late: int  # epochs over 1.5x the interval in the window
    epochs: int
    acked: int  # PUTs answered in the window
    failover_s: float
    # etcd: the dead primary's lock key gone, and held by the secondary, after the SIGKILL
    expired_s: float | None = None
    taken_s: float | None = None


class SetupError(RuntimeError):
    """The protection did not get going (nothing measured yet): the run is tried again."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def why(logs: Path, name: str) -> str:
    """The last error line either process logged, for a one-line note."""
    lines = [
        line.strip()
        for f in sorted(logs.glob(f"{name}.*.log"))
        for line in f.read_text(errors="replace").splitlines()
        if "Error" in line
    ]
    return lines[-1][-200:] if lines else "no error logged"


def tails(logs: Path, name: str) -> str:
    out = []
    for f in sorted(logs.glob(f"{name}.*.log")):
        out.append(f"--- {f.name}:\n{f.read_text(errors='replace')[-1500:]}")
    return "\n".join(out)


def stop(*procs: subprocess.Popen[str] | None) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()


def one_run(
    a: SimHypervisor,
    b: SimHypervisor,
    name: str,
    mode: str,
    witness: list[str],
    url: str,
    etcd_port: int | None,
    args: argparse.Namespace,
    logs: Path,
) -> Run:
    info = a.create_domain(name, memory_mib=8)
    port = free_port()
    recv = prot = None
    writers: Writers | None = None
    watch: LockWatch | None = None
    try:
        with open(logs / f"{name}.receive.log", "wb") as log:
            recv = subprocess.Popen(
                remusctl(b.host, "receive", "--listen", f"127.0.0.1:{port}", *witness),
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        assert recv.stdout is not None
        line = recv.stdout.readline()
        if "receiving on" not in line:
            raise SetupError(
                f"{mode}: receiver did not start: {line!r}\n{tails(logs, name)}", why(logs, name)
            )
        with open(logs / f"{name}.protect.log", "wb") as log:
            prot = subprocess.Popen(
                remusctl(a.host, "protect", name, "--foreground", "--to", f"127.0.0.1:{port}",
                         "-i", str(args.interval), *witness),
                stderr=log,
                text=True,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        row: dict[str, Any] = {}
        while int(row.get("checkpoints") or 0) < 3:
            gone = prot.poll() is not None or recv.poll() is not None
            if gone or time.monotonic() > deadline or row.get("state") in GAVE_UP:
                raise SetupError(
                    f"{mode}: no third checkpoint: {row}\n{tails(logs, name)}", why(logs, name)
                )
            time.sleep(0.02)
            row = status(a.host, name)
        if mode == "none":
            ok = row.get("witness") in ("", "none", None) and row.get("lease") in (None, "none")
        else:
            ok = row.get("witness") == url and row.get("lease") == "held"
        if not ok:
            raise RuntimeError(
                f"{mode}: status shows witness {row.get('witness')!r} lease {row.get('lease')!r}"
            )
        service = str(row.get("service_address") or info.address)

        writers = Writers(service, WRITERS)
        time.sleep(SETTLE_S)
        r0 = fresh_status(a.host, name, time.time())
        acked0 = writers.acked
        time.sleep(args.seconds)
        r1 = fresh_status(a.host, name, time.time())
        acked = writers.acked - acked0
        rate = (r1["checkpoints"] - r0["checkpoints"]) / (r1["updated"] - r0["updated"])
        writers.join()
        writers = None
        key = f"mark-{name}"
        if kv(service, f"PUT {key} yes".encode()) != b"OK":  # answered once ACKed
            raise RuntimeError(f"{mode}: PUT {key} not acknowledged")

        if mode == "etcd" and etcd_port is not None:
            try:
                watch = LockWatch(etcd_port, ETCD_LOCK_KEY.format(uuid=info.uuid))
            except RuntimeError as e:  # the key's spelling changed: no breakdown, still a run
                print(f"  (etcd breakdown skipped: {e})")
        t0 = time.perf_counter()
        if watch is not None:
            watch.start()
        prot.kill()
        prot.wait()
        a.destroy(info.domid)
        while not answers(b, name, key):
            if time.perf_counter() - t0 > 30:
                raise TimeoutError(f"{mode}: no failover in 30 s\n{tails(logs, name)}")
            time.sleep(0.002)
        took = time.perf_counter() - t0
        expired = taken = None
        if watch is not None:
            watch.join()
            expired = None if watch.gone_at is None else watch.gone_at - t0
            taken = None if watch.taken_at is None else watch.taken_at - t0
            watch = None
        out, _ = recv.communicate(timeout=30)
        if "FAILOVER" not in out:
            raise RuntimeError(f"{mode}: receiver said {out!r}\n{tails(logs, name)}")
        return Run(
            mode,
            rate,
            r1["late_epochs"] - r0["late_epochs"],
            r1["epochs"] - r0["epochs"],
            acked,
            took,
            expired,
            taken,
        )
    finally:
        if writers is not None:
            writers.join()
        if watch is not None:
            watch.join()
        stop(prot, recv)
        for hv in (a, b):
            for d in hv.list_domains():
                hv.destroy(d.domid)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5, help="runs of each witness")
    ap.add_argument("--seconds", type=float, default=4.0, help="checkpoint-rate window")
    ap.add_argument("--interval", type=int, default=20, help="-i, ms")
    ap.add_argument("--lease-ttl", type=int, default=1000, help="ms")
    args = ap.parse_args()
    binary = shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)
    modes = MODES if binary else MODES[:2]
    if binary is None:
        print("etcd: skipped (no etcd binary: apt-get install etcd-server)")
    ttl = args.lease_ttl
    started = time.monotonic()
    runs: list[Run] = []
    retries: list[str] = []  # runs whose protection did not get going, and why
    with tempfile.TemporaryDirectory(prefix="remus-bench-") as tmp_s:
        tmp = Path(tmp_s)
        a, b = SimHypervisor(tmp / "a"), SimHypervisor(tmp / "b")
        # the replication link is mutual TLS by default: each host's identity,
        # each trusting the other's certificate (what `remusctl demo` sets up)
        for hv in (a, b):
            Identity(hv.tls_dir()).init(hv.host.name)
        for hv, peer in ((a, b), (b, a)):
            Identity(hv.tls_dir()).trust(str(Identity(peer.tls_dir()).cert_path), peer.host.name)
        logs = tmp / "logs"
        logs.mkdir()
        etcd = None
        if binary is not None:
            etcd = EtcdServer(binary, tmp / "etcd" / "data")
            etcd.data_dir.parent.mkdir()
            etcd.start()
        try:
            none = no_witness_args(b)
            urls = {"none": "", "file": f"file://{tmp / 'witness'}"}
            etcd_port = None
            if etcd is not None:
                urls["etcd"] = etcd.url
                etcd_port = etcd.port
            spell = {m: ["--witness", u, "--lease-ttl", str(ttl)] for m, u in urls.items()}
            spell["none"] = none
            print(
                f"no witness spelled: {' '.join(none) or '(no --witness)'}; "
                f"-i {args.interval}, lease TTL {ttl} ms, {args.rounds} rounds of "
                f"{args.seconds:g} s windows, {WRITERS} writers, {os.cpu_count()} cores"
            )
            for r in range(args.rounds):
                for m in modes:  # interleaved: the machine's noise hits every mode
                    for attempt in range(ATTEMPTS):
                        name = f"w{m}{r}" + (f"x{attempt}" if attempt else "")
                        try:
                            run = one_run(a, b, name, m, spell[m], urls[m], etcd_port, args, logs)
                            break
                        except SetupError as e:
                            if attempt == ATTEMPTS - 1:
                                raise
                            retries.append(f"{m} round {r + 1}: {e.reason}")
                            print(f"  round {r + 1} {m:4}: did not start ({e.reason}); again")
                    runs.append(run)
                    extra = ""
                    if run.expired_s is not None and run.taken_s is not None:
                        extra = (
                            f" (lock gone from etcd at {run.expired_s * 1e3:.0f} ms, "
                            f"taken at {run.taken_s * 1e3:.0f} ms)"
                        )
                    print(
                        f"  round {r + 1} {m:4}: {run.rate:6.2f} checkpoints/s, late "
                        f"{run.late}/{run.epochs}, {run.acked} PUTs; failover "
                        f"{run.failover_s * 1e3:5.0f} ms{extra}",
                        flush=True,
                    )
        finally:
            if etcd is not None:
                etcd.kill()
    report(runs, retries, modes, args, time.monotonic() - started)
    return 0


def report(
    runs: list[Run],
    retries: list[str],
    modes: tuple[str, ...],
    args: argparse.Namespace,
    wall: float,
) -> None:
    ttl = args.lease_ttl
    by = {m: [x for x in runs if x.mode == m] for m in modes}
    fo = {m: statistics.median(x.failover_s for x in v) for m, v in by.items()}
    rate = {m: statistics.median(x.rate for x in v) for m, v in by.items()}
    # each run's rate over the no-witness run of its round: the noise of that moment cancels
    paired = {
        m: statistics.median(x.rate / n.rate for x, n in zip(v, by["none"], strict=True))
        for m, v in by.items()
    }
    print()
    print(
        f"{'witness':8} {'failover p50':>12} {'min':>6} {'max':>6} {'/none':>6}  "
        f"{'checkpoints/s p50':>17} {'/none':>6} {'paired':>7}  {'late epochs':>11}"
    )
    for m, v in by.items():
        fos = [x.failover_s * 1e3 for x in v]
        late, epochs = sum(x.late for x in v), sum(x.epochs for x in v)
        print(
            f"{m:8} {fo[m] * 1e3:>9.0f} ms {min(fos):>6.0f} {max(fos):>6.0f} "
            f"{fo[m] / fo['none']:>6.2f}  {rate[m]:>17.2f} {rate[m] / rate['none']:>6.3f} "
            f"{paired[m]:>7.3f}  {late:>5}/{epochs}"
        )
    print(
        f"(failover: SIGKILL of the primary to the secondary's copy answering GET, median of "
        f"{args.rounds}; checkpoints/s at -i {args.interval} over {args.seconds:g} s; paired: "
        "median over rounds of the run's rate / that round's no-witness rate)"
    )
    etcd = [x for x in by.get("etcd", []) if x.expired_s is not None and x.taken_s is not None]
    if etcd:
        gone = statistics.median(x.expired_s or 0.0 for x in etcd) * 1e3
        taken = statistics.median(x.taken_s or 0.0 for x in etcd) * 1e3
        print(
            f"etcd, medians after the SIGKILL: the dead primary's lock key gone from etcd "
            f"{gone:.0f} ms (TTL {ttl} ms), taken by the secondary {taken:.0f} ms, "
            f"its copy answering {fo['etcd'] * 1e3:.0f} ms"
        )
    if retries:
        print(f"runs started again ({len(retries)}), their protection not getting going:")
        for note in retries:
            print(f"  {note}")
    print()
    goal_fo = ttl / 1e3 + 0.3
    for m in modes[1:]:
        ratio = rate[m] / rate["none"]
        print(
            f"goal {m}: failover p50 {fo[m] * 1e3:.0f} ms within TTL + 0.3 s = "
            f"{goal_fo * 1e3:.0f} ms: {'met' if fo[m] <= goal_fo else 'NOT met'}; "
            f"checkpoint rate {ratio:.3f}x none (paired {paired[m]:.3f}x), within 5%: "
            f"{'met' if ratio >= 0.95 else 'NOT met'}"
        )
    results = {
        "interval_ms": args.interval,
        "lease_ttl_ms": ttl,
        "window_s": args.seconds,
        "failover_ms_p50": {m: round(v * 1e3, 1) for m, v in fo.items()},
        "failover_ms": {m: [round(x.failover_s * 1e3, 1) for x in v] for m, v in by.items()},
        "etcd_lock_gone_ms": [round((x.expired_s or 0) * 1e3, 1) for x in etcd],
        "etcd_lock_taken_ms": [round((x.taken_s or 0) * 1e3, 1) for x in etcd],
        "checkpoints_per_s_p50": {m: round(v, 2) for m, v in rate.items()},
        "checkpoints_per_s": {m: [round(x.rate, 2) for x in v] for m, v in by.items()},
        "rate_ratio_paired": {m: round(v, 4) for m, v in paired.items()},
        "late_epochs": {m: sum(x.late for x in v) for m, v in by.items()},
        "setup_retries": retries,
        "wall_s": round(wall, 1),
    }
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
