"""The plug-qdisc output buffer: the requests pyroute2 builds for it, its IFB redirect
on a veth in a network namespace, and the device itself where the kernel has sch_plug."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from pyroute2 import AsyncIPRoute
from pyroute2.netns import setns

from orchestrator.devices.netbuf_plug import (
    BUFFER,
    HANDLE,
    NO_PLUG,
    PLUG_LIMIT,
    RELEASE_INDEFINITE,
    RELEASE_ONE,
    Plug,
    PlugNetbuf,
    PlugUnavailable,
    plug_available,
    plug_request,
    redirect,
    why_no_plug,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (rtnetlink, netns)")
T = TypeVar("T")

# -- decoding a request by hand: what the kernel's tc_modify_qdisc reads -------------------

RTM_NEWQDISC, NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 36, 1, 4, 0x200, 0x400


def decode(data: bytes) -> dict[str, Any]:
    """One RTM_*QDISC: nlmsghdr, tcmsg, then TCA_KIND and TCA_OPTIONS (tc_plug_qopt)."""
    length, mtype, flags, _seq, _pid = struct.unpack_from("=IHHII", data)
    assert length == len(data)
    family, _, _, index, handle, parent, _info = struct.unpack_from("=BBHiIII", data, 16)
    attrs, pos = {}, 36
    while pos < length:
        alen, kind = struct.unpack_from("=HH", data, pos)
        attrs[kind] = data[pos + 4 : pos + alen]
        pos += (alen + 3) & ~3
    return {
        "type": mtype, "flags": flags, "family": family, "index": index, "handle": handle,
        "parent": parent, "kind": attrs.get(1), "options": attrs.get(2),
    }  # fmt: skip


@pytest.mark.parametrize(
    ("action", "code"), [(BUFFER, 0), (RELEASE_ONE, 1), (RELEASE_INDEFINITE, 2)]
)
def test_per_epoch_requests_are_what_libxl_sends(action: str, code: int) -> None:
    m = decode(plug_request(7, action))
    assert m == {
        "type": RTM_NEWQDISC, "flags": NLM_F_REQUEST | NLM_F_ACK, "family": socket.AF_UNSPEC,
        "index": 7, "handle": HANDLE, "parent": 0xFFFFFFFF, "kind": b"plug\0",
        "options": struct.pack("=iI", code, 0),  # struct tc_plug_qopt {int action; u32 limit}
    }  # fmt: skip


def test_an_unknown_action_is_refused_rather_than_sent_as_a_buffer() -> None:
    with pytest.raises(ValueError, match="no plug action"):
        plug_request(7, "TCQ_PLUG_RELEASE")


# -- a network namespace of the test's own -------------------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"plugt{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def inside(ns: str, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``fn()`` on a thread in ``ns`` (setns moves only the calling thread, and the
    threads it starts follow it)."""
    out: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            setns(ns, flags=0)
            out.append(asyncio.run(fn()))
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    if errors:
        raise errors[0]
    return out[0]


def sh(ns: str, *cmd: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, check=False
    ).stdout


def kernel_has_plug(ns: str) -> bool:
    """The tc tool's word, independent of ours."""
    sh(ns, "ip", "link", "add", "tcplug", "type", "ifb")
    r = subprocess.run(
        ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "tcplug", "root", "plug"],
        capture_output=True, text=True,
    )  # fmt: skip
    sh(ns, "ip", "link", "del", "tcplug")
    if r.returncode and "unknown" not in r.stderr.lower():
        pytest.skip(f"tc cannot tell whether sch_plug is here: {r.stderr.strip()}")
    return r.returncode == 0


