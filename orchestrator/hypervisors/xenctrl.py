"""libxenctrl (and libxenguest's resume) through ctypes, for Xen 4.17.

Only the calls Remus needs from the toolstack's C libraries: domain info,
pause/unpause, destroy, the fast resume that cancels a suspend, and the host's
free memory (``xc_physinfo``). The
structure layout is Xen 4.17's ``xen_domctl_getdomaininfo`` (``xc_domaininfo_t``
since 4.17's ``xc_domain_getinfolist``); ``tests/xen`` compiles a C program
against the installed headers and checks every offset here against it.

Every call checks its return and raises :class:`XenCtrlError` with the
operation, the domid and errno.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Any, Final

from .base import HypervisorError

LIBXENCTRL: Final = "libxenctrl.so.4.17"
# xc_domain_resume lives in libxenguest (xenguest.h), not libxenctrl
LIBXENGUEST: Final = "libxenguest.so.4.17"

# public/domctl.h
XEN_DOMINF_dying: Final = 1 << 0
XEN_DOMINF_hvm_guest: Final = 1 << 1
XEN_DOMINF_shutdown: Final = 1 << 2
XEN_DOMINF_paused: Final = 1 << 3
XEN_DOMINF_blocked: Final = 1 << 4
XEN_DOMINF_running: Final = 1 << 5
XEN_DOMINF_debugged: Final = 1 << 6
XEN_DOMINF_xs_domain: Final = 1 << 7
XEN_DOMINF_hap: Final = 1 << 8
XEN_DOMINF_shutdownmask: Final = 255
XEN_DOMINF_shutdownshift: Final = 16
# public/version.h
XENVER_version: Final = 0
XENVER_extraversion: Final = 1
# public/sched.h
SHUTDOWN_REASONS: Final = ("poweroff", "reboot", "suspend", "crash", "watchdog", "soft_reset")
SHUTDOWN_suspend: Final = 2


class XenArchDomainConfig(ctypes.Structure):  # x86: struct xen_arch_domainconfig
    _fields_ = [("emulation_flags", ctypes.c_uint32), ("misc_flags", ctypes.c_uint32)]


class XcDomainInfoStruct(ctypes.Structure):
    """``xc_domaininfo_t`` = ``struct xen_domctl_getdomaininfo`` (x86-64, Xen 4.17)."""

    _fields_ = [
        ("domain", ctypes.c_uint16),
        ("pad1", ctypes.c_uint16),
        ("flags", ctypes.c_uint32),
        ("tot_pages", ctypes.c_uint64),
        ("max_pages", ctypes.c_uint64),
        ("outstanding_pages", ctypes.c_uint64),
        ("shr_pages", ctypes.c_uint64),
        ("paged_pages", ctypes.c_uint64),
        ("shared_info_frame", ctypes.c_uint64),
        ("cpu_time", ctypes.c_uint64),
        ("nr_online_vcpus", ctypes.c_uint32),
        ("max_vcpu_id", ctypes.c_uint32),
        ("ssidref", ctypes.c_uint32),
        ("handle", ctypes.c_uint8 * 16),
        ("cpupool", ctypes.c_uint32),
        ("gpaddr_bits", ctypes.c_uint8),
        ("pad2", ctypes.c_uint8 * 7),
        ("arch_config", XenArchDomainConfig),
    ]


class XcPhysinfoStruct(ctypes.Structure):
    """``xc_physinfo_t`` = ``struct xen_sysctl_physinfo`` (Xen 4.17)."""

    _fields_ = [
        ("threads_per_core", ctypes.c_uint32),
        ("cores_per_socket", ctypes.c_uint32),
        ("nr_cpus", ctypes.c_uint32),
        ("max_cpu_id", ctypes.c_uint32),
        ("nr_nodes", ctypes.c_uint32),
        ("max_node_id", ctypes.c_uint32),
        ("cpu_khz", ctypes.c_uint32),
        ("capabilities", ctypes.c_uint32),
        ("arch_capabilities", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("total_pages", ctypes.c_uint64),
        ("free_pages", ctypes.c_uint64),
        ("scrub_pages", ctypes.c_uint64),
        ("outstanding_pages", ctypes.c_uint64),
        ("max_mfn", ctypes.c_uint64),
        ("hw_cap", ctypes.c_uint32 * 8),
    ]


XC_PAGE_SIZE: Final = 4096


@dataclass(frozen=True)
class Physinfo:
    """Xen's heap, in pages: free and being scrubbed (free once scrubbed, what
    libxl counts as free), and outstanding claims (promised to domains being
    built, not yet allocated)."""

    total_pages: int
    free_pages: int
    scrub_pages: int
    outstanding_pages: int


class XenCtrlError(HypervisorError):
    def __init__(self, op: str, domid: int | None, errno: int) -> None:
        self.op, self.domid, self.errno = op, domid, errno
        on = f" of domain {domid}" if domid is not None else ""
        super().__init__(f"{op}{on} failed: {os.strerror(errno) if errno else 'error'} ({errno})")


@dataclass(frozen=True)
class XcDomainInfo:
    domid: int
    flags: int
    tot_pages: int
    max_pages: int
    shared_info_frame: int
    cpu_time: int
    nr_online_vcpus: int
    max_vcpu_id: int
    ssidref: int
    uuid: str
    cpupool: int

    @property
    def dying(self) -> bool:
        return bool(self.flags & XEN_DOMINF_dying)

    @property
    def shutdown(self) -> bool:
        return bool(self.flags & XEN_DOMINF_shutdown)

    @property
    def paused(self) -> bool:
        return bool(self.flags & XEN_DOMINF_paused)

    @property
    def hvm(self) -> bool:
        return bool(self.flags & XEN_DOMINF_hvm_guest)

    @property
    def shutdown_reason(self) -> int:
        return (self.flags >> XEN_DOMINF_shutdownshift) & XEN_DOMINF_shutdownmask

    @property
    def shutdown_reason_name(self) -> str:
        if not self.shutdown:
            return ""
        r = self.shutdown_reason
        return SHUTDOWN_REASONS[r] if r < len(SHUTDOWN_REASONS) else f"reason {r}"

    @property
    def suspended(self) -> bool:
        return self.shutdown and self.shutdown_reason == SHUTDOWN_suspend

    @property
    def state(self) -> str:
        """As :class:`~.base.DomainInfo` names it (``xl list``'s letters: d, s, p, r/b)."""
        if self.dying:
            return "dying"
        if self.shutdown:
            return "shutdown"
        if self.paused:
            return "paused"
        return "running"


def uuid_of(handle: Any) -> str:
    h = bytes(handle).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _declare(lib: ctypes.CDLL) -> None:
    vp, u32, c_int = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int
    lib.xc_interface_open.argtypes = [vp, vp, ctypes.c_uint]
    lib.xc_interface_open.restype = vp
    lib.xc_interface_close.argtypes = [vp]
    lib.xc_interface_close.restype = c_int
    lib.xc_domain_getinfolist.argtypes = [
        vp,
        u32,
        ctypes.c_uint,
        ctypes.POINTER(XcDomainInfoStruct),
    ]
    lib.xc_domain_getinfolist.restype = c_int
    for fn in ("xc_domain_pause", "xc_domain_unpause", "xc_domain_destroy"):
        getattr(lib, fn).argtypes = [vp, u32]
        getattr(lib, fn).restype = c_int
    lib.xc_physinfo.argtypes = [vp, ctypes.POINTER(XcPhysinfoStruct)]
    lib.xc_physinfo.restype = c_int
    lib.xc_version.argtypes = [vp, c_int, vp]
    lib.xc_version.restype = c_int


def load() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """The two libraries with every function we call declared (no Xen needed)."""
    ctrl = ctypes.CDLL(LIBXENCTRL, use_errno=True)
    guest = ctypes.CDLL(LIBXENGUEST, use_errno=True)
    _declare(ctrl)
    guest.xc_domain_resume.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int]
    guest.xc_domain_resume.restype = ctypes.c_int
    return ctrl, guest


