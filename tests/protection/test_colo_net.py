"""COLO's network half end to end, with real packets: client input mirrored into the
secondary guest's namespace, both guests' TCP output compared, checkpoints only on
divergence (or the timer), and the client sees only the primary's replies.

Root only: the guests live in network namespaces, output is held with NFQUEUE
and the mirror is an AF_PACKET tap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from orchestrator.devices.netbuf_nfqueue import nfqueue_available
from orchestrator.hypervisors.sim import SimHypervisor, have_netns
from orchestrator.protection.colo import ColoPrimary, ColoSecondary
from orchestrator.protection.spec import ProtectionSpec

from .test_cli_remus import remusctl, start_receiver
from .test_colo import SETTINGS as COLO_SETTINGS
from .test_remus_loop import pair, wait_for

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not have_netns() or nfqueue_available() is not None,
    reason="COLO's network half needs root, network namespaces (iproute2) and NFQUEUE "
    f"({nfqueue_available() or 'root and ip'})",
)

# test_colo's, with checkpoints only when the copies diverge (or after 30 s)
SETTINGS = COLO_SETTINGS.with_(checkpoint_max_interval_ms=30_000, compare_timeout_ms=100)


async def session(address: str, lines: list[bytes]) -> list[bytes]:
    """One persistent connection, one request at a time (a client that waits)."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    out = []
    for line in lines:
        writer.write(line + b"\n")
        await writer.drain()
        out.append((await asyncio.wait_for(reader.readline(), 10)).rstrip(b"\n"))
    writer.close()
    return out


async def colo(
    a: SimHypervisor, b: SimHypervisor, name: str, settings: ProtectionSpec
) -> tuple[ColoPrimary, ColoSecondary, asyncio.Task[object], asyncio.Task[object]]:
    s_p, s_s = socket.socketpair()
    c_p, c_s = await pair()
    info = a.lookup(name)
    primary = ColoPrimary(a, info, s_p, c_p, settings)
    secondary = ColoSecondary(b, s_s, c_s, settings, name=name)
    p_task: asyncio.Task[object] = asyncio.create_task(primary.run())
    s_task: asyncio.Task[object] = asyncio.create_task(secondary.run())
    await wait_for(lambda: primary.figures.checkpoints >= 1)
    return primary, secondary, p_task, s_task


async def stop(
    primary: ColoPrimary, p_task: asyncio.Task[object], s_task: asyncio.Task[object]
) -> None:
    if primary.session is not None:
        await primary.session.abort()
    await asyncio.wait_for(asyncio.gather(p_task, s_task, return_exceptions=True), 30)


def test_deterministic_workload_needs_no_checkpoint_and_replies_at_once(
    hosts: tuple[SimHypervisor, SimHypervisor],
) -> None:
    a, b = hosts
    info = a.create_domain("web", memory_mib=16)

    async def go() -> None:
        primary, secondary, p_task, s_task = await colo(a, b, "web", SETTINGS)
        clients = [
            session(info.address, [f"PUT c{c}-k{i} v{i}".encode() for i in range(60)])
            for c in range(4)
        ]
        replies = await asyncio.gather(*clients)
        assert all(r == [b"OK"] * 60 for r in replies)
        # GETs of keys written on other connections: the same answers from both
        got = await session(info.address, [f"GET c{c}-k59".encode() for c in range(4)])
        assert got == [b"VALUE v59"] * 4
        net = primary.net
        assert net is not None
        fig = net.figures()
        st, cf = primary.figures, primary.colo
        print(f"\ndeterministic: {fig}, checkpoints {st.checkpoints}")
        assert st.checkpoints == 1, "a deterministic workload needed a checkpoint"
        assert cf.checkpoints_by_divergence == 0 and cf.checkpoints_by_held_output == 0
        assert fig["mismatches"] == 0
        assert fig["compared_packets"] >= 244 and fig["matched_bytes"] >= 244 * 3
        assert fig["mirrored_packets"] > 0
        assert secondary.net is not None and secondary.net.figures()["reported_bytes"] > 0
        await stop(primary, p_task, s_task)

    asyncio.run(go())


def _tokens(hv: SimHypervisor, name: str) -> set[str]:
    path = Path(hv.host) / "domains" / str(hv.lookup(name).domid) / "tokens"
    return set(path.read_text().split()) if path.exists() else set()


def test_nondeterministic_replies_cause_checkpoints_and_clients_see_only_the_primary(
    hosts: tuple[SimHypervisor, SimHypervisor],
) -> None:
    a, b = hosts
    info = a.create_domain("web", memory_mib=16, nondeterministic=4)

    async def go() -> None:
        primary, _secondary, p_task, s_task = await colo(a, b, "web", SETTINGS)
        replies = await asyncio.gather(
            *(
                session(info.address, [f"PUT n{c}-{i} x".encode() for i in range(40)])
                for c in range(3)
            )
        )
        seen = {r.split()[1].decode() for rs in replies for r in rs if r != b"OK"}
        assert all(r.startswith(b"OK") for rs in replies for r in rs)
        st, cf = primary.figures, primary.colo
        print(
            f"\nnondeterministic 1/4: {st.checkpoints} checkpoints "
            f"({cf.checkpoints_by_divergence} divergence, {cf.checkpoints_by_held_output} "
            f"held), {len(seen)} tokens seen"
        )
        assert (cf.checkpoints_by_divergence or 0) >= 1, "divergent replies caused no checkpoint"
        assert cf.memory_verified == st.checkpoints
        mine, theirs = _tokens(a, "web"), _tokens(b, "web")
        assert seen, "no nondeterministic reply in 120"
        assert seen <= mine, "a client saw a token the primary never produced"
        assert not seen & theirs, "the secondary's output reached a client"
        assert theirs, "the secondary copy produced no token at all: it was not running"
        await stop(primary, p_task, s_task)

    asyncio.run(go())


