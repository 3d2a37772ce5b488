"""A planned switchover, measured: the guest's pause, the request's time, the time until
the guest is protected again in the other direction, and what a client sees.

Two real remusd processes on two simulated hosts of this machine (loopback, mutual
TLS, a file witness both share; ``tests/service/test_remusd.Remusd``), one guest
protected with Remus at ``-i 50`` (or COLO, ``--mode colo``). Each round switches the
guest over (``POST /v1/protections/vm1/switchover`` on its primary) and back the next
round. For each:

* pause: the worker's ``switchover_pause_ms``, from the last suspend to the
  secondary's word that the guest runs there;
* client gap: the longest time between two answered requests of a client that asks
  the running copy all along (its view of the pause, with its reconnect);
* request: the POST's wall time (it answers once the guest runs on the peer and the
  old primary's worker has ended);
* protected again: from the POST to the new primary replicating its first
  checkpoint to the old one (its full first copy included).

Baseline, in the same run: the median pause of an ordinary checkpoint of the same
guest (the worker's ``pause_ms_p50`` before the first switchover); the ratio says
how many checkpoints' worth of pause a switchover costs. Medians over the rounds.

    .venv/bin/python benchmarks/switchover.py [--rounds 6] [--mode remus|colo] [--memory 16]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.service.test_remusd import Remusd  # noqa: E402
from tests.tlshosts import trust_each_other  # noqa: E402

NAME = "vm1"


def record(d: Remusd) -> dict[str, Any] | None:
    with contextlib.suppress(Exception), d.api() as c:
        got: dict[str, Any] = c.get(f"/v1/protections/{NAME}")
        return got
    return None


def wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def replicating(p: Remusd, s: Remusd, after: int) -> bool:
    rp, rs = record(p), record(s)
    return bool(
        rp and rs and rp["role"] == "primary" and rp["state"] == "replicating"
        and rp["checkpoints"] >= after and rs["role"] == "secondary"
    )  # fmt: skip


class Client:
    """Asks whichever copy runs, all along; the longest gap between two answers."""

    def __init__(self, *hosts: Remusd) -> None:
        self.hosts, self.last = hosts, time.monotonic()
        self.gaps: list[float] = []
        self.window_gap = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _addresses(self) -> list[str]:
        out = []
        for d in self.hosts:
            with contextlib.suppress(Exception):
                out += [x.address for x in d.hv.list_domains()
                        if x.name == NAME and x.state == "running" and x.address]  # fmt: skip
        return out

    def _run(self) -> None:
        answered = ""
        while not self._stop.is_set():
            # the copy that answered last first: under COLO the secondary's runs too,
            # its output filtered, and asking it first costs the client its timeout
            for address in sorted(self._addresses(), key=lambda a: a != answered):
                host, port = address.rsplit(":", 1)
                try:
                    with socket.create_connection((host, int(port)), timeout=0.15) as s:
                        s.sendall(b"GET probe\n")
                        if s.makefile("rb").readline().startswith(b"NOTFOUND"):
                            now = time.monotonic()
                            self.window_gap = max(self.window_gap, now - self.last)
                            self.last, answered = now, address
                            break
                except OSError:
                    continue
            time.sleep(0.002)

    def start(self) -> None:
        self._thread.start()

    def reset(self) -> None:
        self.window_gap = 0.0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--mode", choices=["remus", "colo"], default="remus")
    ap.add_argument("--memory", type=int, default=16, help="the guest's MiB")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="remus-switchover-") as tmp:
        base = Path(tmp)
        port = 20000 + random.randrange(20000)
        a = Remusd(base / "a", port, witness=f"file://{base}/witness")
        b = Remusd(base / "b", port + 1, witness=f"file://{base}/witness")
        trust_each_other(a.base / "host", b.base / "host")
        a.start()
        b.start()
        client = Client(a, b)
        try:
            a.hv.create_domain(NAME, memory_mib=args.memory)
            body: dict[str, Any] = {"name": NAME, "peer": f"127.0.0.1:{b.port}"}
            if args.mode == "colo":
                body.update(mode="colo", no_disk=True, checkpoint_max_interval_ms=1000)
            with a.api() as c:
                c.post("/v1/protections", body)
            first = 3 if args.mode == "remus" else 1
            wait(lambda: replicating(a, b, first + 10), 120, "replication")
            rec = record(a)
            assert rec is not None
            baseline = float(rec["live"]["pause_ms_p50"])
            client.start()
            rows = []
            primary, secondary = a, b
            for _ in range(args.rounds):
                wait(lambda p=primary, s=secondary: replicating(p, s, first), 120, "replicating")
                time.sleep(1.0)  # a steady state, and the client's gap from it
                client.reset()
                t0 = time.monotonic()
                with primary.api() as c:
                    done = c.post(f"/v1/protections/{NAME}/switchover")
                request = time.monotonic() - t0
                primary, secondary = secondary, primary
                wait(lambda p=primary, s=secondary: replicating(p, s, 1), 120, "protected back")
                again = time.monotonic() - t0
                time.sleep(0.5)
                rows.append((float(done["live"]["switchover_pause_ms"]), client.window_gap * 1e3,
                             request * 1e3, again * 1e3))  # fmt: skip
        finally:
            client.stop()
            for d in (a, b):
                d.stop()
                for dom in d.hv.list_domains():
                    with contextlib.suppress(Exception):
                        d.hv.destroy(dom.domid)
    cols = list(zip(*rows, strict=True))
    med = [statistics.median(c) for c in cols]
    print(f"{args.mode}, {args.memory} MiB guest, {args.rounds} switchovers (A->B, B->A, ...), "
          "two remusd on loopback, mutual TLS, file witness")  # fmt: skip
    print(f"baseline: an ordinary checkpoint's pause, median {baseline:.2f} ms")
    for label, values, m in zip(
        ("pause (worker)", "client gap", "request (POST)", "protected again"),
        cols,
        med,
        strict=True,
    ):
        print(f"  {label:16} median {m:8.0f} ms  (min {min(values):.0f}, max {max(values):.0f})")
    print(f"ratio: switchover pause / checkpoint pause = {med[0] / baseline:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
