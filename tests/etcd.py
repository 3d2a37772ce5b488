"""A real etcd (Debian's etcd-server) on 127.0.0.1: the witness of the lease tests."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EtcdServer:
    """One etcd member as a child process; kill() and start() again on the same data.

    ``hosts``: more addresses of this machine it serves clients on (on the same
    port as 127.0.0.1), so that each simulated host of a lab reaches it over a
    path of its own (:meth:`url_at`)."""

    def __init__(self, binary: str, data_dir: Path, hosts: Sequence[str] = ()) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.hosts = tuple(hosts)
        self.port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / "etcd.log"

    @property
    def url(self) -> str:
        return f"etcd3+http://127.0.0.1:{self.port}"

    def url_at(self, host: str) -> str:
        """The witness URL of the client address ``host`` (one of ``hosts``)."""
        if host not in self.hosts:
            raise ValueError(f"etcd serves clients on 127.0.0.1 and {self.hosts}, not {host}")
        return f"etcd3+http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        client = f"http://127.0.0.1:{self.port}"
        listen = ",".join([client, *(f"http://{h}:{self.port}" for h in self.hosts)])
        peer = f"http://127.0.0.1:{self.peer_port}"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "--name", "witness",
                    "--data-dir", str(self.data_dir),
                    "--listen-client-urls", listen,
                    "--advertise-client-urls", client,
                    "--listen-peer-urls", peer,
                    "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", f"witness={peer}",
                    # etcd raises a lease's TTL to at least 1.5 election
                    # timeouts (rounded up to whole seconds): 100 ms lets the
                    # tests use 1 s leases, as asked
                    "--heartbeat-interval", "10",
                    "--election-timeout", "100",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited {self.proc.returncode}: see {self.log}")
            try:
                # a granted lease means a leader is elected, not just a socket open
                req = urllib.request.Request(
                    client + "/v3/lease/grant", data=b'{"TTL": 5}', method="POST"
                )
                with urllib.request.urlopen(req, timeout=0.5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"etcd did not come up on {client}: see {self.log}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None