class Writers:
    """Clients writing keys over persistent connections; a key counts as
    acknowledged only once its OK came back."""

    def __init__(self, address: str, n: int) -> None:
        self.address, self.acked, self.stop = address, set[str](), threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(c,)) for c in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, c: int) -> None:
        host, port = self.address.rsplit(":", 1)
        i = 0
        while not self.stop.is_set():
            try:
                with socket.create_connection((host, int(port)), timeout=1) as s:
                    f = s.makefile("rwb")
                    while not self.stop.is_set():
                        key = f"w{c}-{i}"
                        i += 1
                        f.write(f"PUT {key} {i}\n".encode())
                        f.flush()
                        if f.readline().startswith(b"OK"):
                            self.acked.add(key)
                        else:
                            break
            except OSError:
                time.sleep(0.05)

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


RUNS = int(os.environ.get("COLO_KILL_RUNS", "50"))


def _wait_first_checkpoint(host: Path, name: str, timeout: float = 30) -> None:
    """The primary's status file (read directly: a `remusctl status` process per
    poll would cost more than a run's checkpoints)."""
    path = host / "remus" / f"{name}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if int(json.loads(path.read_text()).get("checkpoints") or 0) >= 1:
                return
        time.sleep(0.02)
    raise TimeoutError(f"no first checkpoint of {name} in {timeout} s")


@pytest.mark.timeout(1500)
def test_kill_the_primary_at_a_random_moment_no_acknowledged_write_lost(
    hosts: tuple[SimHypervisor, SimHypervisor], tmp_path: Path
) -> None:
    """RUNS times: `remusctl protect --colo` and `remusctl receive` as processes,
    clients writing, the primary host killed at a random moment (protect process
    SIGKILLed, its guest destroyed), failover, every acknowledged key read back
    from the secondary copy, which was running all along."""
    a, b = hosts
    rng = random.Random(int(os.environ.get("COLO_KILL_SEED", "9")))
    lost_total, acked_total, failovers = 0, 0, []
    for run in range(RUNS):
        info = a.create_domain(f"vm{run}", memory_mib=8, nondeterministic=rng.choice([0, 0, 8]))
        recv, port = start_receiver(b.host, 30000 + rng.randrange(20000))
        prot = None
        try:
            prot = subprocess.Popen(
                remusctl(
                    a.host,
                    "protect",
                    "--foreground",
                    "--colo",
                    info.name,
                    "-d",
                    "-F",
                    "--to",
                    f"127.0.0.1:{port}",
                    "--checkpoint-max-interval",
                    "500",
                ),
                stderr=subprocess.DEVNULL,
            )
            _wait_first_checkpoint(a.host, info.name)
            writers = Writers(info.address, 3)
            time.sleep(rng.uniform(0.05, 1.2))
            t0 = time.monotonic()
            prot.kill()  # the primary host dies: protect, then its guest
            prot.wait()
            a.destroy(info.domid)
            out, _ = recv.communicate(timeout=30)
            failovers.append(time.monotonic() - t0)
            writers.join()
            assert recv.returncode == 0 and "FAILOVER" in out, out
            svm = b.lookup(info.name)
            acked = sorted(writers.acked)
            got = _read_all(svm.address, acked)
            lost = [k for k, v in zip(acked, got, strict=True) if not v.startswith(b"VALUE")]
            lost_total += len(lost)
            acked_total += len(acked)
            assert not lost, f"run {run}: acknowledged writes lost: {lost[:5]}"
        finally:
            for p in (prot, recv):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()
            for hv in (a, b):
                for d in hv.list_domains():
                    hv.destroy(d.domid)
            for f in (Path(a.host) / "remus").glob("*.json"):
                f.unlink()
    failovers.sort()
    print(
        f"\nCOLO kill x{RUNS}: acknowledged {acked_total}, lost {lost_total}; failover "
        f"median {failovers[len(failovers) // 2] * 1e3:.0f} ms, max {failovers[-1] * 1e3:.0f} ms"
    )
    assert acked_total > RUNS, "too few writes were acknowledged to mean anything"


def _read_all(address: str, keys: list[str]) -> list[bytes]:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        f = s.makefile("rwb")
        f.write(b"".join(f"GET {k}\n".encode() for k in keys))
        f.flush()
        return [f.readline().rstrip(b"\n") for _ in keys]


def test_forced_failover_lets_the_secondary_copy_out(
    hosts: tuple[SimHypervisor, SimHypervisor],
) -> None:
    """`remusctl failover --force` on the secondary (what SIGUSR1 does to a worker):
    the copy that ran all along keeps its state, its output filter goes, and it
    answers; the primary hears the stream break and serves on alone."""
    a, b = hosts
    info = a.create_domain("web", memory_mib=16)

    async def go() -> None:
        _primary, secondary, p_task, s_task = await colo(a, b, "web", SETTINGS)
        assert await session(info.address, [b"PUT kept yes"]) == [b"OK"]
        secondary.force_failover()
        out = await asyncio.wait_for(s_task, 20)
        assert secondary.figures.state == "failed-over"
        assert "forced" in secondary.figures.reason
        assert await session(out.address, [b"GET kept"]) == [b"VALUE yes"]
        assert secondary.net is not None and not secondary.net.filtering
        status = await asyncio.wait_for(p_task, 30)
        assert status.state == "unprotected" and a.lookup("web").state == "running"
        assert await session(info.address, [b"GET kept"]) == [b"VALUE yes"]

    asyncio.run(go())
