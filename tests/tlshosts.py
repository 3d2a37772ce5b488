"""Simulated hosts that trust each other, as an admin sets them up: `remusctl host init` on
each, then `remusctl host trust` of the other's certificate (done here in-process)."""

from __future__ import annotations

from pathlib import Path

from orchestrator.hypervisors.base import Hypervisor
from orchestrator.transport.tls import Identity


def identity(host: Hypervisor | Path) -> Identity:
    """A simulated host's identity, made if it has none (``host init`` is idempotent)."""
    d = host.tls_dir() if isinstance(host, Hypervisor) else Path(host) / "tls"
    ident = Identity(d)
    ident.init(d.parent.name or "host")
    return ident


def trust_each_other(*hosts: Hypervisor | Path) -> None:
    idents = [identity(h) for h in hosts]
    for i, me in enumerate(idents):
        for j, peer in enumerate(idents):
            if i != j:
                me.trust(str(peer.cert_path), f"peer{j}")
