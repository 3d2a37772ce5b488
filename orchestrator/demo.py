"""`remusctl demo`: Remus on one machine, with the primary killed at a random moment.

Two simulated hosts; a domain running the key-value service on the first;
`remusctl receive` on the second and `remusctl protect` on the first, as
separate processes; clients writing keys and recording every write the
service acknowledged. At a random moment the primary host dies (SIGKILL of
its protection process and of the guest). The secondary fails over from
the last complete checkpoint, and every acknowledged key is read back from
it. With network buffering (the default) no acknowledged write is lost:
the client only sees an OK whose checkpoint the secondary has acknowledged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .hypervisors.sim import SimHypervisor
from .protection.host import tls_identity
from .protection.spec import FIELDS, add_arguments
from .protection.status import ProtectionStatus


@dataclass
class DemoReport:
    interval_ms: float
    netbuf: bool
    netbuf_device: str = ""
    checkpoints: int = 0
    pause_ms_p50: float | None = None
    writes_acknowledged: int = 0
    write_throughput_per_s: float = 0.0
    killed_after_s: float = 0.0
    failover_s: float = 0.0
    acknowledged_writes_lost: int = 0
    # the guest's disk journal and its memory agree on the last write: both
    # came from the same checkpoint (disk replication at work)
    disk_consistent: bool | None = None
    disk_journal: str = ""
    lost_keys_sample: list[str] = field(default_factory=list)


def _started(status_file: Path) -> bool:
    st = ProtectionStatus.read(status_file)
    return st is not None and st.checkpoints >= 2


def _remusctl(host: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "--host", str(host), *args]


async def _writer(address: str, prefix: str, acked: dict[str, str], stop: asyncio.Event) -> None:
    host, port = address.rsplit(":", 1)
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        return
    n = 0
    with contextlib.suppress(ConnectionError, OSError):
        while not stop.is_set():
            key, value = f"{prefix}-{n}", f"v{n}-{random.randrange(1 << 30)}"
            writer.write(f"PUT {key} {value}\n".encode())
            line = await reader.readline()
            if line != b"OK\n":
                break
            acked[key] = value  # only now has the client seen the write succeed
            n += 1
    writer.close()


async def _read_all(address: str, keys: list[str]) -> dict[str, str | None]:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    out: dict[str, str | None] = {}
    for i in range(0, len(keys), 500):
        chunk = keys[i : i + 500]
        writer.write(b"".join(f"GET {k}\n".encode() for k in chunk))
        for k in chunk:
            line = (await reader.readline()).decode().rstrip("\n")
            out[k] = line[6:] if line.startswith("VALUE ") else None
    writer.close()
    return out


async def run_demo(
    duration: float,
    interval_ms: int,  # whole ms, as protect -i takes them
    netbuf: bool = True,
    clients: int = 8,
    progress: bool = True,
    workdir: Path | None = None,
    netbuf_mode: str = "auto",
) -> DemoReport:
    tmp = tempfile.TemporaryDirectory(prefix="remus-demo-", dir=workdir)
    base = Path(tmp.name)
    host_a, host_b = base / "host-a", base / "host-b"
    hv_a, hv_b = SimHypervisor(host_a), SimHypervisor(host_b)
    report = DemoReport(interval_ms, netbuf)

    def say(msg: str) -> None:
        if progress:
            print(msg, flush=True)

    procs: list[asyncio.subprocess.Process] = []
    logs: list[Any] = []
    try:
        # what an admin does once per host pair (`remusctl host init` on each, then
        # `remusctl host trust` of the other's certificate): the link is mutual TLS
        ids = {"host-a": tls_identity(hv_a), "host-b": tls_identity(hv_b)}
        for name, ident in ids.items():
            ident.init(name)
        ids["host-a"].trust(str(ids["host-b"].cert_path), "host-b")
        ids["host-b"].trust(str(ids["host-a"].cert_path), "host-a")
        say(
            f"== mutual TLS: host-a {ids['host-a'].fingerprint[:19]}..., "
            f"host-b {ids['host-b'].fingerprint[:19]}..., each pinned by the other"
        )
        info = hv_a.create_domain("demo-guest", memory_mib=32)
        say(f"== domain {info.name} on host-a, service at {info.address}")
        port = 20000 + random.randrange(20000)
        recv = await asyncio.create_subprocess_exec(
            *_remusctl(host_b, "receive", "--listen", f"127.0.0.1:{port}"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        procs.append(recv)
        assert recv.stdout is not None
        first = await asyncio.wait_for(recv.stdout.readline(), 15)
        say(f"== secondary on host-b: {first.decode().strip()}")
        flags = ["--netbuf", netbuf_mode] if netbuf else ["-n", "-F"]
        prot_log = open(base / "protect.log", "wb")  # noqa: SIM115 - closed in finally
        logs.append(prot_log)
        prot = await asyncio.create_subprocess_exec(
            *_remusctl(
                host_a,
                "protect",
                "--foreground",  # the demo is its own service: no remusd needed
                info.name,
                "--to",
                f"127.0.0.1:{port}",
                "-i",
                str(interval_ms),
                *flags,
            ),
            stdout=prot_log,
            stderr=asyncio.subprocess.STDOUT,
        )
        procs.append(prot)
        # where a --foreground protection publishes its status: the backend's state dir
        status_file = hv_a.state_dir() / f"{info.name}.json"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if _started(status_file):
                break
            await asyncio.sleep(0.05)
            if prot.returncode is not None:
                break
        else:
            prot.kill()
        if not _started(status_file):
            prot_log.flush()
            err = (base / "protect.log").read_text(errors="replace")[-600:]
            # the secondary's side of it: why it closed the link, if it did
            with contextlib.suppress(TimeoutError, ProcessLookupError):
                recv.terminate()
            peer = b""
            with contextlib.suppress(TimeoutError):
                peer = await asyncio.wait_for(recv.stdout.read(), 5)
            peer_text = peer.decode(errors="replace")[-600:].strip()
            raise RuntimeError(
                f"replication did not start: {err.strip()}\nsecondary: {peer_text or '(silent)'}"
            )
        st = ProtectionStatus.read(status_file)
        assert st is not None  # _started read it a moment ago; it is replaced, never removed
        service = st.service_address or info.address
        report.netbuf_device = st.netbuf
        say(
            f"== protected (Remus, -i {interval_ms:g} ms, network buffering "
            f"{report.netbuf_device if netbuf else 'OFF (-n -F)'}); {clients} clients "
            f"writing to {service}"
        )
        acked: dict[str, str] = {}
        stop = asyncio.Event()
        writers = [
            asyncio.create_task(_writer(service, f"c{i}", acked, stop)) for i in range(clients)
        ]
        started = time.monotonic()
        kill_at = duration * random.uniform(0.5, 1.0)
        while (elapsed := time.monotonic() - started) < kill_at:
            await asyncio.sleep(min(0.25, kill_at - elapsed))
            now = ProtectionStatus.read(status_file)
            if now is not None:
                say(
                    f"   t={elapsed:4.1f}s checkpoints={now.checkpoints} "
                    f"acked writes={len(acked)} held packets={now.held_packets}"
                )
        # the primary host dies: its protection process and its guest, at once
        last = ProtectionStatus.read(status_file)
        if last is not None:
            report.checkpoints = last.checkpoints
            report.pause_ms_p50 = last.pause_ms_p50
        gpid = int((host_a / "domains" / str(info.domid) / "guest.pid").read_text())
        killed = time.monotonic()
        prot.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(gpid, signal.SIGKILL)
        report.killed_after_s = round(killed - started, 3)
        stop.set()
        for w in writers:
            w.cancel()
        snapshot = dict(acked)
        report.writes_acknowledged = len(snapshot)
        report.write_throughput_per_s = round(len(snapshot) / (killed - started), 1)
        say(
            f"== primary killed (SIGKILL) after {report.killed_after_s} s with "
            f"{len(snapshot)} acknowledged writes"
        )
        line = b""
        while b"FAILOVER" not in line:
            line = await asyncio.wait_for(recv.stdout.readline(), 30)
            if not line:
                raise RuntimeError("the secondary exited without failing over")
        restored = hv_b.lookup(info.name)
        got = await _read_all(restored.address, list(snapshot))
        report.failover_s = round(time.monotonic() - killed, 3)
        lost = [k for k, v in snapshot.items() if got.get(k) != v]
        report.acknowledged_writes_lost = len(lost)
        report.lost_keys_sample = lost[:5]
        report.disk_journal = await _journal_stats(restored.address)
        report.disk_consistent = report.disk_journal.endswith("CONSISTENT yes")
        say(
            f"== failover: {info.name} answers on host-b at {restored.address}, "
            f"{report.failover_s} s after the kill"
        )
        return report
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            await p.wait()
        for f in logs:
            f.close()
        for hv in (hv_a, hv_b):
            for d in hv.list_domains():
                with contextlib.suppress(Exception):
                    hv.destroy(d.domid)
        tmp.cleanup()


async def _journal_stats(address: str) -> str:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"JSTATS\n")
    line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    return line.decode().strip()


def render(r: DemoReport) -> str:
    return "\n".join(
        [
            "== report",
            f"   checkpoints before the kill:  {r.checkpoints} (interval {r.interval_ms:g} ms)",
            f"   guest pause per checkpoint:   {r.pause_ms_p50} ms (median)",
            f"   acknowledged writes:          {r.writes_acknowledged} "
            f"({r.write_throughput_per_s}/s)",
            f"   failover time:                {r.failover_s} s (kill -> all keys read back)",
            f"   output buffering:             {r.netbuf_device if r.netbuf else 'off (-n -F)'}",
            f"   acknowledged writes lost:     {r.acknowledged_writes_lost}"
            + ("" if r.netbuf else "   (network buffering was OFF)"),
            f"   disk and memory consistent:   {'yes' if r.disk_consistent else 'NO'} "
            f"({r.disk_journal})",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="remusctl demo", description=__doc__)
    ap.add_argument(
        "--duration", type=float, default=6.0, help="seconds of load (kill in 2nd half)"
    )
    # an integer, as `remusctl protect -i` takes it (the spec's interval_ms)
    ap.add_argument("--interval", type=int, default=100, help="checkpoint interval, ms")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument(
        "-n",
        dest="no_netbuf",
        action="store_true",
        help="no network buffering (shows why it matters)",
    )
    ap.add_argument("--json", action="store_true")
    # `protect`'s own --netbuf, from the spec: the same choices and help
    add_arguments(ap, exclude=tuple(f.name for f in FIELDS if f.name != "netbuf"))
    args = ap.parse_args(argv)
    report = asyncio.run(
        run_demo(
            args.duration,
            args.interval,
            not args.no_netbuf,
            args.clients,
            progress=not args.json,
            netbuf_mode=args.netbuf or "auto",
        )
    )
    print(json.dumps(asdict(report), indent=2) if args.json else render(report))
    safe = report.acknowledged_writes_lost == 0 or args.no_netbuf
    return 0 if safe and report.disk_consistent else 1


if __name__ == "__main__":
    sys.exit(main())
