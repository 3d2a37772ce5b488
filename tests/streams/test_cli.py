"""`remusctl stream verify|dump|generate` as a real process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REMUSCTL = [sys.executable, "-m", "orchestrator.cli"]
XEN_VERIFY = Path("/usr/lib/xen-4.17/bin/verify-stream-v2")


def remusctl(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*REMUSCTL, *args], input=stdin, capture_output=True, timeout=60)


@pytest.fixture
def remus_stream(tmp_path: Path) -> Path:
    path = tmp_path / "remus.xl"
    r = remusctl(
        "stream",
        "generate",
        str(path),
        "--stream-type",
        "remus",
        "--checkpoints",
        "5",
        "--pages",
        "64",
    )
    assert r.returncode == 0, r.stderr
    return path


def test_verify_ok_and_json(remus_stream: Path) -> None:
    r = remusctl("stream", "verify", str(remus_stream))
    assert r.returncode == 0
    assert b"checkpoints:   6" in r.stdout
    j = json.loads(remusctl("stream", "verify", "--json", str(remus_stream)).stdout)
    assert j["ok"] and j["checkpoints"] == 6 and j["stream_type"] == "remus"
    assert j["records"]["libxl CHECKPOINT_END (0x4)"] == 6


def test_verify_from_stdin(remus_stream: Path) -> None:
    r = remusctl("stream", "verify", "-", stdin=remus_stream.read_bytes())
    assert r.returncode == 0, r.stderr


def test_bad_stream_is_one_line_no_traceback(remus_stream: Path) -> None:
    data = bytearray(remus_stream.read_bytes())
    data[200] ^= 0xFF
    r = remusctl("stream", "verify", "-", stdin=bytes(data[:-5]))
    assert r.returncode == 1
    err = r.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("-: offset ")
    assert "Traceback" not in err


def test_truncated_gives_offset_and_failover(remus_stream: Path) -> None:
    data = remus_stream.read_bytes()
    r = remusctl("stream", "verify", "-", stdin=data[: len(data) - 20])
    assert r.returncode == 1
    assert b"stream truncated" in r.stderr and b"fail over to checkpoint" in r.stderr


def test_dump_one_line_per_record(remus_stream: Path) -> None:
    r = remusctl("stream", "dump", str(remus_stream))
    assert r.returncode == 0
    lines = r.stdout.decode().splitlines()
    assert lines[0].split()[:3] == ["0", "xl", "savefile"]
    assert sum(" CHECKPOINT_END " in x for x in lines) == 6
    assert any("PAGE_DATA" in x and "count=64 pages=64" in x for x in lines)
    assert lines[-1].endswith("(checkpoint boundary)")


def test_missing_file_is_exit_2() -> None:
    r = remusctl("stream", "verify", "/nonexistent/stream")
    assert r.returncode == 2 and b"No such file" in r.stderr


@pytest.mark.skipif(
    not XEN_VERIFY.exists(),
    reason="Xen's verify-stream-v2 missing: install Debian's xen-utils-4.17",
)
@pytest.mark.parametrize(
    ("layer", "domain"), [("xl", "pv"), ("libxl", "pv"), ("libxc", "hvm"), ("libxc", "pv")]
)
def test_xen_own_verifier_accepts_our_plain_streams(
    tmp_path: Path, layer: str, domain: str
) -> None:
    path = tmp_path / "s"
    assert (
        remusctl(
            "stream", "generate", str(path), "--layer", layer, "--domain", domain, "--pages", "2100"
        ).returncode
        == 0
    )
    env = dict(os.environ, PYTHONPATH="/usr/lib/xen-4.17/lib/python")
    python = shutil.which("python3", path="/usr/bin") or "python3"
    r = subprocess.run(
        [python, str(XEN_VERIFY), "-f", layer, "-i", str(path)],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
