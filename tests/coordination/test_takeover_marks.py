"""Takeover marks on both witnesses: they outlive every lease and every process.

A fenced primary that finds the lease free must know whether a secondary took
over in the meantime (and may have exited since): the mark is what tells it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.coordination import WitnessError, open_witness
from tests.etcd import EtcdServer

MARK_IN_A_CHILD = """
import asyncio, sys
from orchestrator.coordination import open_witness

async def main() -> None:
    w = await open_witness(sys.argv[1], "child", 2.0)
    assert await w.try_acquire("vm1")
    await w.mark_taken_over("vm1", "hostB")
    # exits holding the lease: the kernel (file) or the TTL (etcd) drops it
asyncio.run(main())
"""


async def _marks_outlive_their_maker(url: str) -> None:
    subprocess.run([sys.executable, "-c", MARK_IN_A_CHILD, url], check=True, timeout=60)
    a = await open_witness(url, "hostA", 2.0)
    try:
        assert await a.taken_over("vm1") == ["hostB"]
        assert await a.taken_over("vm2") == []  # per protection
        # the maker is gone; its lease with it (at once on file, after the TTL on etcd)
        for _ in range(100):
            if await a.try_acquire("vm1"):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the dead maker's lease never went")
        assert await a.taken_over("vm1") == ["hostB"]  # the mark did not go with it
        await a.mark_taken_over("vm1", "hostA")
        await a.mark_taken_over("vm1", "hostA")  # idempotent
        assert await a.taken_over("vm1") == ["hostA", "hostB"]
        await a.clear_taken_over("vm1")
        await a.clear_taken_over("vm1")  # idempotent
        assert await a.taken_over("vm1") == []
        with pytest.raises(WitnessError, match="bad protection name"):
            await a.mark_taken_over("vm1", "host/../B")
    finally:
        await a.stop()


def test_file_marks_outlive_their_maker(tmp_path: Path) -> None:
    asyncio.run(_marks_outlive_their_maker(f"file://{tmp_path}/witness"))


def test_etcd_marks_outlive_their_maker(etcd: EtcdServer) -> None:
    asyncio.run(_marks_outlive_their_maker(etcd.url))


def test_marks_unreadable_while_etcd_is_down(etcd: EtcdServer) -> None:
    async def go() -> None:
        a = await open_witness(etcd.url, "hostA", 2.0)
        try:
            await a.mark_taken_over("vm1", "hostB")
            etcd.kill()
            # "cannot tell" is an error, never an empty list a fenced primary
            # would take for "nobody took over"
            with pytest.raises(WitnessError):
                await a.taken_over("vm1")
            etcd.start()
            for _ in range(100):
                try:
                    assert await a.taken_over("vm1") == ["hostB"]  # etcd kept it
                    return
                except WitnessError:
                    await asyncio.sleep(0.1)
            raise AssertionError("etcd never answered again")
        finally:
            await a.stop()

    asyncio.run(go())
