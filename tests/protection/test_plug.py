"""The plug-qdisc output buffer: its rtnetlink path, and the device where sch_plug exists."""

from __future__ import annotations

import os
import subprocess

import pytest

from orchestrator.devices.netbuf_plug import PlugQdisc, plug_available

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (rtnetlink, ip link)")


@needs_root
def test_raw_rtnetlink_qdisc_request_works_on_this_kernel() -> None:
    """The same raw RTM_NEWQDISC path the plug uses, with a qdisc every kernel has."""
    name = f"rtq{os.getpid() % 100000}"
    subprocess.run(["ip", "link", "add", name, "type", "ifb"], check=True)
    try:
        q = PlugQdisc(name)
        try:
            q.send(b"pfifo", (1234).to_bytes(4, "little"), create=True)
        finally:
            q.close()
        shown = subprocess.run(
            ["tc", "qdisc", "show", "dev", name], capture_output=True, text=True
        ).stdout
        assert "pfifo 1: root" in shown and "limit 1234p" in shown
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


PLUG = plug_available()


@pytest.mark.skipif(PLUG is not None, reason=f"plug qdisc unavailable: {PLUG}")
def test_plug_buffer_and_release() -> None:
    name = f"rtp{os.getpid() % 100000}"
    subprocess.run(["ip", "link", "add", name, "type", "ifb"], check=True)
    try:
        q = PlugQdisc(name)
        q.request(3, create=True)  # TCQ_PLUG_LIMIT
        q.request(0)  # TCQ_PLUG_BUFFER
        q.request(1)  # TCQ_PLUG_RELEASE_ONE
        q.close()
        shown = subprocess.run(
            ["tc", "qdisc", "show", "dev", name], capture_output=True, text=True
        ).stdout
        assert "plug" in shown
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)
