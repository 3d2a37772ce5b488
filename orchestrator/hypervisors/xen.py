"""The Xen 4.17 backend: a dom0 with xenstored, privcmd and xen-utils-4.17.

* xenstore through ``pyxs`` (xenstored's unix socket, or /dev/xen/xenbus):
  the PV suspend request and the guest's acknowledgement;
* libxenctrl through ctypes (:mod:`.xenctrl`): domain info, pause, unpause,
  fast resume;
* domain configuration as libxl JSON from ``xl list -l`` (what an xl savefile
  header carries), and ``xl destroy`` so libxl tears the devices down;
* inventory (domain list, names, states) from libxenctrl and xenstore; this
  backend does not use libvirt (remusd reports whether libvirt's libxl driver
  answers, nothing more);
* Xen's real ``libxl-save-helper`` for the primary; the secondary restores
  through ``xl migrate-receive -r`` (:mod:`~orchestrator.protection.xen_receiver`),
  so :meth:`create_restore_target` is deliberately not ours to do
  (``Capability.TOOLSTACK_RESTORE``).

Not done: the guest's suspend event channel (``device/suspend/event-channel``;
Linux PV guests do not offer one, and evtchn through ctypes is not written), and
the device model's log-dirty switch for HVM guests (QMP), which refuses loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import shutil
import subprocess
import time
from typing import Any, Final

from .base import (
    Capability,
    DomainInfo,
    DomainNotFound,
    HostMemory,
    Hypervisor,
    HypervisorError,
    NotRunning,
    SuspendTimeout,
)
from .xenctrl import XC_PAGE_SIZE, XcDomainInfo, XenCtrl

XENSTORED_SOCKET: Final = "/run/xenstored/socket"
XENBUS: Final = "/dev/xen/xenbus"
PRIVCMD: Final = "/dev/xen/privcmd"


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def control_shutdown_path(domid: int) -> str:
    """Where the toolstack asks a PV guest to suspend (``suspend``) and it acknowledges ("")."""
    return f"{domain_path(domid)}/control/shutdown"


def suspend_evtchn_path(domid: int) -> str:
    return f"{domain_path(domid)}/device/suspend/event-channel"


def vif_backend_path(domid: int, devid: int = 0) -> str:
    return f"/local/domain/0/backend/vif/{domid}/{devid}"


def available() -> str | None:
    """None when this is a Xen dom0 we can drive, else why not."""
    if not os.path.exists(PRIVCMD):
        return f"{PRIVCMD} is missing: not a Xen dom0 (or privcmd is not loaded)"
    if not (os.path.exists(XENSTORED_SOCKET) or os.path.exists(XENBUS)):
        return "no xenstore (xenstored not running)"
    if shutil.which("xl") is None:
        return "xl is not installed (xen-utils-4.17)"
    return None


def save_helper_path() -> str:
    """Xen's libxl-save-helper, 4.17's first."""
    found = sorted(glob.glob("/usr/lib/xen-*/bin/libxl-save-helper"))
    for path in found:
        if "/xen-4.17/" in path:
            return path
    return found[-1] if found else "/usr/lib/xen-4.17/bin/libxl-save-helper"


class XlListError(HypervisorError):
    pass


def parse_xl_list_long(text: str) -> dict[int, dict[str, Any]]:
    """``xl list -l [domid]``: a JSON list of {"domid": N, "config": {libxl config}}."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise XlListError(f"xl list -l printed no JSON: {exc} (at byte {exc.pos})") from None
    if isinstance(doc, dict):  # one domain
        doc = [doc]
    if not isinstance(doc, list):
        raise XlListError(f"xl list -l printed a JSON {type(doc).__name__}, not a list")
    out: dict[int, dict[str, Any]] = {}
    for i, entry in enumerate(doc):
        if not isinstance(entry, dict) or "domid" not in entry or "config" not in entry:
            raise XlListError(f"xl list -l entry {i} has no domid and config")
        if not isinstance(entry["config"], dict):
            raise XlListError(f"xl list -l entry {i}: config is not an object")
        out[int(entry["domid"])] = entry["config"]
    return out


