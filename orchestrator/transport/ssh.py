"""Both channels over an SSH session: ``remusctl protect NAME --ssh [USER@]HOST[:PORT]``.

Why
---
``xl remus HOST`` reaches the backup host with ``ssh HOST xl migrate-receive``;
``-s CMD`` (:mod:`.stdio`) does the same with any command. ``--ssh`` does it
in this process with paramiko instead of an ``ssh`` binary: remusd's workers
can use it too (they have no terminal, so nothing may ever stop to ask about
a host key), the host key policy is decided here rather than by whatever
``~/.ssh/config`` says, and a failure comes back as one error in our words.

The session runs the command ``-s`` runs, ``remusctl receive --stdio`` with
the receiver's options (``protection/remote.py`` builds it), found on the
peer's ``PATH`` as an administrator's own ``ssh HOST remusctl ...`` finds it.
The session's channel carries :mod:`.stdio`'s multiplexed frames, so the
secondary's side is the ``--stdio`` one unchanged, and so are the notes there
on head-of-line blocking: the secondary must judge the primary alive by
``last_input``, not by heartbeats alone. There is no TLS on top: SSH already
authenticates both ends and encrypts.

Host keys
---------
Checked against known_hosts: the user's ``~/.ssh/known_hosts``, the system's
``/etc/ssh/ssh_known_hosts`` and a file given (``--ssh-known-hosts``). A key
found nowhere is refused (:class:`_RefuseUnknown`, a ``RejectPolicy``; never
``AutoAddPolicy``: the first connection is exactly when a man in the middle
would be believed), and so is a key that differs from the one recorded. Both
errors name the host and the fingerprint it presented, in OpenSSH's
``SHA256:`` form, so that an administrator can compare it with
``ssh-keygen -lf`` on the peer before adding it.

Authentication is by key: the SSH agent, ``~/.ssh/id_*``, or an identity file
given (``--ssh-identity``). Never a password: nobody is there to type it.

The parts without I/O (the target's syntax, fingerprints, the known_hosts
name, the refusals' wording) are in :mod:`.sshtarget`, which imports no
paramiko: the spec checks ``--ssh`` with it, and ``remusctl`` does not pay
for loading paramiko and cryptography on every command. This module is the
thin adapter around paramiko: :func:`open_ssh` and :class:`SshLink`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Final, NoReturn

import paramiko

from .controlio import Control
from .sshtarget import (
    SYSTEM_KNOWN_HOSTS,
    SshError,
    SshTarget,
    changed_key_message,
    fingerprint,
    unknown_key_message,
)
from .stdio import PIPE_READ, Buffer, PrimaryLink, _socketpair

CONNECT_TIMEOUT: Final = 10.0
STDERR_TAIL: Final = 2048  # bytes of the remote's stderr kept for an error message


class _RefuseUnknown(paramiko.RejectPolicy):
    """paramiko's RejectPolicy, with an error that names the host and the key."""

    def __init__(self, target: SshTarget, searched: Sequence[Path]) -> None:
        self.target, self.searched = target, list(searched)

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> NoReturn:
        raise SshError(
            unknown_key_message(
                self.target, key.get_name(), fingerprint(key.asbytes()), self.searched
            )
        )


def _known_hosts(client: paramiko.SSHClient, known_hosts: str | None) -> list[Path]:
    """Load every known_hosts file there is into ``client``; the files read."""
    searched: list[Path] = []
    user = Path("~/.ssh/known_hosts").expanduser()
    for path in (user, SYSTEM_KNOWN_HOSTS):
        if path.is_file():
            try:
                client.load_system_host_keys(str(path))
            except (OSError, paramiko.SSHException) as exc:
                raise SshError(f"known_hosts {path}: {exc}") from None
            searched.append(path)
    if known_hosts:
        path = Path(known_hosts)
        try:
            client.load_system_host_keys(str(path))
        except (OSError, paramiko.SSHException) as exc:
            raise SshError(f"known_hosts {path}: {exc}") from None
        searched.append(path)
    return searched


def _connect(
    target: SshTarget, known_hosts: str | None, identity: str | None, timeout: float
) -> paramiko.SSHClient:
    """A client authenticated to ``target`` whose host key was found in known_hosts."""
    client = paramiko.SSHClient()
    try:
        searched = _known_hosts(client, known_hosts)
        client.set_missing_host_key_policy(_RefuseUnknown(target, searched))
        try:
            sock = socket.create_connection((target.host, target.port), timeout)
        except OSError as exc:
            raise SshError(f"ssh {target}: {exc}") from None
        # the control frames are small and latency-bound (HEARTBEAT, ACK)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            client.connect(
                target.host,
                target.port,
                username=target.user,
                key_filename=identity or None,
                allow_agent=True,
                look_for_keys=True,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
                sock=sock,
            )
        except paramiko.BadHostKeyException as exc:
            got, want = exc.key, exc.expected_key
            raise SshError(
                changed_key_message(
                    target,
                    got.get_name(),
                    fingerprint(got.asbytes()),
                    want.get_name(),
                    fingerprint(want.asbytes()),
                )
            ) from None
        except paramiko.AuthenticationException as exc:
            how = f"the key {identity}" if identity else "the agent's keys or ~/.ssh/id_*"
            raise SshError(f"ssh {target}: authentication with {how} failed: {exc}") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SshError(f"ssh {target}: {exc or type(exc).__name__}") from None
    except BaseException:
        client.close()
        raise
    return client