class XenCtrl:
    """An open xc_interface (a privcmd handle): dom0, root."""

    def __init__(self) -> None:
        try:
            self._ctrl, self._guest = load()
        except OSError as exc:
            raise HypervisorError(f"{LIBXENCTRL} cannot be loaded (xen-utils-4.17): {exc}") from exc
        ctypes.set_errno(0)
        handle = self._ctrl.xc_interface_open(None, None, 0)
        if not handle:
            err = ctypes.get_errno()
            raise XenCtrlError("xc_interface_open (/dev/xen/privcmd)", None, err)
        self._xch: int = handle

    def close(self) -> None:
        if self._xch:
            self._ctrl.xc_interface_close(self._xch)
            self._xch = 0

    def _check(self, op: str, domid: int | None, rc: int) -> int:
        if rc < 0:
            raise XenCtrlError(op, domid, ctypes.get_errno())
        return rc

    def domain_info(self, domid: int) -> XcDomainInfo | None:
        """One domain, or None if there is no such domid."""
        info = XcDomainInfoStruct()
        ctypes.set_errno(0)
        n = self._check(
            "xc_domain_getinfolist",
            domid,
            self._ctrl.xc_domain_getinfolist(self._xch, domid, 1, ctypes.byref(info)),
        )
        if n < 1 or info.domain != domid:  # the call returns the next domid up
            return None
        return _convert(info)

    def list_domains(self, max_domains: int = 1024) -> list[XcDomainInfo]:
        infos = (XcDomainInfoStruct * max_domains)()
        ctypes.set_errno(0)
        n = self._check(
            "xc_domain_getinfolist",
            None,
            self._ctrl.xc_domain_getinfolist(self._xch, 0, max_domains, infos),
        )
        return [_convert(infos[i]) for i in range(n)]

    def pause(self, domid: int) -> None:
        self._check("xc_domain_pause", domid, self._ctrl.xc_domain_pause(self._xch, domid))

    def unpause(self, domid: int) -> None:
        self._check("xc_domain_unpause", domid, self._ctrl.xc_domain_unpause(self._xch, domid))

    def destroy(self, domid: int) -> None:
        self._check("xc_domain_destroy", domid, self._ctrl.xc_domain_destroy(self._xch, domid))

    def resume(self, domid: int, fast: bool = True) -> None:
        """``fast``: the guest sees its suspend hypercall return 1 (cancelled) and
        carries on where it was, what libxl does after each Remus checkpoint."""
        self._check(
            "xc_domain_resume", domid, self._guest.xc_domain_resume(self._xch, domid, int(fast))
        )

    def physinfo(self) -> Physinfo:
        info = XcPhysinfoStruct()
        ctypes.set_errno(0)
        self._check("xc_physinfo", None, self._ctrl.xc_physinfo(self._xch, ctypes.byref(info)))
        return Physinfo(info.total_pages, info.free_pages, info.scrub_pages, info.outstanding_pages)

    def version(self) -> str:
        ver = self._check(
            "xc_version", None, self._ctrl.xc_version(self._xch, XENVER_version, None)
        )
        extra = ctypes.create_string_buffer(16)  # xen_extraversion_t is char[16]
        self._check(
            "xc_version", None, self._ctrl.xc_version(self._xch, XENVER_extraversion, extra)
        )
        return f"{ver >> 16}.{ver & 0xFFFF}{extra.value.decode(errors='replace')}"


def _convert(s: XcDomainInfoStruct) -> XcDomainInfo:
    return XcDomainInfo(
        domid=s.domain,
        flags=s.flags,
        tot_pages=s.tot_pages,
        max_pages=s.max_pages,
        shared_info_frame=s.shared_info_frame,
        cpu_time=s.cpu_time,
        nr_online_vcpus=s.nr_online_vcpus,
        max_vcpu_id=s.max_vcpu_id,
        ssidref=s.ssidref,
        uuid=uuid_of(s.handle),
        cpupool=s.cpupool,
    )
