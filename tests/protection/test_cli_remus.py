"""The Remus CLI verbs as processes: protect, receive, status, failover, unprotect."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.hypervisors.sim import SimHypervisor

from ..guestclient import kv


def remusctl(host: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "--host", str(host), *args]


def start_receiver(host: Path, port: int | None = None) -> tuple[subprocess.Popen[str], int]:
    """`remusctl receive` on ``host`` as a process, once it says it listens."""
    port = port if port is not None else 30000 + random.randrange(10000)
    recv = subprocess.Popen(
        remusctl(host, "receive", "--listen", f"127.0.0.1:{port}"),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert recv.stdout is not None
    if "receiving on" not in recv.stdout.readline():
        recv.kill()
        recv.wait()
        raise AssertionError(f"remusctl receive on {host} did not start")
    return recv, port


def status(host: Path) -> list[dict[str, object]]:
    r = subprocess.run(
        remusctl(host, "status", "--local", "--json"), capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    rows: list[dict[str, object]] = json.loads(r.stdout)
    return rows


def wait_checkpoints(host: Path, n: int, timeout: float = 30) -> dict[str, object]:
    """The primary's status row once it has made ``n`` checkpoints."""
    deadline = time.monotonic() + timeout
    rows = status(host)
    while time.monotonic() < deadline and not (rows and int(rows[0]["checkpoints"]) >= n):  # type: ignore[call-overload]
        time.sleep(0.05)
        rows = status(host)
    assert rows, f"no status on {host}"
    return rows[0]


