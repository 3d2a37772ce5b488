"""A real OpenSSH server for tests: Debian's ``/usr/sbin/sshd`` in a network namespace.

It has a host key of its own and lets in root with one temporary key pair (both
made here with ``ssh-keygen``); nothing of the machine's own ssh set-up is read
or changed (``-f`` names our config, every path in it is under ``workdir``). The
sessions' environment is set with ``SetEnv``: ``PATH`` with the virtualenv's
``bin`` first, as an administrator puts ``remusctl`` on a host's ``PATH``, and
``REMUS_SIM_HOST`` (which simulated host the peer's ``remusctl`` acts on).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

SSHD = Path("/usr/sbin/sshd")
KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"


def unavailable() -> str | None:
    """None if an sshd can be run here, else what is missing."""
    if not SSHD.exists():
        return "no /usr/sbin/sshd: apt-get install openssh-server (Debian's)"
    if not Path(KEYGEN).exists():
        return "no ssh-keygen: apt-get install openssh-client"
    if os.geteuid() != 0:
        return "sshd's privilege separation needs root"
    return None


def keygen(path: Path) -> Path:
    """A new ed25519 key pair without passphrase at ``path`` (and ``path``.pub)."""
    subprocess.run(
        [KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "remus-test", "-f", str(path)], check=True
    )
    return path


def key_fingerprint(pub: Path) -> str:
    """``ssh-keygen -lf``'s SHA256 fingerprint of a public key file."""
    out = subprocess.run([KEYGEN, "-lf", str(pub)], capture_output=True, text=True, check=True)
    return out.stdout.split()[1]


class Sshd:
    """``sshd -D -e`` on ``address``:``port``, inside ``netns`` (None: this one)."""

    def __init__(
        self,
        workdir: Path,
        address: str,
        port: int,
        netns: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir, self.address, self.port, self.netns = workdir, address, port, netns
        self.env = env or {}
        workdir.mkdir(parents=True, exist_ok=True)
        self.host_key = keygen(workdir / "ssh_host_ed25519_key")
        self.client_key = keygen(workdir / "id_ed25519")
        self.authorized_keys = workdir / "authorized_keys"
        self.authorized_keys.write_text(Path(f"{self.client_key}.pub").read_text())
        self.log = workdir / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def host_fingerprint(self) -> str:
        return key_fingerprint(Path(f"{self.host_key}.pub"))

    def known_hosts_line(self, key: Path | None = None) -> str:
        """The known_hosts line naming this server (``[ADDRESS]:PORT``) with its host
        key, or with ``key``'s public half (a host key that is not this one)."""
        kind, blob = Path(f"{key or self.host_key}.pub").read_text().split()[:2]
        return f"[{self.address}]:{self.port} {kind} {blob}\n"

    def config(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        return "\n".join(
            [
                f"ListenAddress {self.address}",
                f"Port {self.port}",
                f"HostKey {self.host_key}",
                f"AuthorizedKeysFile {self.authorized_keys}",
                "PidFile none",
                # our files live under pytest's tmp (its parents are world-writable /tmp)
                "StrictModes no",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "PrintMotd no",
                *([f"SetEnv {env}"] if env else []),
                "",
            ]
        )

    def start(self, timeout: float = 10.0) -> None:
        cfg = self.workdir / "sshd_config"
        cfg.write_text(self.config())
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege separation dir
        argv = [str(SSHD), "-D", "-e", "-f", str(cfg)]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        self._log = open(self.log, "ab")  # noqa: SIM115 (closed by stop)
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while "Server listening" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd did not start: {self.log.read_text(errors='replace')}")
            time.sleep(0.05)

    def stop(self) -> None:
        """sshd (each session's processes have a session of their own: the lab's
        reset kills what is left in its namespace)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def venv_path() -> str:
    """``PATH`` for the peer's sessions: this interpreter's bin (where ``remusctl``
    is) first, then the system's."""
    system = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return f"{Path(sys.executable).parent}:{system}"
