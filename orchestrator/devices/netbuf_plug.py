"""Network output buffering with a ``plug`` qdisc on an IFB, as Xen's Remus does it.

Set-up mirrors ``remus-netbuf-setup``: the guest's vif gets an ingress qdisc
whose u32 filter redirects everything to an IFB device (``tc filter add dev VIF
parent ffff: protocol all u32 match u32 0 0 action mirred egress redirect dev
IFB``), and the IFB gets a ``plug`` qdisc as root. All of it goes over
rtnetlink through pyroute2, whose ``sched_plug`` encodes ``struct
tc_plug_qopt``. Per epoch the plug is told what libxl tells it through libnl:
``TCQ_PLUG_BUFFER`` at postsuspend inserts an epoch boundary,
``TCQ_PLUG_RELEASE_ONE`` at commit lets the oldest buffered epoch out, and
``TCQ_PLUG_RELEASE_INDEFINITE`` at a teardown that releases lets all of it go.

Those per-epoch requests are built by pyroute2 once, at set-up, and sent on a
blocking rtnetlink socket of their own: a request through pyroute2's event
loop took 0.3 to 0.7 ms here, against 6 to 15 us sent this way; postsuspend's
is sent while the guest is suspended.

This needs ``sch_plug`` in the kernel. Where it is missing (the machines
this project is developed on), ``plug_available`` says so and the NFQUEUE or
proxy devices are used instead; the tests skip this device with that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

from .base import CheckpointDevice

# pyroute2 is imported where it is used: importing it takes some 0.3 s, which every
# remusctl command would pay, and only a plug (or the probe for one) needs it

PLUG_LIMIT: Final = 10_000_000  # bytes the plug may hold
HANDLE: Final = 0x10000  # the plug's, 1: (its parent is the root)
INGRESS: Final = 0xFFFF0000  # ffff:, the vif's ingress qdisc
ETH_P_ALL: Final = 0x0003  # the filter's protocol: all
# sched_plug takes an action by its name (and sends an unknown one as a BUFFER)
BUFFER, RELEASE_ONE, RELEASE_INDEFINITE = (
    "TCQ_PLUG_BUFFER", "TCQ_PLUG_RELEASE_ONE", "TCQ_PLUG_RELEASE_INDEFINITE"
)  # fmt: skip
NO_PLUG: Final = "the kernel has no sch_plug (qdisc 'plug' unknown)"


class PlugUnavailable(Exception):
    pass


def plug_request(index: int, action: str) -> bytes:
    """The RTM_NEWQDISC that tells the plug of device ``index`` to do ``action``: what
    libxl sends through libnl (``rtnl_qdisc_add(sock, qdisc, NLM_F_REQUEST)``)."""
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
    from pyroute2.netlink.rtnl import RTM_NEWQDISC, TC_H_ROOT
    from pyroute2.netlink.rtnl.tcmsg import sched_plug, tcmsg

    if action not in sched_plug.actions:
        raise ValueError(f"no plug action {action!r}")
    msg = tcmsg()
    msg["index"], msg["handle"], msg["parent"] = index, HANDLE, TC_H_ROOT
    options = sched_plug.get_parameters({"action": action})
    msg["attrs"] = [["TCA_KIND", "plug"], ["TCA_OPTIONS", options]]
    msg["header"]["type"], msg["header"]["flags"] = RTM_NEWQDISC, NLM_F_REQUEST | NLM_F_ACK
    msg.encode()
    return bytes(msg.data)


class Plug:
    """The plug of one device, told each action on a blocking rtnetlink socket."""

    def __init__(self, index: int) -> None:
        from pyroute2.netlink import nlmsgerr

        self.nlmsgerr = nlmsgerr
        actions = (BUFFER, RELEASE_ONE, RELEASE_INDEFINITE)
        self.requests = {a: plug_request(index, a) for a in actions}
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))

    def __call__(self, action: str) -> None:
        self.sock.send(self.requests[action])
        ack = self.nlmsgerr(self.sock.recv(65536))
        ack.decode()
        if ack["error"]:
            raise OSError(-ack["error"], f"plug qdisc {action}: {os.strerror(-ack['error'])}")

    def close(self) -> None:
        self.sock.close()


async def redirect(ipr: Any, vif: int, ifb: int) -> None:
    """Everything that enters ``vif`` (the guest's output) out of ``ifb`` instead."""
    await ipr.tc("add", "ingress", vif)
    mirred = {"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": ifb}
    await ipr.tc(
        "add-filter", "u32", vif, parent=INGRESS, protocol=ETH_P_ALL, target=0,
        keys=["0x0/0x0+0"], action=mirred,
    )  # fmt: skip


async def why_no_plug() -> str | None:
    """None if a plug qdisc can be created here, else why not (e.g. no sch_plug)."""
    if os.geteuid() != 0:
        return "needs root (rtnetlink qdisc changes)"
    from pyroute2 import AsyncIPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    name = f"rplug{os.getpid() % 100000}"
    async with AsyncIPRoute() as ipr:
        try:
            await ipr.link("add", ifname=name, kind="ifb")
        except NetlinkError as exc:
            return f"no IFB device: {exc.args[-1]}"
        try:
            await ipr.tc("add", "plug", socket.if_nametoindex(name), HANDLE, limit=PLUG_LIMIT)
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.EINVAL, errno.EOPNOTSUPP):
                return NO_PLUG
            return f"plug qdisc: {exc.args[-1]}"
        finally:
            await ipr.link("del", ifname=name)
    return None


def plug_available() -> str | None:
    """:func:`why_no_plug` for synchronous callers, inside an event loop or not (pyroute2
    cannot run its own in one): on a thread of its own."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, why_no_plug()).result()


class PlugNetbuf(CheckpointDevice):
    name = "netbuf-plug"

    def __init__(self, vif: str) -> None:
        self.vif = vif
        self.ifb = f"ifb{zlib.crc32(vif.encode()) & 0xFFFFFF:06x}"[:15]
        self.plug: Plug | None = None

    async def setup(self) -> None:
        why = await why_no_plug()
        if why:
            raise PlugUnavailable(why)
        from pyroute2 import AsyncIPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        async with AsyncIPRoute() as ipr:
            try:
                await ipr.link("add", ifname=self.ifb, kind="ifb")
                ifb = socket.if_nametoindex(self.ifb)
                await ipr.link("set", index=ifb, state="up")
                await redirect(ipr, socket.if_nametoindex(self.vif), ifb)
                await ipr.tc("add", "plug", ifb, HANDLE, limit=PLUG_LIMIT)
            except NetlinkError as exc:
                raise PlugUnavailable(f"{self.vif} to {self.ifb}: {exc.args[-1]}") from exc
        self.plug = Plug(ifb)
        self.plug(BUFFER)

    async def postsuspend(self, epoch: int) -> None:
        assert self.plug is not None
        self.plug(BUFFER)

    async def preresume(self) -> None:
        pass

    async def commit(self, epoch: int) -> None:
        assert self.plug is not None
        self.plug(RELEASE_ONE)

    async def teardown(self, release: bool) -> None:
        if self.plug is not None:
            if release:
                self.plug(RELEASE_INDEFINITE)
            self.plug.close()
            self.plug = None
        from pyroute2 import AsyncIPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        async with AsyncIPRoute() as ipr:  # the ingress qdisc takes its filter with it
            with contextlib.suppress(NetlinkError, OSError):
                await ipr.tc("del", "ingress", socket.if_nametoindex(self.vif))
            with contextlib.suppress(NetlinkError):
                await ipr.link("del", ifname=self.ifb)