class SshLink(PrimaryLink):
    """The primary's end of an SSH session that runs the receiver: pumps, the channel.

    Built by :func:`open_ssh`. The remote's stderr goes to ours (as ``-s``'s
    command's does), and its last bytes into the error when the session ends
    badly, so that "remusctl: command not found" reaches whoever reads it.
    """

    def __init__(
        self,
        target: SshTarget,
        client: paramiko.SSHClient,
        channel: paramiko.Channel,
        s_pump: socket.socket,
        c_pump: socket.socket,
    ) -> None:
        self.target, self._client, self._channel = target, client, channel
        super().__init__(s_pump, c_pump)
        self.OUT = self.IN = f"ssh {target}"
        self.PEER = f"the receiver over ssh {target}"
        self.CLOSED = f"the receiver over ssh {target} closed its stdout"
        self.returncode: int | None = None
        """The remote command's exit status once known (-1: the session ended without one)."""
        self._exited = threading.Event()
        self._stderr_tail = b""
        self._cleanup.append(client.close)

    def _start(self) -> None:
        self._start_pumps()
        self._spawn("stderr", self._stderr)
        self._spawn("wait", self._wait)

    def _send(self, data: Buffer) -> None:
        self._channel.sendall(data)  # type: ignore[arg-type]  # a memoryview goes as is

    def _recv(self) -> bytes:
        return self._channel.recv(PIPE_READ)

    def _end_output(self) -> None:
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            self._channel.shutdown_write()  # EOF on the remote's stdin

    def close(self, grace: float = 3.0) -> None:
        """End both channels, give the remote ``grace`` seconds to exit on the EOF,
        then close the session (sshd hangs up on the command). Does not block."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._shutdown(self._s_pump, socket.SHUT_RDWR)
        self._shutdown(self._c_pump, socket.SHUT_RDWR)
        threading.Thread(target=self._reap, args=(grace,), name="ssh-reap", daemon=True).start()

    def _reap(self, grace: float) -> None:
        if not self._exited.wait(grace):
            self._channel.close()
        if not self._exited.wait(grace):
            self._client.close()

    def _stderr(self) -> None:
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            # drained whatever happens: unread, it would hold the channel's window shut
            while data := self._channel.recv_stderr(PIPE_READ):
                self._stderr_tail = (self._stderr_tail + data)[-STDERR_TAIL:]
                with contextlib.suppress(OSError):
                    os.write(2, data)

    def _wait(self) -> None:
        rc = self._channel.recv_exit_status()  # -1 when the session closes without one
        self.returncode = rc
        self._exited.set()
        if rc == 0:  # let the last of its output in before calling the end unclean
            self._threads["down"].join(1.0)
        if rc == 0 and self._clean:
            self._fail(None)
            return
        self._threads["stderr"].join(1.0)
        said = self._stderr_tail.decode(errors="replace").strip().splitlines()
        last = f": {said[-1]}" if said else ""
        what = (
            "the session ended without an exit status"
            if rc == -1
            else f"the receiver exited with status {rc}"
        )
        self._fail(f"ssh {self.target}: {what}{last}")


async def open_ssh(
    target: SshTarget,
    command: str,
    *,
    known_hosts: str | None = None,
    identity: str | None = None,
    timeout: float = CONNECT_TIMEOUT,
) -> tuple[socket.socket, Control, SshLink]:
    """Run ``command`` on ``target`` over SSH and carry the stream and control
    channels over the session, as :func:`.stdio.open_command` does over a pipe.

    Returns the stream socket (blocking; the save helper writes into its fd),
    the :class:`Control` and the link. Raises :class:`SshError` before anything
    was sent if the host key is unknown or changed, authentication fails, or the
    command cannot be started.
    """

    def start() -> tuple[paramiko.SSHClient, paramiko.Channel]:
        client = _connect(target, known_hosts, identity, timeout)
        try:
            transport = client.get_transport()
            if transport is None:
                raise SshError(f"ssh {target}: the session closed after authentication")
            channel = transport.open_session(timeout=timeout)
            channel.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            client.close()
            raise SshError(f"ssh {target}: cannot run {command!r}: {exc}") from None
        except BaseException:
            client.close()
            raise
        return client, channel

    # paramiko blocks: the handshake in a thread, so that the loop (the lease's
    # renewals among others) goes on meanwhile
    client, channel = await asyncio.to_thread(start)
    stream, s_pump = _socketpair()
    c_user, c_pump = _socketpair()
    link = SshLink(target, client, channel, s_pump, c_pump)
    link._start()
    reader, writer = await asyncio.open_connection(sock=c_user)
    return stream, Control(reader, writer), link
