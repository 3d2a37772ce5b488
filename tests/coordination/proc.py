"""Drive `holder.py` in a child process and read what it says."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


class Holder:
    def __init__(self, url: str, member: str, name: str, ttl: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.coordination.holder", url, member, name, str(ttl)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def drain(self) -> None:
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return

    def wait_for(self, key: str, value: object, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"holder never said {key}={value!r}; said {self.seen[-5:]}")
            try:
                msg = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(msg)
            if msg.get(key) == value:
                return msg

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def last_valid_until(self) -> float | None:
        self.drain()
        vals = [m["valid_until"] for m in self.seen if "valid_until" in m]
        return vals[-1] if vals else None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(5)
