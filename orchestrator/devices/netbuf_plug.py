"""Network output buffering with a ``plug`` qdisc on an IFB, as Xen's Remus does it.

Set-up mirrors ``remus-netbuf-setup``: the guest's vif gets an ingress qdisc
whose filter redirects everything to an IFB device, and the IFB gets a
``plug`` qdisc as root. Per epoch the plug is driven over rtnetlink with a
raw RTM_NEWQDISC carrying ``struct tc_plug_qopt`` (what libxl does through
libnl, and what pyroute2 has no module for): ``TCQ_PLUG_BUFFER`` at
postsuspend inserts an epoch boundary, ``TCQ_PLUG_RELEASE_ONE`` at commit
lets the oldest buffered epoch out.

This needs ``sch_plug`` in the kernel. Where it is missing (the machines
this project is developed on), ``plug_available`` says so and the NFQUEUE or
proxy devices are used instead; the tests skip this device with that reason.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import zlib
from typing import Final

from .base import CheckpointDevice

RTM_NEWQDISC: Final = 36
RTM_DELQDISC: Final = 37
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLMSG_ERROR: Final = 2
TCA_KIND, TCA_OPTIONS = 1, 2
TC_H_ROOT: Final = 0xFFFFFFFF
TCQ_PLUG_BUFFER, TCQ_PLUG_RELEASE_ONE, TCQ_PLUG_RELEASE_INDEFINITE, TCQ_PLUG_LIMIT = 0, 1, 2, 3
PLUG_LIMIT: Final = 10_000_000  # bytes the plug may hold

_NLMSGHDR = struct.Struct("=IHHII")
_TCMSG = struct.Struct("=BBHiIII")
_RTATTR = struct.Struct("=HH")
_PLUG_QOPT = struct.Struct("=iI")


class PlugUnavailable(Exception):
    pass


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    raw = _RTATTR.pack(_RTATTR.size + len(payload), kind) + payload
    return raw + bytes(_align(len(raw)) - len(raw))


def qdisc_message(ifindex: int, kind: bytes, options: bytes, create: bool, seq: int) -> bytes:
    """An RTM_NEWQDISC for the root qdisc (handle 1:) of ``ifindex``."""
    body = _TCMSG.pack(socket.AF_UNSPEC, 0, 0, ifindex, 0x10000, TC_H_ROOT, 0)
    body += _attr(TCA_KIND, kind + b"\0")
    body += _attr(TCA_OPTIONS, options)
    flags = NLM_F_REQUEST | NLM_F_ACK | ((NLM_F_CREATE | NLM_F_EXCL) if create else 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_NEWQDISC, flags, seq, 0) + body


class PlugQdisc:
    """One rtnetlink socket driving the plug qdisc of one device."""

    def __init__(self, ifname: str) -> None:
        self.ifindex = socket.if_nametoindex(ifname)
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def request(self, action: int, create: bool = False) -> None:
        self.send(b"plug", _PLUG_QOPT.pack(action, PLUG_LIMIT), create)

    def send(self, kind: bytes, options: bytes, create: bool) -> None:
        self.seq += 1
        self.sock.send(qdisc_message(self.ifindex, kind, options, create, self.seq))
        reply = self.sock.recv(65536)
        _, mtype, _, _, _ = _NLMSGHDR.unpack_from(reply)
        if mtype == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", reply, _NLMSGHDR.size)
            if err:
                raise OSError(-err, f"plug qdisc: {os.strerror(-err)}")

    def close(self) -> None:
        self.sock.close()


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise PlugUnavailable(f"{' '.join(cmd)}: {r.stderr.strip()}")


def plug_available() -> str | None:
    """None if a plug qdisc can be created here, else why not (e.g. no sch_plug)."""
    if os.geteuid() != 0:
        return "needs root (rtnetlink qdisc changes)"
    name = f"rplug{os.getpid() % 100000}"
    try:
        _run("ip", "link", "add", name, "type", "ifb")
    except PlugUnavailable as exc:
        return f"no IFB device: {exc}"
    try:
        q = PlugQdisc(name)
        try:
            q.request(TCQ_PLUG_LIMIT, create=True)
        finally:
            q.close()
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EINVAL, errno.EOPNOTSUPP):
            return "the kernel has no sch_plug (qdisc 'plug' unknown)"
        return f"plug qdisc: {exc}"
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)
    return None


class PlugNetbuf(CheckpointDevice):
    name = "netbuf-plug"

    def __init__(self, vif: str) -> None:
        self.vif = vif
        self.ifb = f"ifb{zlib.crc32(vif.encode()) & 0xFFFFFF:06x}"[:15]
        self.qdisc: PlugQdisc | None = None

    async def setup(self) -> None:
        why = plug_available()
        if why:
            raise PlugUnavailable(why)
        _run("ip", "link", "add", self.ifb, "type", "ifb")
        _run("ip", "link", "set", self.ifb, "up")
        _run("tc", "qdisc", "add", "dev", self.vif, "ingress")
        _run(
            "tc",
            "filter",
            "add",
            "dev",
            self.vif,
            "parent",
            "ffff:",
            "protocol",
            "all",
            "u32",
            "match",
            "u32",
            "0",
            "0",
            "action",
            "mirred",
            "egress",
            "redirect",
            "dev",
            self.ifb,
        )
        self.qdisc = PlugQdisc(self.ifb)
        self.qdisc.request(TCQ_PLUG_LIMIT, create=True)
        self.qdisc.request(TCQ_PLUG_BUFFER)

    async def postsuspend(self, epoch: int) -> None:
        assert self.qdisc is not None
        self.qdisc.request(TCQ_PLUG_BUFFER)

    async def preresume(self) -> None:
        pass

    async def commit(self, epoch: int) -> None:
        assert self.qdisc is not None
        self.qdisc.request(TCQ_PLUG_RELEASE_ONE)

    async def teardown(self, release: bool) -> None:
        if self.qdisc is not None:
            if release:
                self.qdisc.request(TCQ_PLUG_RELEASE_INDEFINITE)
            self.qdisc.close()
            self.qdisc = None
        subprocess.run(["tc", "qdisc", "del", "dev", self.vif, "ingress"], capture_output=True)
        subprocess.run(["ip", "link", "del", self.ifb], capture_output=True)
