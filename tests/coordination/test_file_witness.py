"""The file:// witness across real processes: fcntl lock semantics as a lease."""

from __future__ import annotations

import asyncio
import math
import signal
from pathlib import Path

import pytest

from orchestrator.coordination import (
    LeaseKeeper,
    LeaseState,
    ToozWitness,
    WitnessError,
    open_witness,
)
from tests.coordination.proc import Holder

NAME = "vm1"


def test_file_witness_across_processes(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/witness"
    holder = Holder(url, "hostA", NAME, 1.0)
    try:
        holder.wait_for("state", "held")

        async def go() -> None:
            b = await open_witness(url, "hostB", 1.0)
            assert not b.expires and b.lease_ttl_s == math.inf
            try:
                assert not await b.try_acquire(NAME)

                # a stopped holder keeps its lock: nobody takes over
                holder.signal(signal.SIGSTOP)
                await asyncio.sleep(1.5)  # longer than the TTL: it does not matter here
                assert not await b.try_acquire(NAME)
                holder.signal(signal.SIGCONT)
                holder.send("renew")
                said = holder.wait_for("renew", True)
                assert said["state"] == "held"

                # a dead holder loses it at once
                holder.signal(signal.SIGKILL)
                holder.proc.wait(5)
                assert await b.try_acquire(NAME)
                assert await b.renew()
                await b.release(NAME)
                assert b.held_names() == []
            finally:
                await b.stop()

        asyncio.run(go())
    finally:
        holder.close()


def test_file_keeper_and_replaced_lock_file(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/w"

    async def go() -> None:
        a = await open_witness(url, "hostA", 1.0)
        changes: list[LeaseState] = []
        keeper = LeaseKeeper(a, NAME, 1.0, on_change=lambda s, r: changes.append(s))
        try:
            assert await keeper.acquire(1.0)
            assert keeper.valid_until == math.inf and keeper.can_release(10.0)
            # the lock file replaced under us: a new inode is a free lock for
            # anyone, so we can no longer claim it
            lock = tmp_path / "w" / f"remus-{NAME}"
            lock.unlink()
            lock.touch()
            for _ in range(100):
                if keeper.state is LeaseState.LOST:
                    break
                await asyncio.sleep(0.02)
            assert keeper.state is LeaseState.LOST and keeper.must_fence(0.0)
            assert changes == [LeaseState.HELD, LeaseState.LOST]
        finally:
            await keeper.stop()
            await a.stop()

    asyncio.run(go())


def test_bad_urls_and_names(tmp_path: Path) -> None:
    with pytest.raises(WitnessError, match="unknown scheme"):
        ToozWitness("redis://localhost", "m")
    with pytest.raises(WitnessError, match="ABSOLUTE"):
        ToozWitness("file://relative/dir", "m")

    async def go() -> None:
        with pytest.raises(WitnessError, match=r"etcd3\+http://127.0.0.1:1"):
            await open_witness("etcd3+http://127.0.0.1:1", "m", 2.0)
        w = await open_witness(f"file://{tmp_path}", "m")
        try:
            with pytest.raises(WitnessError, match="bad protection name"):
                await w.try_acquire("../escape")
        finally:
            await w.stop()

    asyncio.run(go())
