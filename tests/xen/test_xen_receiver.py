"""The Xen secondary's receiver against a stand-in for `xl migrate-receive -r -e`.

The stand-in prints xl's banner, reads nothing until the test lets it (an xl
busy restoring a big first checkpoint), then copies its input to a file and,
at the end of its input, reports a Remus failover the way xl does. What is
checked: checkpoints are ACKed once whole at the secondary, while xl has not
read them (the ACK waited for xl's restore before: longer than the ACK timeout
in the nested lab), the stream is read on meanwhile, a failover hands xl every
released byte and nothing of a partial checkpoint, and past ``max_backlog``
the ACKs wait for xl.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path
from typing import Any, cast

from orchestrator.hypervisors.base import DomainInfo, Hypervisor
from orchestrator.protection.spec import ProtectionSpec
from orchestrator.protection.xen_receiver import BANNER, XenRemusSecondary
from orchestrator.streams import StreamType, xl
from orchestrator.streams.errors import Layer
from orchestrator.streams.gate import CheckpointGate, Release
from orchestrator.streams.synth import SynthSpec, generate
from orchestrator.transport.control import Ack, Hello, State
from orchestrator.transport.controlio import Control

from ..conftest import join

# the libxl stream of a Remus protection: the initial copy (about 1 MiB) and 3 more
SPEC = SynthSpec(
    pages=256,
    stream_type=StreamType.REMUS,
    checkpoints=3,
    dirty_pages=4,
    batch=64,
    top_layer=Layer.LIBXL,
)
STREAM = join(generate(SPEC))
CONFIG = {"c_info": {"name": "vm1", "uuid": "0b5f0d6c-0000-4000-8000-000000000001", "type": "pv"}}

FAKE_XL = """\
import os, sys, time
go, out = sys.argv[1], sys.argv[2]
assert sys.argv[3:] == ["migrate-receive", "-r", "-e"], sys.argv
os.write(1, {banner!r})
while not os.path.exists(go):
    time.sleep(0.01)
with open(out, "wb") as f:
    while data := os.read(0, 1 << 16):
        f.write(data)
sys.stderr.write("migration target: Remus Failover for domain 7\\n")
"""


def checkpoints() -> list[bytes]:
    """The stream cut at each checkpoint's end, as the gate releases it."""
    events = CheckpointGate(Layer.LIBXL).receive_data(STREAM)
    return [e.data for e in events if isinstance(e, Release)]


class _Host:
    name = "sim"  # the backend its xl guard opens (it finds no incoming domain there)

    def lookup(self, ref: int | str) -> DomainInfo:
        return DomainInfo(int(ref), "vm1", "uuid", "pv", 1 << 20, "running")


def fake_xl(tmp_path: Path) -> tuple[str, Path, Path]:
    script = tmp_path / "fake-xl.py"
    script.write_text(FAKE_XL.format(banner=BANNER))
    wrapper = tmp_path / "xl"
    go, out = tmp_path / "go", tmp_path / "xl-input"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {script} {go} {out} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper), go, out


async def control_pair() -> tuple[Control, Control]:
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    return Control(ra, wa), Control(rb, wb)


async def acks(ctl: Control, into: list[int]) -> None:
    while True:
        # as a primary would: each checkpoint is in flight once written (all are)
        if ctl.conn.state is State.ESTABLISHED:
            ctl.conn.checkpoint_sent(ctl.conn.sent_seq + 1)
        event: Any = await ctl.next()
        if isinstance(event, Ack):
            into.append(event.seq)


async def until(cond: Any, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def scenario(tmp_path: Path, max_backlog: int | None) -> tuple[list[int], list[int], Path]:
    """Send the whole stream and half of one more checkpoint while xl reads nothing,
    then end the stream (the primary is gone) and let xl read: (ACKs while xl read
    nothing, all ACKs, xl's input file)."""
    xl_path, go, out = fake_xl(tmp_path)
    primary_ctl, secondary_ctl = await control_pair()
    ours, theirs = socket.socketpair()
    settings = ProtectionSpec("web", ack_timeout_ms=10_000, heartbeat_timeout_ms=60_000)
    sec = XenRemusSecondary(
        cast(Hypervisor, _Host()), theirs, secondary_ctl, settings, xl_path=xl_path
    )
    if max_backlog is not None:
        sec.max_backlog = max_backlog
    run = asyncio.create_task(sec.run())
    primary_ctl.send(Hello(CONFIG["c_info"]["uuid"], CONFIG, ("ack",)))
    await primary_ctl.writer.drain()
    assert isinstance(await primary_ctl.next(), Hello)
    got: list[int] = []
    reader = asyncio.create_task(acks(primary_ctl, got))
    cps = checkpoints()
    for cp in cps:
        await asyncio.to_thread(ours.sendall, cp)
    await asyncio.to_thread(ours.sendall, cps[-1][: len(cps[-1]) // 2])  # a partial one
    await until(lambda: sec.gate.seq == len(cps))
    await asyncio.sleep(0.3)  # time for ACKs that would come
    early = list(got)
    ours.close()  # the primary is gone: fail over
    go.touch()
    info = await asyncio.wait_for(run, 20)
    assert info.domid == 7 and sec.domid == 7
    await until(lambda: len(got) == len(cps), 5)
    reader.cancel()
    primary_ctl.close()
    return early, got, out


def test_checkpoints_are_acked_before_xl_reads_them_and_failover_hands_xl_all(
    tmp_path: Path,
) -> None:
    early, got, out = asyncio.run(scenario(tmp_path, None))
    n = len(checkpoints())
    assert n == 4 and len(STREAM) > 1 << 20
    assert early == list(range(1, n + 1))  # every ACK while xl had read nothing
    assert got == early
    header = xl.SavefileHeader(json.dumps(CONFIG).encode()).encode()
    # xl got the header and every whole checkpoint; not a byte of the partial one
    assert out.read_bytes() == header + STREAM


def test_past_max_backlog_acks_wait_for_xl(tmp_path: Path) -> None:
    # nothing may queue behind what xl reads: checkpoint 1 is ACKed once xl is
    # given it, the next only once xl has taken it
    early, got, out = asyncio.run(scenario(tmp_path, 0))
    assert early == [1]
    assert got == [1, 2, 3, 4]
    assert out.read_bytes().endswith(STREAM)
