"""End to end: protect, write, kill the primary at a random moment, fail over.

Real processes (`remusctl receive` and `remusctl protect`), real sockets,
real guest processes in network namespaces, NFQUEUE holding the guest's
output on the primary. With buffering no acknowledged write may ever be
lost; without it (-n -F) some are, which is the point of buffering.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from orchestrator.demo import run_demo
from orchestrator.devices.netbuf_nfqueue import nfqueue_available

RUNS = int(os.environ.get("REMUS_E2E_RUNS", "100"))

needs_root_and_nfqueue = pytest.mark.skipif(
    os.geteuid() != 0 or nfqueue_available() is not None,
    reason="needs root (network namespaces, iptables) and NFQUEUE: "
    + (nfqueue_available() or "not root"),
)


@needs_root_and_nfqueue
@pytest.mark.timeout(60 + 12 * RUNS)  # about 3 s a run; the suite's 300 s default is too short
def test_no_acknowledged_write_is_lost_over_many_random_kills(tmp_path: Path) -> None:
    lost_runs = []
    torn_runs = []
    total_acked = 0
    for run in range(RUNS):
        report = asyncio.run(
            run_demo(duration=0.6, interval_ms=20, clients=4, progress=False, workdir=tmp_path)
        )
        total_acked += report.writes_acknowledged
        assert report.checkpoints >= 2
        if report.acknowledged_writes_lost:
            lost_runs.append((run, report.acknowledged_writes_lost, report.lost_keys_sample))
        if not report.disk_consistent:
            torn_runs.append((run, report.disk_journal))
    assert lost_runs == [], f"acknowledged writes lost in {len(lost_runs)} of {RUNS} runs"
    assert torn_runs == [], f"disk and memory from different instants: {torn_runs}"
    assert total_acked > RUNS * 10  # the clients really were writing


@needs_root_and_nfqueue
def test_without_buffering_acknowledged_writes_can_be_lost(tmp_path: Path) -> None:
    losses = []
    for _ in range(5):
        report = asyncio.run(
            run_demo(
                duration=1.5,
                interval_ms=200,
                netbuf=False,
                clients=4,
                progress=False,
                workdir=tmp_path,
            )
        )
        losses.append(report.acknowledged_writes_lost)
        if report.acknowledged_writes_lost:
            break
    assert any(losses), f"no loss in {len(losses)} runs without buffering: {losses}"


@pytest.mark.skipif(os.geteuid() != 0, reason="the demo's guests need network namespaces (root)")
def test_userspace_proxy_buffer_loses_no_acknowledged_write(tmp_path: Path) -> None:
    for _ in range(10):
        report = asyncio.run(
            run_demo(
                duration=0.6,
                interval_ms=20,
                clients=4,
                progress=False,
                workdir=tmp_path,
                netbuf_mode="proxy",
            )
        )
        assert report.netbuf_device == "proxy"
        assert report.acknowledged_writes_lost == 0, report.lost_keys_sample