def test_protect_status_failover_refusal_and_unprotect(
    hosts: tuple[SimHypervisor, SimHypervisor],
) -> None:
    a, b = hosts
    a.create_domain("web", memory_mib=16)
    recv, port = start_receiver(b.host)
    prot = None
    try:
        prot = subprocess.Popen(
            remusctl(
                a.host, "protect", "--foreground", "web", "--to", f"127.0.0.1:{port}", "-i", "50"
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_checkpoints(a.host, 3)
        (p,) = status(a.host)
        assert p["role"] == "primary" and p["state"] == "replicating"
        assert p["netbuf"] in ("nfqueue", "proxy") and p["pause_ms_p50"] is not None
        (s,) = status(b.host)
        assert s["role"] == "secondary" and s["state"] == "replicating"
        # the primary is alive: a failover now would run two copies
        r = subprocess.run(
            remusctl(b.host, "failover", "--local", "web"), capture_output=True, text=True
        )
        assert r.returncode == 1 and "refusing" in r.stderr
        assert subprocess.run(remusctl(a.host, "unprotect", "--local", "web")).returncode == 0
        out, _ = prot.communicate(timeout=20)
        assert prot.returncode == 0 and "unprotected" in out
        rest, _ = recv.communicate(timeout=20)
        assert "secondary copy was dropped" in rest
        assert a.lookup("web").state == "running" and b.list_domains() == []
    finally:
        for proc in (recv, prot):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_blackhole_needs_unsafe_and_checkpoints_to_nowhere(
    hosts: tuple[SimHypervisor, SimHypervisor],
) -> None:
    a, _ = hosts
    a.create_domain("web", memory_mib=16)
    r = subprocess.run(
        remusctl(a.host, "protect", "--foreground", "web", "-b"), capture_output=True, text=True
    )
    assert r.returncode == 2 and "-b requires -F" in r.stderr
    r = subprocess.run(
        remusctl(a.host, "protect", "--foreground", "web"), capture_output=True, text=True
    )
    assert r.returncode == 2 and "--to" in r.stderr
    prot = subprocess.Popen(
        remusctl(
            a.host, "protect", "--foreground", "web", "-b", "-F", "-i", "20", "--netbuf", "proxy"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        p = wait_checkpoints(a.host, 5)
        assert p["peer"] == "blackhole (-b)" and p["state"] == "replicating"
        # the initial copy of 16 MiB went into the sink, then each checkpoint's pages
        assert int(p["stream_bytes"]) > 16 << 20  # type: ignore[call-overload]
        assert p["disk"] == "not replicated"
        assert subprocess.run(remusctl(a.host, "unprotect", "--local", "web")).returncode == 0
        out, err = prot.communicate(timeout=20)
        assert prot.returncode == 0 and "unprotected" in out
        assert "nothing to fail over to" in err
        assert a.lookup("web").state == "running"
    finally:
        if prot.poll() is None:
            prot.kill()
            prot.wait()


def test_replication_over_a_command_pipe_fails_over_when_the_primary_dies(
    hosts: tuple[SimHypervisor, SimHypervisor],
) -> None:
    """`-s ""`: --to is the whole command, as xl remus runs `sh -c HOST` (ssh in real use)."""
    a, b = hosts
    info = a.create_domain("web", memory_mib=16)
    receive = " ".join(remusctl(b.host, "receive", "--stdio"))
    prot = subprocess.Popen(
        remusctl(a.host, "protect", "--foreground", "web", "-s", "", "--to", receive, "-i", "50"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        row = wait_checkpoints(a.host, 3)
        assert row["state"] == "replicating", row
        (s,) = status(b.host)
        assert s["role"] == "secondary" and s["state"] == "replicating"
        # written before the next checkpoints: they must survive the primary's death
        assert set(kv(info.address, [b"PUT k%d v%d" % (i, i) for i in range(50)])) == {b"OK"}
        wait_checkpoints(a.host, int(row["checkpoints"]) + 3)  # type: ignore[call-overload]
        # the primary host dies: the protect process and its guest
        prot.kill()
        gpid = int((a.host / "domains" / str(info.domid) / "guest.pid").read_text())
        os.killpg(gpid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            doms = b.list_domains()
            if doms and doms[0].state == "running" and doms[0].address:
                break
            time.sleep(0.1)
        restored = b.lookup("web")
        got = kv(restored.address, [b"GET k%d" % i for i in range(50)])
        assert got == [b"VALUE v%d" % i for i in range(50)]
        (s,) = status(b.host)
        assert s["state"] == "failed-over"
    finally:
        if prot.poll() is None:
            prot.kill()
        prot.wait()


def test_protect_and_failover_over_tls_lose_no_acknowledged_write(
    hosts: tuple[SimHypervisor, SimHypervisor],
) -> None:
    """The default link: mutual TLS between the two pinned hosts (the `hosts` fixture has
    run `host init` and `host trust` on each); the primary host dies under a client's
    writes, and every write it acknowledged is on the secondary."""
    a, b = hosts
    info = a.create_domain("web", memory_mib=16)
    port = 30000 + random.randrange(10000)
    recv = subprocess.Popen(
        remusctl(b.host, "receive", "--listen", f"127.0.0.1:{port}"),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert recv.stdout is not None
    assert "(tls)" in recv.stdout.readline()
    prot = subprocess.Popen(
        remusctl(
            a.host, "protect", "--foreground", "web", "--to", f"127.0.0.1:{port}", "-i", "50"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        row = wait_checkpoints(a.host, 3)
        assert row["state"] == "replicating" and row["link"] == "tls", row
        (s,) = status(b.host)
        assert s["link"] == "tls", s
        acked: list[int] = []
        for batch in range(5):  # acknowledged writes between checkpoints, up to the kill
            keys = range(batch * 20, batch * 20 + 20)
            replies = kv(info.address, [b"PUT t%d v%d" % (i, i) for i in keys])
            acked += [i for i, r in zip(keys, replies, strict=True) if r == b"OK"]
        prot.kill()
        gpid = int((a.host / "domains" / str(info.domid) / "guest.pid").read_text())
        os.killpg(gpid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            doms = b.list_domains()
            if doms and doms[0].state == "running" and doms[0].address:
                break
            time.sleep(0.1)
        restored = b.lookup("web")
        got = kv(restored.address, [b"GET t%d" % i for i in acked])
        lost = [i for i, v in zip(acked, got, strict=True) if v != b"VALUE v%d" % i]
        assert acked and not lost, f"{len(lost)} of {len(acked)} acknowledged writes lost"
        rest, _ = recv.communicate(timeout=30)
        assert "FAILOVER" in rest
    finally:
        for proc in (recv, prot):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_a_receiver_refuses_an_untrusted_primary_and_both_say_which_certificate(
    tmp_path: Path,
) -> None:
    """Two hosts with identities that never trusted each other: protect fails, naming the
    certificate the receiver refused; the receiver logs the same fingerprint and takes
    nothing."""
    from ..tlshosts import identity

    a, b = SimHypervisor(tmp_path / "hostA"), SimHypervisor(tmp_path / "hostB")
    ia, _ = identity(a), identity(b)
    identity(a).trust(str(identity(b).cert_path), "b")  # a trusts b, b does not trust a
    a.create_domain("web", memory_mib=16)
    port = 30000 + random.randrange(10000)
    recv = subprocess.Popen(
        remusctl(b.host, "receive", "--listen", f"127.0.0.1:{port}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert recv.stdout is not None and "(tls)" in recv.stdout.readline()
        r = subprocess.run(
            remusctl(a.host, "protect", "--foreground", "web", "--to", f"127.0.0.1:{port}"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode != 0
        assert ia.fingerprint in r.stderr and "refused this host's certificate" in r.stderr
        assert a.lookup("web").state == "running" and b.list_domains() == []
    finally:
        recv.kill()
        _, err = recv.communicate()
        for hv in (a, b):
            for d in hv.list_domains():
                hv.destroy(d.domid)
    assert f"presented certificate {ia.fingerprint}" in err
