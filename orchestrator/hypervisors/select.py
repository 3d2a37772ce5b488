"""Which backend a command drives: Xen where this is a Xen dom0, else the simulation."""

from __future__ import annotations

import os
from pathlib import Path

from .base import Hypervisor, HypervisorError

BACKENDS = ("auto", "xen", "sim")


def xen_missing() -> str | None:
    """Why the Xen backend cannot run here, or None."""
    from .xen import available

    return available()


def open_hypervisor(backend: str | None = None, sim_host: Path | None = None) -> Hypervisor:
    """``auto`` (the default, or $REMUS_BACKEND): Xen when /dev/xen/privcmd and
    xenstore are there, else the simulated hypervisor (the embedded default)."""
    backend = backend or os.environ.get("REMUS_BACKEND") or "auto"
    if backend not in BACKENDS:
        raise HypervisorError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    if backend == "auto":
        backend = "xen" if xen_missing() is None else "sim"
    if backend == "xen":
        why = xen_missing()
        if why is not None:
            raise HypervisorError(f"the Xen backend cannot run here: {why}")
        from .xen import XenHypervisor

        return XenHypervisor()
    from .sim import SimHypervisor

    return SimHypervisor(sim_host)
