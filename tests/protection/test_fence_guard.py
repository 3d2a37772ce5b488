"""remusd's rescue waits for a running fence guard: guard_alive() sees one by its lock."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from orchestrator.protection.fence import guard_alive


def test_a_guard_is_alive_while_it_runs_and_not_once_it_ends(tmp_path: Path) -> None:
    assert not guard_alive(tmp_path, "vm1")
    guard = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.protection.fence", "--backend", "sim",
         "--domid", "1", "--name", "vm1", "--status-dir", str(tmp_path)],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    assert guard.stdin is not None
    try:
        deadline = time.monotonic() + 20
        while not guard_alive(tmp_path, "vm1") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert guard_alive(tmp_path, "vm1")
        assert not guard_alive(tmp_path, "vm2")  # another protection's guard
    finally:
        guard.stdin.write(b"D")  # disarmed: it ends, touching nothing
        guard.stdin.close()
        assert guard.wait(20) == 0
    assert not guard_alive(tmp_path, "vm1")
