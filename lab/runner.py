"""Boot the nested Xen lab under QEMU and run jobs in its dom0.

The boot files come from ``lab/build.sh`` (cached). A lab host is one QEMU
process: Xen 4.17 (with shadow paging) loaded as a multiboot kernel, Debian's
kernel as dom0 with the whole dom0 root file system as its initramfs, and two
virtio-9p shares: ``lab`` (a work directory, read-write) and ``src`` (a copy of
this checkout taken when the host starts, read-only, mounted at /opt/remus:
every job of a session runs the same code even while the checkout is edited,
as the host's pytest does). dom0's /init (``lab/dom0-init``)
runs every ``jobs/NAME.sh`` the runner drops into the work directory and
leaves ``NAME.out`` and ``NAME.rc`` beside it. Typing into the serial console
loses characters on long lines under TCG; files on 9p do not.

    python -m lab.runner boot                # boot, print timings, power off
    python -m lab.runner run 'xl info'       # boot, run one command, power off

KVM is used when the CPU offers VT-x/AMD-V to us (``vmx``/``svm`` in
/proc/cpuinfo) and /dev/kvm exists; otherwise TCG, where Xen needs
``smap=0 smep=0``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(os.environ.get("REMUS_LAB_CACHE", "/var/cache/remus-lab"))
BOOT_FILES = ("xen", "vmlinuz", "dom0.cpio.gz", "guest.cpio.gz")
# QEMU 7.2's TCG (Debian 12) with `-cpu max` corrupts memory in dom0: glibc's
# AVX2 memcpy miscopied 1 MiB buffers (bytearray -> bytes, sha256 compared)
# within a few dozen tries, which broke the stream data and crashed
# libxl-save-helper; with AVX/AVX2 masked, a Python process still died of heap
# corruption ("free(): corrupted unsorted chunks"). A Nehalem CPU model (SSE4.2,
# no AVX, no newer extensions) ran every job here without corruption.
TCG_CPU = "Nehalem"
# not copied into the lab's snapshot of the checkout
SNAPSHOT_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", ".vagrant", "__pycache__", "*.pyc", ".mypy_cache", ".ruff_cache",
    ".pytest_cache", ".hypothesis", "*.egg-info", "build", "bench-out",
)  # fmt: skip


class LabError(Exception):
    pass


def missing() -> str | None:
    """Why the lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "the nested Xen lab needs root (debootstrap, chroot)"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (Debian package qemu-system-x86)"
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        avail = 0
    if avail < 4 * 1024 * 1024:
        return f"the lab needs 4 GiB of free memory, {avail // 1024} MiB available"
    return None


def accelerator() -> str:
    forced = os.environ.get("REMUS_LAB_ACCEL")
    if forced:
        return forced
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if os.path.exists("/dev/kvm") and (" vmx" in flags or " svm" in flags):
        return "kvm"
    return "tcg"


def build(cache: Path = DEFAULT_CACHE) -> Path:
    """Run lab/build.sh (a no-op when its cache is current)."""
    env = dict(os.environ, REMUS_LAB_CACHE=str(cache))
    r = subprocess.run(
        ["bash", str(REPO / "lab" / "build.sh")], env=env, stdout=subprocess.PIPE, text=True
    )
    if r.returncode != 0:
        raise LabError(f"lab/build.sh failed with status {r.returncode}")
    return cache


@dataclass
class JobResult:
    name: str
    rc: int
    output: str
    seconds: float

    def check(self) -> JobResult:
        if self.rc != 0:
            raise LabError(f"job {self.name} failed with status {self.rc}:\n{self.output[-4000:]}")
        return self


class Job:
    def __init__(self, lab: Lab, name: str) -> None:
        self.lab, self.name = lab, name
        self.started = time.monotonic()

    @property
    def _base(self) -> Path:
        return self.lab.workdir / "jobs" / self.name

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return (self._base.with_suffix(".out")).read_text(errors="replace")
        return ""

    def done(self) -> bool:
        return self._base.with_suffix(".rc").exists()

    def wait(self, timeout: float) -> JobResult:
        deadline = time.monotonic() + timeout
        rc_file = self._base.with_suffix(".rc")
        while not rc_file.exists():
            if self.lab.proc is not None and self.lab.proc.poll() is not None:
                raise LabError(f"the lab host died while job {self.name} ran:\n{self.lab.tail()}")
            if time.monotonic() > deadline:
                raise LabError(
                    f"job {self.name} still running after {timeout:g} s:\n{self.output()[-4000:]}"
                )
            time.sleep(0.1)
        rc = int(rc_file.read_text().strip() or "255")
        return JobResult(self.name, rc, self.output(), time.monotonic() - self.started)


