"""Self-fencing of the primary copy when the primary orchestrator dies.

`xl remus` has none: kill it and the secondary takes over while the primary
domain either keeps running (two copies of the guest serving) or stays
suspended, depending on the moment (measured in the nested lab, protocol
notes 8). We run a small guard process beside every Xen primary. It holds
the read end of a pipe whose write end only the primary has, and learns two
things through it:

* ``P`` (pending): the end of the first checkpoint went out, so the secondary
  may hold a complete copy, and we cannot know whether it does until its ACK;
* ``A`` (armed): the secondary ACKed a checkpoint, so it holds a complete
  copy and will take over once our heartbeats stop;
* ``D`` (disarmed): replication ended on purpose (unprotect, or the secondary
  is gone), the domain stays here.

End of file without ``D`` means the primary died. If armed, the guard pauses
the domain at once (well inside the secondary's heartbeat timeout, so the two
copies never run together), writes a marker that remusd's worker rescue
honours, and destroys it. If only pending, it pauses the domain and leaves it
paused: a paused copy is not a second running one, and it is still there if
the secondary turns out to have nothing (the administrator unpauses or
destroys it). If neither, there is nothing to fail over to: the guard resumes
the guest if it was left suspended.

The decision itself is :func:`decide`, a pure function of what the pipe said
and the domain's state, tested without a hypervisor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from ..hypervisors.base import DomainNotFound, HypervisorError
from ..hypervisors.select import open_hypervisor


class Action(enum.Enum):
    NOTHING = "nothing"
    RESUME = "resume"  # not armed, and the guest was left suspended
    UNPAUSE = "unpause"  # not armed, and the guest was left paused
    FENCE = "fence"  # armed: pause now, then destroy
    HOLD = "hold"  # pending: pause and leave paused


def decide(said: bytes, state: str, shutdown_reason: str) -> Action:
    """What to do once the pipe ends; ``said`` is every byte the primary wrote."""
    if said.endswith(b"D"):
        return Action.NOTHING
    if b"A" in said:
        return Action.FENCE
    if b"P" in said:
        return Action.HOLD
    if state == "shutdown" and shutdown_reason == "suspend":
        return Action.RESUME
    if state == "paused":
        return Action.UNPAUSE
    return Action.NOTHING


def marker_path(status_dir: Path, name: str) -> Path:
    return status_dir / f"{name}.fenced"


def _guard_lock(status_dir: Path, name: str) -> int:
    return os.open(status_dir / f"{name}.guard", os.O_RDONLY | os.O_CREAT, 0o600)


def guard_alive(status_dir: Path, name: str) -> bool:
    """A guard for ``name`` still runs: it acts once the worker's pipe ends (pause,
    destroy), and remusd's rescue must not race it. Each guard holds a shared lock
    on ``NAME.guard`` for its life (the kernel drops it when the guard dies)."""
    try:
        fd = _guard_lock(status_dir, name)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


class FenceGuard:
    """The primary's end: spawn the guard, arm it, disarm it."""

    def __init__(self, backend: str, domid: int, name: str, status_dir: Path) -> None:
        self.armed = self.sent_pending = False
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "orchestrator.protection.fence",
                "--backend", backend, "--domid", str(domid), "--name", name,
                "--status-dir", str(status_dir),
            ],
            stdin=subprocess.PIPE,
            start_new_session=True,  # a kill of our process group must not take it too
        )  # fmt: skip
        assert self.proc.stdin is not None
        self._pipe: IO[bytes] = self.proc.stdin

    def _say(self, byte: bytes) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._pipe.write(byte)
            self._pipe.flush()

    def pending(self) -> None:
        if not self.sent_pending:
            self.sent_pending = True
            self._say(b"P")

    def arm(self) -> None:
        if not self.armed:
            self.armed = True
            self._say(b"A")

    def disarm(self) -> None:
        self._say(b"D")
        with contextlib.suppress(OSError, ValueError):
            self._pipe.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def _log(msg: str) -> None:
    print(f"remus-fence[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.protection.fence")
    p.add_argument("--backend", default="xen")
    p.add_argument("--domid", type=int, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--status-dir", type=Path, required=True)
    args = p.parse_args(argv)
    with contextlib.suppress(OSError):  # held until this process ends: guard_alive()
        fcntl.flock(_guard_lock(args.status_dir, args.name), fcntl.LOCK_SH)
    # connect and look the domain up before waiting: once the pipe ends, the pause
    # must land well inside the secondary's heartbeat timeout, and starting a
    # hypervisor connection then took seconds under emulation
    # by the name the primary's backend gave (Hypervisor.name); a simulated host
    # comes from $REMUS_SIM_HOST, which the guard inherits
    hv = open_hypervisor(args.backend)
    said = b""
    while chunk := os.read(0, 64):
        said = (said + chunk)[-64:]
    started = time.monotonic()
    if said.endswith(b"D"):
        return 0
    paused_ms = None
    if b"A" in said or b"P" in said:
        # pause before anything else: Xen does not hand out a domid again soon, so
        # this is still our domain; the name is checked right after
        try:
            hv.pause(args.domid)
            paused_ms = 1000 * (time.monotonic() - started)
        except HypervisorError as exc:
            _log(f"pause of domain {args.domid} failed: {exc}")
    try:
        info = hv.lookup(args.domid)
    except DomainNotFound:
        return 0
    if info.name != args.name:
        if paused_ms is not None:
            hv.unpause(args.domid)
        return 0  # the domid was reused: not ours to touch
    action = decide(said, info.state, info.shutdown_reason)
    try:
        if action is Action.FENCE:
            with contextlib.suppress(OSError):
                marker_path(args.status_dir, args.name).write_text(
                    f"{args.domid} {time.time():.3f}\n"
                )
            _log(
                f"primary died with the secondary holding a checkpoint: domain {args.name} "
                f"({args.domid}) paused {paused_ms or 0:.1f} ms after, destroying it"
            )
            hv.destroy(args.domid)
        elif action is Action.HOLD:
            with contextlib.suppress(OSError):
                marker_path(args.status_dir, args.name).write_text(f"{args.domid} held\n")
            _log(
                f"primary died while the secondary's first checkpoint was unconfirmed: "
                f"domain {args.name} ({args.domid}) left PAUSED; if the secondary did not take "
                f"over, `xl unpause {args.domid}`, else `xl destroy {args.domid}`"
            )
        elif action is Action.RESUME:
            _log(f"primary died before any checkpoint was ACKed: resuming {args.name}")
            asyncio.run(hv.resume(args.domid))
        elif action is Action.UNPAUSE:
            _log(f"primary died before any checkpoint was ACKed: unpausing {args.name}")
            hv.unpause(args.domid)
    except HypervisorError as exc:
        _log(f"{action.value} of {args.name} failed: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
