"""Disk replication: per-checkpoint block sets, applied on the secondary at commit."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import pytest

from orchestrator.devices.disk import DiskReplica, DiskReplicaError, DiskSender
from orchestrator.guest.journal import Journal, decode_record, encode_record
from orchestrator.hypervisors.base import BLOCK_SIZE
from orchestrator.hypervisors.sim import SimHypervisor
from orchestrator.protection.remus import RemusPrimary, RemusSecondary
from orchestrator.transport.control import (
    ControlConnection,
    ControlError,
    DiskWrites,
    Hello,
    Role,
    encode_event,
)

from .test_remus_loop import SETTINGS, kv, pair, wait_for


def test_journal_records_round_trip_and_reject_torn_slots() -> None:
    rec = encode_record(7, b"key", b"value")
    assert len(rec) == 512 and decode_record(rec) == (7, b"key", b"value")
    torn = bytearray(rec)
    torn[22] ^= 1  # inside the key
    assert decode_record(bytes(torn)) is None
    assert decode_record(bytes(512)) is None
    disk = bytearray(2 * BLOCK_SIZE)

    def write(off: int, data: bytes) -> None:
        disk[off : off + len(data)] = data

    j = Journal(2, write, lambda off, n: bytes(disk[off : off + n]))
    for seq in range(1, 40):  # 16 slots: the ring wraps twice
        j.append(seq, b"k%d" % (seq % 3), b"v%d" % seq)
    newest, count, latest = j.scan()
    assert (newest, count) == (39, 16)
    assert latest[b"k0"] == (39, b"v39") and latest[b"k1"] == (37, b"v37")


def test_disk_frames_round_trip_through_the_control_codec() -> None:
    frame = DiskWrites(3, 100, ((5, b"a" * 4096), (99, b"b" * 4096)), last=True)
    # the secondary is the side that receives DISK frames
    conn = ControlConnection(Role.SECONDARY)
    conn.receive_data(encode_event(Hello("p")) + encode_event(frame))
    assert isinstance(conn.next_event(), Hello)
    assert conn.next_event() == frame
    bad = ControlConnection(Role.SECONDARY)
    beyond = DiskWrites(3, 10, ((10, b"c" * 4096),), last=True)
    bad.receive_data(encode_event(Hello("p")) + encode_event(beyond))
    bad.next_event()
    with pytest.raises(ControlError, match=r"DISK.*beyond the disk's 10 blocks"):
        bad.next_event()


def test_sender_sends_data_blocks_first_then_only_dirty_ones(
    hosts: tuple[SimHypervisor, SimHypervisor],
) -> None:
    a, b = hosts
    info = a.create_domain("db", memory_mib=16, disk_mib=1)
    dom = a.disk_of(info.domid)
    sent: list[DiskWrites] = []

    async def go() -> None:
        # blocks written before protection began: the initial synchronisation's job
        path = dom.disk_path
        assert path is not None
        with open(path, "r+b") as f:
            for n in (3, 200):
                f.seek(n * BLOCK_SIZE)
                f.write(b"x" * BLOCK_SIZE)
        sender = DiskSender(dom, sent.append)
        await sender.setup()
        await sender.postsuspend(1)
        assert [n for f in sent for n, _ in f.blocks] == [3, 200] and sent[-1].last
        sent.clear()
        await sender.postsuspend(2)  # nothing written: one empty, final frame
        assert sent == [DiskWrites(2, 256, (), last=True)]
        sent.clear()
        for n in range(100):  # 100 blocks: two frames of at most 64
            os.pwrite(os.open(path, os.O_WRONLY), b"y" * BLOCK_SIZE, n * BLOCK_SIZE)
        dom.disk_dirty()[0:100] = b"\x01" * 100
        await sender.postsuspend(3)
        assert [len(f.blocks) for f in sent] == [64, 36]
        assert [f.last for f in sent] == [False, True]
        assert not any(dom.disk_dirty()[:])  # the marks were taken
        await sender.teardown(True)

        # the replica: applies checkpoint 3 only once its last frame is in
        target = b.create_restore_target(info.config, "db", replica_disk=True)
        replica = DiskReplica(b.disk_of(target.domid))
        replica.receive(sent[0])
        with pytest.raises(TimeoutError):
            await replica.wait(3, 0.05)
        with pytest.raises(DiskReplicaError, match="incomplete"):
            replica.apply(3)
        replica.receive(sent[1])
        await replica.wait(3, 1)
        replica.apply(3)
        rpath = b.disk_of(target.domid).disk_path
        assert rpath is not None and rpath.stat().st_size == 256 * BLOCK_SIZE
        assert rpath.read_bytes()[: 100 * BLOCK_SIZE] == b"y" * (100 * BLOCK_SIZE)
        with pytest.raises(DiskReplicaError, match="already complete"):
            replica.receive(sent[1])
        # a checkpoint cut short: its blocks are dropped at failover, never written
        replica.receive(DiskWrites(4, 256, ((7, b"z" * BLOCK_SIZE),), last=False))
        assert replica.discard() == 1
        assert rpath.read_bytes()[7 * BLOCK_SIZE : 8 * BLOCK_SIZE] == b"y" * BLOCK_SIZE

    asyncio.run(go())


async def _replicate(
    a: SimHypervisor, b: SimHypervisor, disk: bool, writes: int
) -> tuple[Any, list[bytes], RemusPrimary, RemusSecondary]:
    info = a.create_domain("db", memory_mib=16, disk_mib=1)
    s_primary, s_secondary = socket.socketpair()
    c_primary, c_secondary = await pair()
    devices = [DiskSender(a.disk_of(info.domid), c_primary.send)] if disk else []
    primary = RemusPrimary(a, info, s_primary, c_primary, SETTINGS, devices)
    secondary = RemusSecondary(
        b,
        s_secondary,
        c_secondary,
        SETTINGS,
        name="db",
        disk_replica=lambda t: DiskReplica(b.disk_of(t.domid)),
    )
    p_task = asyncio.create_task(primary.run())
    s_task = asyncio.create_task(secondary.run())
    await wait_for(lambda: primary.figures.checkpoints >= 2)
    got = await kv(info.address, [b"PUT k%d v%d" % (i, i) for i in range(writes)])
    assert set(got) == {b"OK"}
    done = primary.figures.checkpoints
    await wait_for(lambda: primary.figures.checkpoints >= done + 2)
    assert primary.session is not None and primary.session.helper is not None
    primary.session.helper.process.kill()  # the primary host dies
    s_primary.close()
    c_primary.close()
    p_task.cancel()
    restored = await asyncio.wait_for(s_task, 20)
    keys = [b"k%d" % i for i in range(writes)]
    return restored, keys, primary, secondary


def test_failover_brings_disk_and_memory_from_the_same_checkpoint(
    hosts: tuple[SimHypervisor, SimHypervisor],
) -> None:
    a, b = hosts

    async def go() -> None:
        restored, keys, _, secondary = await _replicate(a, b, disk=True, writes=300)
        (stats,) = await kv(restored.address, [b"JSTATS"])
        assert stats == b"JOURNAL SEQ 300 RECORDS 300 MEMORY 300 CONSISTENT yes"
        journal = await kv(restored.address, [b"JGET " + k for k in keys])
        assert journal == [b"VALUE v%d" % i for i in range(300)]
        assert secondary.replica is not None and secondary.replica.blocks_applied >= 300 // 8

    asyncio.run(go())


def test_without_disk_replication_the_secondary_disk_lags_its_memory(
    hosts: tuple[SimHypervisor, SimHypervisor],
) -> None:
    """What -d costs: memory says 300 journal records were written, the disk has none."""
    a, b = hosts
    # the secondary host's own copy of the disk, made when the domain was set up there
    (b.host / "disks").mkdir()
    with open(b.host / "disks" / "db.img", "wb") as f:
        f.truncate(1 << 20)

    async def go() -> None:
        restored, _, _, secondary = await _replicate(a, b, disk=False, writes=300)
        assert secondary.replica is None
        (stats,) = await kv(restored.address, [b"JSTATS"])
        assert stats == b"JOURNAL SEQ 0 RECORDS 0 MEMORY 300 CONSISTENT no"

    asyncio.run(go())
