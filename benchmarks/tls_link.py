"""The replication link with mutual TLS (the default) against plain TCP, in one run.

Throughput: the stream channel of a real Endpoint/connect pair on 127.0.0.1,
``--mib`` MiB written by one thread into the primary's stream fd and read from
the secondary's, as the save and restore helpers do; plain TCP, then TLS
(TLS 1.3 through the relays of transport/relay.py: the kernel here has no
``tls`` module), alternating, ``--runs`` times each. Goal: TLS >= 70% of plain.

Checkpoint rate: `remusctl receive` and `remusctl protect --foreground -i 0`
between two simulated hosts (separate processes, the real helpers), a 64 MiB
guest dirtying pages, checkpoints counted from the status file over
``--seconds``; with TLS and with --insecure-link, alternating.

    .venv/bin/python benchmarks/tls_link.py [--mib 256] [--runs 5] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from orchestrator.hypervisors.sim import SimHypervisor
from orchestrator.transport.channels import connect
from orchestrator.transport.endpoint import Endpoint
from orchestrator.transport.tls import PLAIN, Identity, Link

CHUNK = 1 << 20


def _pair(base: Path) -> tuple[Identity, Identity]:
    a, b = Identity(base / "a" / "tls"), Identity(base / "b" / "tls")
    a.init("a")
    b.init("b")
    a.trust(str(b.cert_path), "b")
    b.trust(str(a.cert_path), "a")
    return a, b


async def throughput(client: Link, server: Link, mib: int) -> float:
    """MB/s through the stream channel, one writer thread, one reader thread."""
    ep = Endpoint("127.0.0.1", 0, link=server)
    await ep.start()
    try:
        stream, ctl = await connect(f"127.0.0.1:{ep.port}", str(uuid.uuid4()), client)
        pair = await ep.next_pair()
        block = random.randbytes(CHUNK)
        total = mib * CHUNK
        got = 0

        def read() -> None:
            nonlocal got
            buf = bytearray(CHUNK)
            while got < total:
                n = pair.stream.recv_into(buf)
                if not n:
                    return
                got += n

        reader = threading.Thread(target=read)
        t0 = time.perf_counter()
        reader.start()
        for _ in range(mib):
            stream.sendall(block)
        await asyncio.to_thread(reader.join)
        elapsed = time.perf_counter() - t0
        assert got == total, (got, total)
        stream.close()
        ctl.close()
        pair.close()
        return total / elapsed / 1e6
    finally:
        await ep.close()


def _remusctl(host: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "--host", str(host), *args]


def checkpoint_rate(base: Path, insecure: bool, seconds: float) -> float:
    """Checkpoints per second of a protect -i 0 between two simulated hosts."""
    run = base / f"run-{uuid.uuid4().hex[:8]}"
    a, b = SimHypervisor(run / "a"), SimHypervisor(run / "b")
    for hv in (a, b):
        Identity(hv.tls_dir()).init(hv.host.name)
    for hv, peer in ((a, b), (b, a)):
        Identity(hv.tls_dir()).trust(str(Identity(peer.tls_dir()).cert_path), peer.host.name)
    a.create_domain("bench", memory_mib=64, dirty_rate=2000)
    flag = ["--insecure-link"] if insecure else []
    port = 30000 + random.randrange(20000)
    recv = subprocess.Popen(
        _remusctl(b.host, "receive", "--listen", f"127.0.0.1:{port}", *flag),
        stdout=subprocess.PIPE,
        text=True,
    )
    prot = None
    try:
        assert recv.stdout is not None and "receiving on" in recv.stdout.readline()
        prot = subprocess.Popen(
            _remusctl(
                a.host, "protect", "--foreground", "bench", "--to", f"127.0.0.1:{port}",
                "-i", "0", *flag,
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        status = a.state_dir() / "bench.json"

        def checkpoints() -> int:
            try:
                return int(json.loads(status.read_text())["checkpoints"])
            except (OSError, ValueError, KeyError):
                return 0

        deadline = time.monotonic() + 60
        while checkpoints() < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        c0, t0 = checkpoints(), time.monotonic()
        time.sleep(seconds)
        return (checkpoints() - c0) / (time.monotonic() - t0)
    finally:
        for p in (prot, recv):
            if p is not None:
                p.kill()
                p.wait()
        for hv in (a, b):
            for d in hv.list_domains():
                hv.destroy(d.domid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        a, b = _pair(base)
        plain: list[float] = []
        tls: list[float] = []
        for _ in range(args.runs):
            plain.append(asyncio.run(throughput(PLAIN, PLAIN, args.mib)))
            tls.append(asyncio.run(throughput(Link(a), Link(b), args.mib)))
        p, t = statistics.median(plain), statistics.median(tls)
        print(
            f"link throughput, {args.mib} MiB x {args.runs}: plain {p:,.0f} MB/s, "
            f"TLS {t:,.0f} MB/s (median); TLS/plain {t / p:.2f} (goal >= 0.70)"
        )
        print(f"  plain runs: {', '.join(f'{x:,.0f}' for x in plain)}")
        print(f"  TLS runs:   {', '.join(f'{x:,.0f}' for x in tls)}")
        rp: list[float] = []
        rt: list[float] = []
        for _ in range(max(1, args.runs // 2)):
            rp.append(checkpoint_rate(base, True, args.seconds))
            rt.append(checkpoint_rate(base, False, args.seconds))
        cp, ct = statistics.median(rp), statistics.median(rt)
        print(
            f"checkpoint rate at -i 0, 64 MiB guest dirtying 2000 pages/s: plain {cp:,.1f}/s, "
            f"TLS {ct:,.1f}/s (median of {len(rp)}); TLS/plain {ct / cp:.2f}"
        )


if __name__ == "__main__":
    main()
