"""Shared test fixtures."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from orchestrator.hypervisors.sim import SimHypervisor
from orchestrator.streams.synth import Chunk

from .etcd import EtcdServer
from .hostlab import HostLab
from .hostlab import unavailable as hostlab_unavailable
from .tlshosts import trust_each_other


def join(chunks: Iterable[Chunk]) -> bytes:
    return b"".join(bytes(c) for c in chunks)


def stream_file(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[SimHypervisor, SimHypervisor]]:
    """Two simulated hosts that trust each other (mutual TLS is the link's default); every
    domain left on them is destroyed afterwards."""
    a, b = SimHypervisor(tmp_path / "hostA"), SimHypervisor(tmp_path / "hostB")
    trust_each_other(a, b)
    yield a, b
    for hv in (a, b):
        for d in hv.list_domains():
            hv.destroy(d.domid)


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    binary = shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)
    if binary is None:
        pytest.skip("no etcd binary: apt-get install etcd-server (Debian's etcd)")
    server = EtcdServer(binary, tmp_path / "etcd-data")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def hostlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostLab]:
    """Hosts A and B in network namespaces of their own, cut apart at will, with a real
    etcd each reaches over its own path (tests/hostlab.py); one per test module, reset
    by the tests between runs (HostLab.reset)."""
    why = hostlab_unavailable()
    if why:
        pytest.skip(f"host lab: {why}")
    with HostLab(tmp_path_factory.mktemp("hostlab")) as lab:
        yield lab