@needs_root
def test_the_probe_asks_for_a_plug_and_names_what_is_missing(
    netns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[bytes] = []
    original = AsyncIPRoute.send

    def record(self: Any, data: bytes, *args: Any) -> Any:
        sent.append(bytes(data))
        return original(self, data, *args)

    monkeypatch.setattr(AsyncIPRoute, "send", record)
    why = inside(netns, why_no_plug)
    (add,) = [m for m in map(decode, sent) if m["type"] == RTM_NEWQDISC]
    assert add["flags"] == NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    assert (add["handle"], add["parent"], add["kind"]) == (HANDLE, 0xFFFFFFFF, b"plug\0")
    assert add["options"] == struct.pack("=iI", 0, PLUG_LIMIT)  # the limit, at init
    if kernel_has_plug(netns):
        assert why is None
    else:
        assert why == NO_PLUG and "sch_plug" in why
    assert "rplug" not in sh(netns, "ip", "link")  # its probing IFB is gone
    # the synchronous form, from inside a running event loop (remusd's /v1/host)

    async def from_a_loop() -> str | None:
        return plug_available()

    assert inside(netns, from_a_loop) == why


@needs_root
def test_setup_without_sch_plug_says_so_and_leaves_nothing(netns: str) -> None:
    if kernel_has_plug(netns):
        pytest.skip("this kernel has sch_plug")
    sh(netns, "ip", "link", "add", "va", "type", "veth", "peer", "name", "vb")
    dev = PlugNetbuf("va")

    async def setup() -> None:
        await dev.setup()

    with pytest.raises(PlugUnavailable, match="sch_plug"):
        inside(netns, setup)
    assert dev.ifb not in sh(netns, "ip", "link") and "ingress" not in sh(
        netns, "tc", "qdisc", "show", "dev", "va"
    )


@needs_root
def test_the_vifs_traffic_goes_through_the_ifb_and_teardown_undoes_it(netns: str) -> None:
    """The redirect as remus-netbuf-setup makes it, on a veth: frames sent from the
    peer end enter va and leave through the IFB; then the device's teardown removes
    the ingress qdisc and the IFB. The IFB gets a pfifo root here, not a plug."""
    dev = PlugNetbuf("va")

    async def run() -> tuple[int, int]:
        async with AsyncIPRoute() as ipr:
            await ipr.link("add", ifname="va", kind="veth", peer="vb")
            await ipr.link("add", ifname=dev.ifb, kind="ifb")
            va, vb, ifb = (socket.if_nametoindex(n) for n in ("va", "vb", dev.ifb))
            for i in (va, vb, ifb):
                await ipr.link("set", index=i, state="up")
            await redirect(ipr, va, ifb)
            await ipr.tc("add", "pfifo", ifb, HANDLE, limit=1000)

            async def packets() -> int:
                (link,) = await ipr.link("get", index=ifb)
                return int(link.get("IFLA_STATS64")["tx_packets"])

            before = await packets()
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
                s.bind(("vb", 0))
                frame = b"\xff" * 6 + bytes.fromhex("020000000001") + b"\x88\xb5" + bytes(46)
                for _ in range(5):
                    s.send(frame)
            await asyncio.sleep(0.2)
            # a plug's change on a device whose root is another qdisc: the kernel's
            # refusal comes back on the ack, as an errno
            plug = Plug(ifb)
            try:
                with pytest.raises(OSError) as err:
                    plug(BUFFER)
                assert err.value.errno == errno.EINVAL
            finally:
                plug.close()
            return before, await packets()

    before, after = inside(netns, run)
    assert after - before >= 5
    shown = sh(netns, "tc", "filter", "show", "dev", "va", "parent", "ffff:")
    assert "u32" in shown and "match 00000000/00000000 at 0" in shown
    assert f"mirred (Egress Redirect to device {dev.ifb})" in shown

    async def teardown() -> None:
        await dev.teardown(release=False)

    inside(netns, teardown)
    assert "ingress" not in sh(netns, "tc", "qdisc", "show", "dev", "va")
    assert dev.ifb not in sh(netns, "ip", "link")
    inside(netns, teardown)  # twice: nothing left to remove is no error


PLUG = plug_available()


@pytest.mark.skipif(PLUG is not None, reason=f"plug qdisc unavailable: {PLUG}")
def test_plug_buffer_and_release(netns: str) -> None:
    sh(netns, "ip", "link", "add", "va", "type", "veth", "peer", "name", "vb")
    dev = PlugNetbuf("va")

    async def run() -> None:
        await dev.setup()
        await dev.postsuspend(1)
        await dev.commit(1)

    inside(netns, run)
    try:
        assert "plug" in sh(netns, "tc", "qdisc", "show", "dev", dev.ifb)
    finally:

        async def teardown() -> None:
            await dev.teardown(release=True)

        inside(netns, teardown)
