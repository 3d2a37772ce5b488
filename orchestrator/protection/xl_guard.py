"""Keeps `xl migrate-receive -r -e` from failing over when the secondary dies.

xl treats the end of its input as the primary's failure: it builds the domain
from the last complete checkpoint and, with ``-e``, unpauses it. Its input is
a pipe from the secondary's orchestrator, and when that process dies the
kernel closes the pipe: xl would then start a copy of the guest while the
primary still runs it (the primary only sees its link end and runs on), and
ACKed checkpoints that were still queued for xl would be lost with it.

So xl's input must end only when the orchestrator means it to. A guard process
is started beside xl with a duplicate of the pipe's write end (``pass_fds``),
which it holds and never writes, so the pipe outlives the orchestrator. The
guard reads its own stdin, a pipe from the orchestrator, to its end:

* when the orchestrator ends xl's input on purpose (failover), it kills the
  guard before it closes its own end: the guard's end of xl's pipe goes with
  it, and the orchestrator's close is then the last one. When it drops the
  copy, it kills xl and then the guard, which has nothing left to guard;
* an end of file on the guard's stdin means the orchestrator died. The guard
  kills xl (through a pidfd opened at start, so never another process that
  got the pid), destroys the half-restored ``NAME--incoming`` domain xl leaves
  behind, and only then lets the pipe go. xl never reads an end of input, so
  there is no takeover: the primary runs on, unprotected, as it should.

The duplicate is inherited at fork, before this module even runs: there is no
moment after xl's start at which the orchestrator's death would reach xl as
an end of input.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import subprocess
import sys

from ..hypervisors.base import Hypervisor, HypervisorError
from ..hypervisors.select import open_hypervisor


def _log(msg: str) -> None:
    print(f"remus-xl-guard[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


class XlGuard:
    """The orchestrator's end: the guard process and what to tell it."""

    def __init__(self, backend: str, xl_pid: int, stdin_fd: int, incoming: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "orchestrator.protection.xl_guard",
                "--backend", backend, "--xl-pid", str(xl_pid), "--fd", str(stdin_fd),
                "--incoming", incoming,
            ],
            stdin=subprocess.PIPE,
            pass_fds=(stdin_fd,),
            start_new_session=True,  # a kill of our process group must not take it too
        )  # fmt: skip

    def let_go(self) -> None:
        """xl's input ends on purpose (or xl is killed): the guard's end goes first.
        Killed, not asked: its end of the pipe closes with it, at once, even while
        it is still starting (seconds under emulation)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.protection.xl_guard")
    p.add_argument("--backend", default="xen")
    p.add_argument("--xl-pid", type=int, required=True)
    p.add_argument("--fd", type=int, required=True, help="xl's stdin, held, never written")
    p.add_argument("--incoming", required=True, help="the domain xl restores: NAME--incoming")
    args = p.parse_args(argv)
    try:
        xl = os.pidfd_open(args.xl_pid)
    except ProcessLookupError:
        os.close(args.fd)
        return 0  # xl is gone already: nothing can fail over
    # connected before the wait: once the orchestrator is gone, xl's domain must go
    # without a hypervisor connection's start-up first (seconds under emulation)
    try:
        hv: Hypervisor | None = open_hypervisor(args.backend)
    except HypervisorError as exc:  # xl is still ours to stop; its domain may stay
        _log(f"no {args.backend} hypervisor ({exc}): a half-restored domain stays")
        hv = None
    while os.read(0, 64):
        pass  # nothing is said: only the end matters (the orchestrator is gone)
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(xl, signal.SIGKILL)
    # the pidfd turns readable once xl has exited: its libxl calls are over
    select.select([xl], [], [], 10.0)
    _log(f"the secondary's orchestrator died: xl ({args.xl_pid}) killed before it could fail over")
    if hv is None:
        os.close(args.fd)
        return 1
    try:
        # by the list, not lookup(): a half-built domain has no libxl configuration
        # for `xl list -l` to print, and only its domid is needed here
        for info in hv.list_domains():
            if info.name == args.incoming:
                hv.destroy(info.domid)
                _log(f"destroyed the half-restored domain {args.incoming} ({info.domid})")
    except Exception as exc:  # the pipe must still be let go below
        _log(f"could not destroy {args.incoming}: {type(exc).__name__}: {exc}")
    os.close(args.fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
