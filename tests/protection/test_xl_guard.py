"""The secondary's xl guard (protection/xl_guard.py), with real processes.

xl itself cannot run here (no Xen: tests/nested runs it). What the guard must
do does not depend on what the reader of the pipe is: a process that acts on
the end of its input (here `sh`, which writes a file once `cat` sees it) must
never see that end when the process that feeds it dies, and must see it when
that process closes the pipe on purpose. The half-restored domain the guard
destroys is a simulated host's.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from orchestrator.hypervisors.base import DomainNotFound
from orchestrator.hypervisors.sim import SimHypervisor

ROOT = Path(__file__).resolve().parents[2]

# the orchestrator's part: start the reader and its guard, then either die (as it
# is SIGKILLed) or, told "failover" on stdin, let the guard go and close the pipe
OWNER = textwrap.dedent(
    """
    import subprocess, sys
    from orchestrator.protection.xl_guard import XlGuard
    mark = sys.argv[1]
    reader = subprocess.Popen(["sh", "-c", f"cat > /dev/null; echo end > {mark}"],
                              stdin=subprocess.PIPE)
    guard = XlGuard("sim", reader.pid, reader.stdin.fileno(), "vm--incoming")
    print(reader.pid, guard.proc.pid, flush=True)
    if sys.stdin.readline().strip() == "failover":
        guard.let_go()
        reader.stdin.close()
        reader.wait(20)
        print("done", flush=True)
    """
)


def _owner(tmp_path: Path, hv: SimHypervisor) -> tuple[subprocess.Popen[str], int, int]:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(tmp_path / "end-seen")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "REMUS_SIM_HOST": str(hv.host)},
    )
    assert owner.stdout is not None
    reader, guard = (int(x) for x in owner.stdout.readline().split())
    return owner, reader, guard


def _exits(pid: int, timeout: float) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def test_the_owner_dies_and_the_reader_never_sees_the_end_of_its_input(tmp_path: Path) -> None:
    hv = SimHypervisor(tmp_path / "host")
    hv.create_domain("vm--incoming", memory_mib=4)  # what xl had half restored
    owner, reader, guard = _owner(tmp_path, hv)
    time.sleep(1.0)  # the guard has started (it holds the pipe from its fork on)
    owner.send_signal(signal.SIGKILL)
    owner.wait(10)
    t0 = time.monotonic()
    assert _exits(reader, 20), "the guard did not kill the reader"
    assert _exits(guard, 20), "the guard did not end"
    print(f"\nreader killed {time.monotonic() - t0:.3f} s after its owner's death")
    time.sleep(0.2)
    assert not (tmp_path / "end-seen").exists(), "the reader saw the end of its input"
    try:
        hv.lookup("vm--incoming")
        raise AssertionError("the half-restored domain is still there")
    except DomainNotFound:
        pass


def test_a_failover_lets_the_guard_go_and_the_reader_sees_the_end(tmp_path: Path) -> None:
    hv = SimHypervisor(tmp_path / "host")
    hv.create_domain("vm--incoming", memory_mib=4)
    owner, reader, guard = _owner(tmp_path, hv)
    assert owner.stdin is not None and owner.stdout is not None
    owner.stdin.write("failover\n")
    owner.stdin.flush()
    assert owner.stdout.readline().strip() == "done"
    assert owner.wait(20) == 0
    assert (tmp_path / "end-seen").read_text() == "end\n"
    assert _exits(reader, 5) and _exits(guard, 5)
    assert hv.lookup("vm--incoming").name == "vm--incoming"  # not the guard's to touch
