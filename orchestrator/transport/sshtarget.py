"""``[USER@]HOST[:PORT]``, host key fingerprints and the refusals' words: SSH without I/O.

What :mod:`.ssh` (the paramiko adapter) needs decided or worded, kept free of
paramiko so that the spec can check an ``--ssh`` setting without loading it.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

DEFAULT_PORT: Final = 22
SYSTEM_KNOWN_HOSTS: Final = Path("/etc/ssh/ssh_known_hosts")


class SshError(Exception):
    """The SSH session could not be had (address, host key, authentication, command)."""


# -- sans I/O ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SshTarget:
    """``[USER@]HOST[:PORT]``: ``user`` None means the local user name, as ssh."""

    host: str
    port: int = DEFAULT_PORT
    user: str | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        where = host if self.port == DEFAULT_PORT else f"{host}:{self.port}"
        return f"{self.user}@{where}" if self.user else where

    @property
    def known_hosts_name(self) -> str:
        """How known_hosts names this host: ``HOST``, or ``[HOST]:PORT`` off port 22."""
        return self.host if self.port == DEFAULT_PORT else f"[{self.host}]:{self.port}"


def parse_target(text: str) -> SshTarget:
    """``[USER@]HOST[:PORT]`` (an IPv6 address in brackets when a port follows, as
    ``[::1]:2222``), or ValueError saying what is wrong with ``text``."""
    what = f"{text!r} is not [USER@]HOST[:PORT]"
    if not text or not text.isascii() or any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError(f"{what}: empty, or not printable ASCII without spaces")
    user, at, where = text.rpartition("@")
    if at and not user:
        raise ValueError(f"{what}: no user name before the @")
    if user.startswith("-"):
        raise ValueError(f"{what}: a user name does not start with '-'")
    port_text = ""
    if where.startswith("["):
        host, bracket, rest = where[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{what}: a bracketed host is [ADDRESS] or [ADDRESS]:PORT")
        port_text = rest[1:] if rest else ""
        if rest and not port_text:
            raise ValueError(f"{what}: no port after the ':'")
    elif where.count(":") > 1:  # a bare IPv6 address: no port can follow it
        host = where
    else:
        host, colon, port_text = where.partition(":")
        if colon and not port_text:
            raise ValueError(f"{what}: no port after the ':'")
    if not host:
        raise ValueError(f"{what}: no host")
    if host.startswith("-"):
        raise ValueError(f"{what}: a host does not start with '-'")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{what}: {host!r} is not an IPv6 address") from None
    port = DEFAULT_PORT
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{what}: port {port_text!r} is not 1 to 65535")
        port = int(port_text)
    return SshTarget(host, port, user or None)


def fingerprint(key_blob: bytes) -> str:
    """OpenSSH's fingerprint of a public key blob: ``SHA256:`` and unpadded base64."""
    digest = base64.b64encode(hashlib.sha256(key_blob).digest()).rstrip(b"=")
    return f"SHA256:{digest.decode()}"


def unknown_key_message(
    target: SshTarget, key_type: str, key_fp: str, searched: Sequence[Path]
) -> str:
    files = ", ".join(str(p) for p in searched) or "no known_hosts file"
    scan = f"ssh-keyscan{'' if target.port == DEFAULT_PORT else f' -p {target.port}'}"
    return (
        f"ssh {target}: refusing an unknown host key: {target.host} presented {key_type} "
        f"{key_fp}, which is not in {files}. Check it on the host (ssh-keygen -lf "
        f"/etc/ssh/ssh_host_*_key.pub) before adding it to known_hosts "
        f"({scan} {target.host} prints the line)"
    )


def changed_key_message(
    target: SshTarget, key_type: str, key_fp: str, expected_type: str, expected_fp: str
) -> str:
    return (
        f"ssh {target}: refusing a changed host key: {target.host} presented {key_type} "
        f"{key_fp}, known_hosts has {expected_type} {expected_fp} for it (a reinstalled "
        "host, or somebody in the middle)"
    )
