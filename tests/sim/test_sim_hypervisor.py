"""The simulated hypervisor with real guest processes, sockets, helper and files."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from orchestrator.guest.kv import PAGE, SLOT, GuestKV
from orchestrator.hypervisors.base import NotRunning, SuspendTimeout
from orchestrator.hypervisors.sim import SimHypervisor
from orchestrator.hypervisors.simdomain import SimDomain, domain_path
from orchestrator.saverestore import SaveRestoreError, restore_domain, save_domain
from orchestrator.streams import Record, StreamDecoder
from orchestrator.streams.fileio import iter_events

XEN_VERIFY = Path("/usr/lib/xen-4.17/bin/verify-stream-v2")


class Client:
    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.f = self.sock.makefile("rwb")

    def pipeline(self, lines: list[bytes]) -> list[bytes]:
        self.f.write(b"".join(line + b"\n" for line in lines))
        self.f.flush()
        return [self.f.readline().rstrip(b"\n") for _ in lines]

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def test_10000_keys_survive_save_destroy_restore_on_another_host(
    hosts: tuple[SimHypervisor, SimHypervisor], tmp_path: Path
) -> None:
    a, b = hosts
    info = a.create_domain("web", memory_mib=32)
    c = Client(info.address)
    assert set(c.pipeline([b"PUT key%d value-%d" % (i, i * i) for i in range(10000)])) == {b"OK"}
    c.close()
    path = tmp_path / "web.xl"
    report = asyncio.run(save_domain(a, "web", path))
    assert report.bytes == path.stat().st_size
    assert a.list_domains() == []  # `xl save` destroys the domain
    restored = asyncio.run(restore_domain(b, path, "web2"))
    assert restored.name == "web2" and restored.state == "running"
    assert restored.uuid == info.uuid  # the config travels in the xl header
    c = Client(restored.address)
    got = c.pipeline([b"GET key%d" % i for i in range(10000)])
    assert got == [b"VALUE value-%d" % (i * i) for i in range(10000)]
    assert c.pipeline([b"STATS"]) == [b"KEYS 10000 GENERATION 10000"]
    c.close()
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "stream", "verify", str(path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    if XEN_VERIFY.exists():  # Xen's own verifier, xl and libxl layers
        env = dict(os.environ, PYTHONPATH="/usr/lib/xen-4.17/lib/python")
        r = subprocess.run(
            ["/usr/bin/python3", str(XEN_VERIFY), "-f", "xl", "-i", str(path)],
            env=env,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stdout + r.stderr


def test_dirty_map_marks_touched_pages_and_a_save_pass_clears_them(
    hosts: tuple[SimHypervisor, SimHypervisor], tmp_path: Path
) -> None:
    a, _ = hosts
    info = a.create_domain("d", memory_mib=16)
    dom = SimDomain(domain_path(a.host, info.domid))
    dom.dirty[:] = bytes(dom.pages)
    c = Client(info.address)
    keys = [b"k%d" % i for i in range(200)]
    assert set(c.pipeline([b"PUT " + k + b" v" for k in keys])) == {b"OK"}
    kv = GuestKV(memoryview(bytes(dom.memory)), memoryview(bytearray(dom.pages)))
    want = {0} | {(PAGE + kv._find(k)[0] * SLOT) // PAGE for k in keys}
    assert {i for i in range(dom.pages) if dom.dirty[i]} == want
    asyncio.run(save_domain(a, "d", tmp_path / "d.xl", keep_running=True))
    assert not any(dom.dirty[:])
    assert c.pipeline([b"GET k7"]) == [b"VALUE v"]  # still serving after `save -c`
    c.close()
    dom.close()


def test_suspend_of_a_busy_guest_and_refusals(hosts: tuple[SimHypervisor, SimHypervisor]) -> None:
    a, _ = hosts
    info = a.create_domain("busy", memory_mib=16, dirty_rate=20000)
    c = Client(info.address)

    async def go() -> None:
        load = asyncio.create_task(
            asyncio.to_thread(c.pipeline, [b"PUT x%d y" % i for i in range(3000)])
        )
        for _ in range(20):
            await a.suspend(info.domid, timeout=5.0)
            assert a.lookup(info.domid).shutdown_reason == "suspend"
            with pytest.raises(NotRunning, match="it is shutdown"):
                await a.suspend(info.domid, timeout=1.0)
            await a.resume(info.domid)
        assert set(await load) == {b"OK"}
        a.pause(info.domid)
        with pytest.raises(NotRunning, match="it is paused"):
            await a.suspend(info.domid, timeout=1.0)
        a.unpause(info.domid)
        await a.suspend(info.domid, timeout=5.0)
        await a.resume(info.domid)

    asyncio.run(go())
    c.close()


def test_suspend_bound_when_the_guest_does_not_answer(
    hosts: tuple[SimHypervisor, SimHypervisor],
) -> None:
    a, _ = hosts
    info = a.create_domain("stuck", memory_mib=16)
    dom = SimDomain(domain_path(a.host, info.domid))
    pid = int((dom.path / "guest.pid").read_text())
    os.killpg(pid, 19)  # SIGSTOP behind the toolstack's back: the state still says running

    async def go() -> None:
        with pytest.raises(SuspendTimeout, match="did not acknowledge the suspend request"):
            await a.suspend(info.domid, timeout=0.5)

    asyncio.run(go())
    os.killpg(pid, 18)
    dom.close()


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_bad_file_fails_with_stream_error_and_leaves_no_domain(
    hosts: tuple[SimHypervisor, SimHypervisor], tmp_path: Path, damage: str
) -> None:
    a, b = hosts
    a.create_domain("src", memory_mib=16)
    path = tmp_path / "src.xl"
    asyncio.run(save_domain(a, "src", path))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        with open(path, "rb") as f:
            at = next(
                ev.offset
                for ev in iter_events(f, StreamDecoder())
                if isinstance(ev, Record) and ev.name.startswith("PAGE_DATA")
            )
        data[at] = 0x42  # the first PAGE_DATA becomes an unknown mandatory record
    path.write_bytes(bytes(data))
    with pytest.raises(SaveRestoreError, match=r"offset \d+: libxc record") as info:
        asyncio.run(restore_domain(b, path, "dst"))
    assert str(path) in str(info.value)
    assert b.list_domains() == []


def test_restore_from_a_pipe_fails_in_the_helper_and_cleans_up(
    hosts: tuple[SimHypervisor, SimHypervisor], tmp_path: Path
) -> None:
    """No whole-file pre-check on a pipe: the helper meets the damage and the target goes."""
    a, b = hosts
    a.create_domain("src", memory_mib=16)
    path = tmp_path / "src.xl"
    asyncio.run(save_domain(a, "src", path))
    data = path.read_bytes()[:300000]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with contextlib.suppress(BrokenPipeError), open(fifo, "wb") as f:
            f.write(data)

    writer = threading.Thread(target=feed)
    writer.start()  # before the restore opens the fifo, which blocks until a writer comes
    with pytest.raises(SaveRestoreError, match="restore failed: Failed to read stream"):
        asyncio.run(restore_domain(b, fifo, "dst"))
    writer.join(10)
    assert b.list_domains() == []


def test_loopback_mode_without_network_namespaces(tmp_path: Path) -> None:
    hv = SimHypervisor(tmp_path / "h", use_netns=False)
    info = hv.create_domain("lo", memory_mib=8)
    try:
        assert info.address.startswith("127.0.0.1:")
        c = Client(info.address)
        assert c.pipeline([b"PUT a b", b"GET a"]) == [b"OK", b"VALUE b"]
        c.close()
    finally:
        hv.destroy(info.domid)


def test_cli_domain_verbs(tmp_path: Path) -> None:
    host = str(tmp_path / "cli")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "--host", host, *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    r = run("domain", "create", "vm1", "--memory", "8")
    assert r.returncode == 0 and "service at" in r.stdout
    r = run("domain", "list", "--json")
    import json

    (dom,) = json.loads(r.stdout)
    assert dom["name"] == "vm1" and dom["state"] == "running"
    assert run("domain", "create", "vm1").returncode == 1  # names are unique per host
    assert run("domain", "destroy", "vm1").returncode == 0
    r = run("domain", "destroy", "vm1")
    assert r.returncode == 1 and "no domain 'vm1'" in r.stderr