def domain_type_of(config: dict[str, Any]) -> str:
    """libxl's c_info.type: "pv", "pvh" or "hvm" (libxl spells PV "pv")."""
    t = str(config.get("c_info", {}).get("type", "")).lower()
    if t not in ("pv", "pvh", "hvm"):
        raise XlListError(f"unknown domain type {t!r} in c_info")
    return t


def memory_bytes_of(config: dict[str, Any]) -> int:
    b_info = config.get("b_info", {})
    kb = b_info.get("max_memkb") or b_info.get("target_memkb") or 0
    return int(kb) * 1024


class XenHypervisor(Hypervisor):
    name = "xen"
    # no DISK_REPLICATION (Xen's Remus needs DRBD or blktap), no MEMORY_ACCESS, no
    # COLO (Xen ships COLO for HVM guests only), and no GUEST_NETWORK: vif_name
    # finds a domain's vif when it has one, but its addresses are the guest's own
    capabilities = frozenset({Capability.FENCE, Capability.TOOLSTACK_RESTORE})

    def __init__(self, xl: str = "xl") -> None:
        why = available()
        if why is not None:
            raise HypervisorError(f"the Xen backend cannot run here: {why}")
        self.xl = xl
        self.xc = XenCtrl()
        self._xs: Any = None

    # -- xenstore -------------------------------------------------------------

    def _xenstore(self) -> Any:
        if self._xs is None:
            from pyxs import Client  # type: ignore[import-untyped]

            if os.path.exists(XENSTORED_SOCKET):
                client = Client(unix_socket_path=XENSTORED_SOCKET)
            else:
                client = Client(xen_bus_path=XENBUS)
            client.connect()
            self._xs = client
        return self._xs

    def xs_read(self, path: str) -> str | None:
        try:
            value = self._xenstore().read(path.encode())
        except Exception as exc:  # pyxs raises PyXSError(errno) for ENOENT and the like
            if (
                "ENOENT" in repr(exc)
                or "No such file" in str(exc)
                or getattr(exc, "args", [None])[0] == 2
            ):
                return None
            raise HypervisorError(f"xenstore read {path}: {exc}") from exc
        return bytes(value).decode()

    def xs_write(self, path: str, value: str) -> None:
        try:
            self._xenstore().write(path.encode(), value.encode())
        except Exception as exc:
            raise HypervisorError(f"xenstore write {path}: {exc}") from exc

    # -- inventory ------------------------------------------------------------

    def _xl_config(self, domid: int) -> dict[str, Any]:
        r = subprocess.run([self.xl, "list", "-l", str(domid)], capture_output=True, text=True)
        if r.returncode != 0:
            raise DomainNotFound(f"domain {domid}: xl list -l: {r.stderr.strip()}")
        configs = parse_xl_list_long(r.stdout)
        if domid not in configs:
            raise DomainNotFound(f"domain {domid}: not in xl list -l")
        return configs[domid]

    def _info(self, xc: XcDomainInfo, with_config: bool = True) -> DomainInfo:
        name = self.xs_read(f"{domain_path(xc.domid)}/name") or f"domain-{xc.domid}"
        config = self._xl_config(xc.domid) if with_config and xc.domid != 0 else {}
        dtype = domain_type_of(config) if config else ("hvm" if xc.hvm else "pv")
        return DomainInfo(
            domid=xc.domid,
            name=name,
            uuid=xc.uuid,
            domain_type=dtype,
            memory_bytes=memory_bytes_of(config) or xc.max_pages * 4096,
            state=xc.state,
            shutdown_reason=xc.shutdown_reason_name,
            config=config,
        )

    def list_domains(self) -> list[DomainInfo]:
        return [self._info(d, with_config=False) for d in self.xc.list_domains() if d.domid != 0]

    def lookup(self, name_or_domid: str | int) -> DomainInfo:
        if isinstance(name_or_domid, int) or str(name_or_domid).isdigit():
            xc = self.xc.domain_info(int(name_or_domid))
            if xc is None:
                raise DomainNotFound(f"no domain {name_or_domid}")
            return self._info(xc)
        for d in self.xc.list_domains():
            if d.domid != 0 and self.xs_read(f"{domain_path(d.domid)}/name") == name_or_domid:
                return self._info(d)
        raise DomainNotFound(f"no domain named {name_or_domid}")

    def _xc(self, domid: int) -> XcDomainInfo:
        xc = self.xc.domain_info(domid)
        if xc is None:
            raise DomainNotFound(f"no domain {domid}")
        return xc

    # -- lifecycle ------------------------------------------------------------

    async def suspend(self, domid: int, timeout: float = 60.0) -> None:
        """As libxl suspends a PV guest without a suspend event channel
        (``libxl_dom_suspend.c``): ask through control/shutdown, wait for the
        guest to take the request (it clears the key), then for Xen to report
        the domain shut down with reason suspend."""
        xc = self._xc(domid)
        if xc.state != "running":
            raise NotRunning(f"domain {domid} is {xc.state}")
        path = control_shutdown_path(domid)
        self.xs_write(path, "suspend")
        deadline = time.monotonic() + timeout
        delay = 0.0005
        acked = False
        while True:
            # polling rather than a xenstore watch: a checkpoint suspends within a few
            # milliseconds, and a watch costs a second connection and thread per domain
            info = self._xc(domid)
            if info.suspended:
                return
            if info.shutdown or info.dying:
                raise HypervisorError(
                    f"domain {domid} shut down ({info.shutdown_reason_name}) instead of suspending"
                )
            if not acked:
                acked = (self.xs_read(path) or "") == ""
            if time.monotonic() > deadline:
                if not acked:  # withdraw the request, as libxl does
                    with contextlib.suppress(HypervisorError):
                        self.xs_write(path, "")
                raise SuspendTimeout(
                    f"domain {domid} did not suspend within {timeout:g} s "
                    f"({'request taken' if acked else 'request not taken'})"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.01)

    async def resume(self, domid: int) -> None:
        self.xc.resume(domid, fast=True)

    def pause(self, domid: int) -> None:
        self.xc.pause(domid)

    def unpause(self, domid: int) -> None:
        self.xc.unpause(domid)

    def destroy(self, domid: int) -> None:
        r = subprocess.run([self.xl, "destroy", str(domid)], capture_output=True, text=True)
        if r.returncode != 0 and self.xc.domain_info(domid) is not None:
            raise HypervisorError(f"xl destroy {domid}: {r.stderr.strip()}")

    async def switch_logdirty(self, domid: int, enable: bool) -> None:
        xc = self._xc(domid)
        if xc.hvm:
            raise HypervisorError(
                f"domain {domid} is HVM: its device model's log-dirty switch (QMP "
                "xen-set-global-dirty-log) is not implemented"
            )
        # PV and PVH guests have no device model: libxc's log-dirty is all there is

    def create_restore_target(
        self, config: dict[str, Any], name: str, replica_disk: bool = False
    ) -> DomainInfo:
        raise HypervisorError(
            "on Xen the secondary restores through `xl migrate-receive -r` "
            "(orchestrator/protection/xen_receiver.py), not into a domain we build"
        )

    async def finish_restore(self, domid: int, paused: bool = False) -> DomainInfo:
        raise HypervisorError("on Xen, xl migrate-receive finishes the restore itself")

    def helper_env(self) -> dict[str, str]:
        return {"LIBXL_SAVE_HELPER": os.environ.get("LIBXL_SAVE_HELPER") or save_helper_path()}

    def memory(self) -> HostMemory:
        """Xen's own free memory: dom0's /proc/meminfo shows dom0's share only."""
        p = self.xc.physinfo()
        free = max(0, p.free_pages + p.scrub_pages - p.outstanding_pages)
        return HostMemory(
            total_bytes=p.total_pages * XC_PAGE_SIZE,
            free_bytes=free * XC_PAGE_SIZE,
            claimed_bytes=p.outstanding_pages * XC_PAGE_SIZE,
            source="xc_physinfo: free + scrub - outstanding claims",
        )

    def vif_name(self, domid: int) -> str | None:
        vif = f"vif{domid}.0"
        return vif if os.path.exists(f"/sys/class/net/{vif}") else None