class Lab:
    """One nested Xen host."""

    def __init__(
        self,
        workdir: Path,
        cache: Path = DEFAULT_CACHE,
        memory_mib: int = 3072,
        dom0_mib: int = 1536,
        smp: int = 2,
    ) -> None:
        self.workdir, self.cache = workdir, cache
        self.memory_mib, self.dom0_mib, self.smp = memory_mib, dom0_mib, smp
        self.src = workdir / "src"
        self.proc: subprocess.Popen[bytes] | None = None
        self.boot_seconds = 0.0
        self._jobs = 0

    def command(self) -> list[str]:
        c = self.cache
        accel = accelerator()
        xen_args = (
            f"console=com1 com1=115200,8n1 dom0_mem={self.dom0_mib}M,max:{self.dom0_mib}M "
            "loglvl=all guest_loglvl=all"
        )
        if accel == "tcg":
            # TCG's CPU model offers SMAP/SMEP but Xen's use of them faults under it
            xen_args += " smap=0 smep=0"
        dom0_args = "console=hvc0 earlyprintk=xen rdinit=/init"
        return [
            "qemu-system-x86_64",
            "-accel", accel,
            "-cpu", os.environ.get("REMUS_LAB_CPU") or ("host" if accel == "kvm" else TCG_CPU),
            "-smp", str(self.smp),
            "-m", str(self.memory_mib),
            "-kernel", str(c / "xen"),
            "-append", xen_args,
            "-initrd", f"{c / 'vmlinuz'} {dom0_args},{c / 'dom0.cpio.gz'}",
            "-virtfs",
            f"local,path={self.workdir},mount_tag=lab,security_model=none,id=lab",
            "-virtfs",
            f"local,path={self.src},mount_tag=src,security_model=none,id=src,readonly=on",
            "-display", "none", "-monitor", "none", "-no-reboot", "-nic", "none",
            "-serial", f"file:{self.workdir / 'console.log'}",
        ]  # fmt: skip

    def start(self, timeout: float = 300.0) -> None:
        for name in BOOT_FILES:
            if not (self.cache / name).exists():
                raise LabError(f"{self.cache / name} is missing: run lab/build.sh")
        self.workdir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.workdir / "jobs", ignore_errors=True)
        (self.workdir / "jobs").mkdir()
        with contextlib.suppress(FileNotFoundError):
            (self.workdir / "ready").unlink()
        # the code dom0 runs: this checkout as it is now, not as it is edited later
        shutil.rmtree(self.src, ignore_errors=True)
        shutil.copytree(REPO, self.src, symlinks=True, ignore=SNAPSHOT_IGNORE)
        guest = self.workdir / "guest"
        guest.mkdir(exist_ok=True)
        for name in ("vmlinuz", "guest.cpio.gz"):
            shutil.copyfile(self.cache / name, guest / name)
        started = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=open(self.workdir / "qemu.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        while not (self.workdir / "ready").exists():
            if self.proc.poll() is not None:
                raise LabError(f"QEMU exited with status {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() - started > timeout:
                self.stop(grace=0)
                raise LabError(f"dom0 not ready after {timeout:g} s:\n{self.tail()}")
            time.sleep(0.2)
        self.boot_seconds = time.monotonic() - started

    def tail(self, n: int = 60) -> str:
        text = ""
        for name in ("qemu.log", "console.log", "dom0-boot.log"):
            with contextlib.suppress(OSError):
                lines = (self.workdir / name).read_text(errors="replace").splitlines()
                text += f"--- {name}\n" + "\n".join(lines[-n:]) + "\n"
        return text

    def submit(self, script: str, name: str | None = None) -> Job:
        self._jobs += 1
        name = name or f"job{self._jobs:03d}"
        tmp = self.workdir / "jobs" / f".{name}.tmp"
        tmp.write_text("set -u\n" + script)
        tmp.rename(self.workdir / "jobs" / f"{name}.sh")  # the agent never sees half a script
        return Job(self, name)

    def run(self, script: str, timeout: float = 120.0, name: str | None = None) -> JobResult:
        return self.submit(script, name).wait(timeout)

    def stop(self, grace: float = 20.0) -> None:
        if self.proc is None:
            return
        (self.workdir / "jobs").mkdir(exist_ok=True)
        (self.workdir / "jobs" / "poweroff").touch()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m lab.runner")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/remus-lab"))
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build")
    sub.add_parser("boot")
    run = sub.add_parser("run")
    run.add_argument("script", nargs="+")
    args = p.parse_args()
    why = missing()
    if why:
        print(f"lab: {why}", file=sys.stderr)
        return 2
    build(args.cache)
    if args.cmd == "build":
        return 0
    lab = Lab(args.workdir, args.cache)
    print("qemu:", shlex.join(lab.command()), file=sys.stderr)
    with lab:
        print(f"dom0 ready after {lab.boot_seconds:.1f} s ({accelerator()})")
        if args.cmd == "run":
            r = lab.run(" ".join(args.script), timeout=600)
            print(r.output, end="")
            print(f"[status {r.rc}, {r.seconds:.1f} s]")
            return r.rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
