"""The main job on the embedded default (`./dev demo`).

Until the Remus protection demo lands, this shows what the product stands
on, with real processes: a simulated domain whose key-value service keeps
its data in guest memory is saved through the save-helper boundary (our
simulated libxl-save-helper, selected with LIBXL_SAVE_HELPER exactly as libxl
selects Xen's), the file is checked with `remusctl stream verify`, and the
domain is restored on a second simulated host where its data is still there.
"""

from __future__ import annotations

import asyncio
import io
import socket
import sys
import tempfile
import time
from pathlib import Path

from .hypervisors.sim import SimHypervisor
from .saverestore import restore_domain, save_domain
from .streams.fileio import verify_file

KEYS = 2000


def talk(address: str, lines: list[bytes]) -> list[bytes]:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as s, s.makefile("rwb") as f:
        f.write(b"".join(line + b"\n" for line in lines))
        f.flush()
        return [f.readline().rstrip(b"\n") for _ in lines]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="remus-demo-") as tmp:
        primary = SimHypervisor(Path(tmp) / "host-a")
        secondary = SimHypervisor(Path(tmp) / "host-b")
        print(f"== two simulated hosts in {tmp} (network namespaces: {primary.use_netns})")
        info = primary.create_domain("demo-guest", memory_mib=64)
        print(f"== created {info.name} (domid {info.domid}) on host-a, service at {info.address}")
        t0 = time.perf_counter()
        replies = talk(info.address, [b"PUT user%d balance=%d" % (i, i * 7) for i in range(KEYS)])
        assert set(replies) == {b"OK"}
        print(f"   wrote {KEYS} keys in {time.perf_counter() - t0:.2f} s")
        path = Path(tmp) / "demo-guest.xl"
        t0 = time.perf_counter()
        report = asyncio.run(save_domain(primary, info.name, path))
        print(
            f"== xl-style save through the helper boundary: {report.bytes} bytes in "
            f"{time.perf_counter() - t0:.2f} s; the domain is gone from host-a "
            f"({len(primary.list_domains())} domains left)"
        )
        with io.FileIO(path, "rb") as f:
            print("== remusctl stream verify:")
            print("   " + verify_file(f).render().replace("\n", "\n   "))
        t0 = time.perf_counter()
        restored = asyncio.run(restore_domain(secondary, path, "demo-guest-restored"))
        print(
            f"== restored on host-b as {restored.name} in {time.perf_counter() - t0:.2f} s, "
            f"service at {restored.address}"
        )
        got = talk(restored.address, [b"GET user%d" % i for i in range(KEYS)] + [b"STATS"])
        ok = got[:-1] == [b"VALUE balance=%d" % (i * 7) for i in range(KEYS)]
        print(
            f"   read back {KEYS} keys: {'all unchanged' if ok else 'MISMATCH'}; {got[-1].decode()}"
        )
        secondary.destroy(restored.domid)
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
