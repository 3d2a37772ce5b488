"""How the helper is started: argv, fds 0-2 dup'ed, close-on-exec cleared,
blocking mode, and no other fd of ours leaking into it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROBE = Path(__file__).with_name("fd_probe.py")

# Runs in a child so that it can put a stream socket on its own fd 0.
SCRIPT = r"""
import asyncio, json, os, socket, sys
from orchestrator.savehelper import (Callbacks, HelperSession, Mode, SaveArgs, RestoreArgs,
    StreamType)
a, b = socket.socketpair()
a.setblocking(False)
os.dup2(a.fileno(), 0)            # the caller's stream fd is 0: libxl must dup it
leak = os.open("/dev/null", os.O_RDONLY)
os.set_inheritable(leak, True)    # an inheritable fd of ours that must not reach the helper
back_r, back_w = os.pipe()
mode = sys.argv[1]
async def go():
    if mode == "save":
        s = HelperSession(Mode.SAVE, Callbacks(suspend=None))
        args = SaveArgs(7, 184, StreamType.REMUS, 1)
    else:
        s = HelperSession(Mode.RESTORE, Callbacks())
        args = RestoreArgs(7, 888, StreamType.COLO, 1, 0, 2, 0)
    try:
        await s.run(0, back_r, args, helper=sys.argv[2])
    except Exception:
        pass
    print(json.dumps({"report": s.result.logs[0].text, "leak": leak, "back": back_r,
                      "stream_blocking": os.get_blocking(0)}))
asyncio.run(go())
"""


def probe(mode: str) -> dict[str, object]:
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, str(PROBE)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    out.update(json.loads(out.pop("report")))  # type: ignore[arg-type]
    return out


def test_save_argv_and_fds() -> None:
    p = probe("save")
    argv = p["argv"]
    assert isinstance(argv, list)
    io_fd, back_fd = int(argv[1]), int(argv[2])
    assert argv[0] == "--save-domain" and argv[3:] == ["7", "1", "184", "1"]
    assert io_fd > 2  # fd 0 was dup'ed to a free number
    assert back_fd == p["back"]
    fds = p["fds"]
    assert isinstance(fds, dict)
    assert set(fds) == {"0", "1", "2", str(io_fd), str(back_fd)}  # nothing else leaked
    for fd in (io_fd, back_fd):
        assert not fds[str(fd)]["cloexec"] and not fds[str(fd)]["nonblock"]
    assert fds[str(io_fd)]["target"].startswith("socket:")
    assert fds["0"]["target"].startswith("pipe:") and fds["1"]["target"].startswith("pipe:")
    assert p["stream_blocking"] is True  # O_NONBLOCK is cleared on the shared description


def test_restore_argv() -> None:
    p = probe("restore")
    argv = p["argv"]
    assert isinstance(argv, list)
    assert argv[0] == "--restore-domain"
    assert argv[3:] == ["7", "1", "0", "2", "0", "888", "2"]
    assert int(argv[1]) > 2
