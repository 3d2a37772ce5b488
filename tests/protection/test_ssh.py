"""`remusctl protect --ssh`: the receiver started on the peer over SSH, against a real sshd.

Host B's sshd (Debian's OpenSSH, ``tests/sshd.py``) listens on B's end of the
lab's replication link (``tests/hostlab.py``); the primary runs in A's
namespace and reaches it over that link, so every byte stays on this machine.
The sshd's sessions find ``remusctl`` on ``PATH`` (its ``SetEnv``), as on a
real host; the primary runs the same ``remusctl receive --stdio`` that ``-s``
runs.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.hypervisors.sim import SimHypervisor

from ..hostlab import HostLab, poll, wait_exit
from ..sshd import Sshd, keygen, venv_path
from ..sshd import unavailable as sshd_unavailable

PORT = 2222  # off 22: the target's :PORT and known_hosts' [ADDRESS]:PORT are exercised


@pytest.fixture
def sshd(hostlab: HostLab, tmp_path: Path) -> Iterator[Sshd]:
    why = sshd_unavailable()
    if why:
        pytest.skip(why)
    hostlab.reset()
    server = Sshd(
        tmp_path / "sshd",
        hostlab.link_address("b"),
        PORT,
        netns=hostlab.netns("b"),
        env={"PATH": venv_path(), "REMUS_SIM_HOST": str(hostlab.b.host)},
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
        hostlab.reset()


def status(lab: HostLab, host: str) -> list[dict[str, object]]:
    r = lab.run(host, "status", "--local", "--json")  # type: ignore[arg-type]
    assert r.returncode == 0, r.stderr
    rows: list[dict[str, object]] = json.loads(r.stdout)
    return rows


def checkpoints(lab: HostLab) -> int:
    rows = status(lab, "a")
    return int(rows[0]["checkpoints"]) if rows else 0  # type: ignore[call-overload]


def receivers(lab: HostLab) -> list[int]:
    """The `remusctl receive` processes running on B."""
    found = []
    for pid in lab.pids("b"):
        with contextlib.suppress(OSError):
            if b"receive" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                found.append(pid)
    return found


def target(server: Sshd) -> str:
    return f"root@{server.address}:{server.port}"


class Writer:
    """PUTs from inside A's namespace, one connection at a time; the keys whose OK
    came back (acknowledged: the protection must not lose them)."""

    def __init__(self, lab: HostLab, address: str) -> None:
        self.lab, self.address = lab, address
        self.acked: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                with self.lab.connect("a", self.address, 1.0) as s:
                    f = s.makefile("rwb")
                    while not self.stop.is_set():
                        key = f"k{i}"
                        i += 1
                        f.write(f"PUT {key} v{i}\n".encode())
                        f.flush()
                        if not f.readline().startswith(b"OK"):
                            break
                        self.acked.append(key)
            except OSError:
                time.sleep(0.05)

    def join(self) -> None:
        self.stop.set()
        self.thread.join(10)


def read_all(lab: HostLab, address: str, keys: list[str]) -> dict[str, bytes]:
    with lab.connect("b", address, 10.0) as s:
        f = s.makefile("rwb")
        f.write(b"".join(f"GET {k}\n".encode() for k in keys))
        f.flush()
        return {k: f.readline().rstrip(b"\n") for k in keys}


def running(hv: SimHypervisor, name: str) -> str | None:
    doms = [d for d in hv.list_domains() if d.name == name]
    return doms[0].address if doms and doms[0].state == "running" and doms[0].address else None


@pytest.mark.parametrize("how", ["--ssh", "-s ssh"])
def test_protect_and_failover_over_ssh_lose_no_acknowledged_write(
    hostlab: HostLab, sshd: Sshd, tmp_path: Path, how: str
) -> None:
    """``--ssh`` (paramiko), and for comparison ``-s ssh`` (OpenSSH's client, as
    xl remus): the same receiver, the same guarantees."""
    lab = hostlab
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_line())
    info = lab.a.create_domain("web", memory_mib=16)
    if how == "--ssh":
        way = ["--ssh", target(sshd), "--ssh-known-hosts", str(known),
               "--ssh-identity", str(sshd.client_key)]  # fmt: skip
    else:
        ssh = (
            f"ssh -F none -i {sshd.client_key} -o UserKnownHostsFile={known} "
            f"-o StrictHostKeyChecking=yes -o BatchMode=yes -p {sshd.port}"
        )
        way = ["-s", ssh, "--to", f"root@{sshd.address}"]
    # the primary's stderr: the remote receiver's stderr comes into it over the session
    log = tmp_path / "primary.log"
    prot = lab.popen("a", "protect", "--foreground", "web", *way, "-i", "50", log=log)
    assert poll(lambda: checkpoints(lab) >= 3, 60), log.read_text()
    (p,) = status(lab, "a")
    assert p["state"] == "replicating", p
    assert how != "--ssh" or p["peer"] == target(sshd), p
    (s,) = status(lab, "b")
    assert s["role"] == "secondary" and s["state"] == "replicating", s
    assert "Accepted publickey for root" in sshd.log_text()
    # the address clients use (the proxy's when the output goes through one)
    address = str(p.get("service_address") or info.address)
    writer = Writer(lab, address)
    try:
        start, t0 = checkpoints(lab), time.monotonic()
        assert poll(lambda: len(writer.acked) >= 200, 30), "the guest acknowledged no writes"
        assert poll(lambda: checkpoints(lab) >= start + 20, 30)
        rate = (checkpoints(lab) - start) / (time.monotonic() - t0)
        # host A dies mid-load: no FIN, no RST, its processes and guest SIGKILLed
        lab.kill_host("a")
    finally:
        writer.join()
    acked = list(writer.acked)
    print(f"{how}: {rate:.1f} checkpoints/s under load at -i 50; {len(acked)} writes acked")
    assert wait_exit(prot, 10)
    assert poll(lambda: running(lab.b, "web") is not None, 60), sshd.log_text()
    restored = running(lab.b, "web")
    assert restored is not None
    got = read_all(lab, restored, acked)
    lost = [k for k in acked if got[k] != f"VALUE v{int(k[1:]) + 1}".encode()]
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged writes lost: {lost[:5]}"
    (s,) = status(lab, "b")
    assert s["state"] == "failed-over", s


def test_an_unknown_or_changed_host_key_is_refused_naming_host_and_fingerprint(
    hostlab: HostLab, sshd: Sshd, tmp_path: Path
) -> None:
    lab = hostlab
    lab.a.create_domain("web", memory_mib=8)
    empty = tmp_path / "known_hosts.empty"
    empty.write_text("")
    other = tmp_path / "known_hosts.other"
    other.write_text(sshd.known_hosts_line(keygen(tmp_path / "not_the_host_key")))
    fp = sshd.host_fingerprint
    for known, words in ((empty, "unknown host key"), (other, "changed host key")):
        r = lab.run(
            "a", "protect", "--foreground", "web", "--ssh", target(sshd),
            "--ssh-known-hosts", str(known), "--ssh-identity", str(sshd.client_key),
            timeout=60,
        )  # fmt: skip
        assert r.returncode == 1, (r.returncode, r.stderr)
        assert words in r.stderr and sshd.address in r.stderr and fp in r.stderr, r.stderr
        assert str(known) in r.stderr or words == "changed host key", r.stderr
    # refused before authenticating: nothing logged in, nothing started on B
    assert "Accepted" not in sshd.log_text()
    assert lab.b.list_domains() == [] and status(lab, "b") == []
    assert lab.a.lookup("web").state == "running"


def test_unprotect_over_ssh_ends_both_sides_and_the_session(
    hostlab: HostLab, sshd: Sshd, tmp_path: Path
) -> None:
    lab = hostlab
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_line())
    lab.a.create_domain("web", memory_mib=8)
    log = tmp_path / "primary.log"
    prot = lab.popen(
        "a", "protect", "--foreground", "web", "--ssh", target(sshd),
        "--ssh-known-hosts", str(known), "--ssh-identity", str(sshd.client_key),
        "-i", "50", log=log,
    )  # fmt: skip
    assert poll(lambda: checkpoints(lab) >= 3, 60), log.read_text()
    assert lab.run("a", "unprotect", "--local", "web").returncode == 0
    assert wait_exit(prot, 20) and prot.returncode == 0, log.read_text()
    out = log.read_text()
    assert "unprotected" in out, out
    # the receiver dropped its copy (its words came back over the session's stderr)
    # and exited: nothing but sshd is left on B
    assert "the secondary copy was dropped" in out, out
    assert poll(lambda: not receivers(lab), 10), receivers(lab)
    assert lab.b.list_domains() == [] and lab.a.lookup("web").state == "running"
    assert "exited with status" not in out, out
