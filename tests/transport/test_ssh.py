"""``--ssh [USER@]HOST[:PORT]``: the target's syntax, fingerprints, the spec's checks,
the CLI's and the API's refusals, the remote command line; and the mux's throughput
through a real sshd on loopback, over paramiko and over OpenSSH's client.

Protections over SSH (protect, failover, refusals) run in tests/protection/test_ssh.py.
"""

from __future__ import annotations

import asyncio
import base64
import random
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.protection.remote import receive_args, receive_command
from orchestrator.protection.spec import ProtectionSpec, SpecError, api_schema
from orchestrator.transport.control import Ack, Hello
from orchestrator.transport.controlio import Control
from orchestrator.transport.ssh import open_ssh
from orchestrator.transport.sshtarget import SshTarget, fingerprint, parse_target
from orchestrator.transport.stdio import open_command

from ..sshd import KEYGEN, Sshd, key_fingerprint, keygen
from ..sshd import unavailable as sshd_unavailable
from .stdio_peer import report
from .test_stdio import MIB, Events, _push, peer


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("h", SshTarget("h")),
        ("root@h", SshTarget("h", 22, "root")),
        ("root@h:2222", SshTarget("h", 2222, "root")),
        ("198.19.255.2:2222", SshTarget("198.19.255.2", 2222)),
        ("u@[::1]:2222", SshTarget("::1", 2222, "u")),
        ("[fe80::1]", SshTarget("fe80::1")),
        ("fe80::1", SshTarget("fe80::1")),  # bare IPv6: no port can follow
        ("a@b@h", SshTarget("h", 22, "a@b")),  # as ssh: the last @ ends the user
    ],
)
def test_targets(text: str, want: SshTarget) -> None:
    got = parse_target(text)
    assert got == want
    assert parse_target(str(got)) == got


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("root@", "no host"),
        ("@h", "no user name"),
        ("h:", "no port"),
        ("h:0", "not 1 to 65535"),
        ("h:65536", "not 1 to 65535"),
        ("h:ssh", "not 1 to 65535"),
        ("root@h x", "without spaces"),
        ("-oProxyCommand=x", "does not start with '-'"),
        ("[::1", "bracketed"),
        ("[::1]x", "bracketed"),
        ("[fe80::zz]:22", "not an IPv6 address"),
        ("héte", "ASCII"),
    ],
)
def test_bad_targets_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=r"is not \[USER@\]HOST\[:PORT\]") as err:
        parse_target(text)
    assert says in str(err.value)


def test_known_hosts_name_is_openssh_s() -> None:
    assert parse_target("h").known_hosts_name == "h"
    assert parse_target("u@h:2222").known_hosts_name == "[h]:2222"


def test_fingerprint_is_ssh_keygen_s(tmp_path: Path) -> None:
    if not Path(KEYGEN).exists():
        pytest.skip("no ssh-keygen: apt-get install openssh-client")
    key = keygen(tmp_path / "k")
    blob = base64.b64decode(Path(f"{key}.pub").read_text().split()[1])
    assert fingerprint(blob) == key_fingerprint(Path(f"{key}.pub"))


def test_spec_checks_the_ssh_settings() -> None:
    spec = ProtectionSpec("web", ssh="root@h:2222", ssh_known_hosts="/k", ssh_identity="/i")
    assert ProtectionSpec.from_json(spec.to_json()) == spec
    for values, field, says in (
        ({"ssh": "root@"}, "ssh", "no host"),
        ({"ssh": "h", "peer": "h:8002"}, "ssh", "not both"),
        ({"ssh": "h", "blackhole": True}, "ssh", "blackhole"),
    ):
        with pytest.raises(SpecError) as err:
            ProtectionSpec.from_dict({"name": "web", **values})
        assert err.value.field == field and says in str(err.value)


def test_the_api_takes_ssh_instead_of_peer_and_refuses_a_bad_one() -> None:
    """remusd's POST /v1/protections: the schema lets ssh stand for peer; a bad
    target is the spec's SpecError, which remusd answers with 422 NOT_PROTECTABLE."""
    from jsonschema import Draft202012Validator

    schema = Draft202012Validator(api_schema())
    assert not list(schema.iter_errors({"name": "web", "ssh": "root@h"}))
    assert [e.validator for e in schema.iter_errors({"name": "web"})] == ["required"]
    defaults = ProtectionSpec("defaults")
    spec = ProtectionSpec.from_api({"name": "web", "ssh": "root@h:2222"}, defaults)
    assert spec.ssh == "root@h:2222" and spec.peer == ""
    with pytest.raises(SpecError) as err:
        ProtectionSpec.from_api({"name": "web", "ssh": "root@h:x"}, defaults)
    assert err.value.field == "ssh"


def remusctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True
    )


def test_the_cli_refuses_a_bad_ssh_value_with_status_2(tmp_path: Path) -> None:
    host = str(tmp_path / "host")
    for bad, says in (("root@", "no host"), ("h:99999", "not 1 to 65535")):
        for mode in (["--foreground"], []):  # in this process, or through remusd
            r = remusctl("--host", host, "protect", "web", *mode, "--ssh", bad)
            assert r.returncode == 2, r
            assert f"ssh: {bad!r} is not [USER@]HOST[:PORT]" in r.stderr and says in r.stderr
    r = remusctl("--host", host, "protect", "web", "--foreground", "--ssh", "h", "-s", "ssh")
    assert r.returncode == 2 and "give one" in r.stderr
    r = remusctl("--host", host, "protect", "web", "--foreground", "--ssh", "h", "--to", "h")
    assert r.returncode == 2 and "not both" in r.stderr


def test_the_remote_command_is_the_one_dash_s_runs() -> None:
    spec = ProtectionSpec("web", ssh="h")
    assert receive_command(spec) == "remusctl receive --stdio"
    spec = ProtectionSpec(
        "web", ssh="h", heartbeat_timeout_ms=900, unsafe=True, witness="file:///a dir"
    )
    assert receive_args(spec, e=True) == [
        "remusctl", "receive", "--stdio", "-e", "--heartbeat-timeout", "900", "-F",
        "--witness", "file:///a dir",
    ]  # fmt: skip
    # one argument each, whatever the peer's shell
    assert receive_command(spec).endswith("-F --witness 'file:///a dir'")


# -- a real sshd on loopback: the mux's throughput over paramiko, and over OpenSSH's ssh ------


@pytest.fixture
def loopback_sshd(tmp_path: Path) -> Iterator[Sshd]:
    why = sshd_unavailable()
    if why:
        pytest.skip(why)
    server = Sshd(tmp_path / "sshd", "127.0.0.1", 20000 + random.randrange(20000))
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _throughput(stream: socket.socket, ctl: Control) -> tuple[float, float]:
    """64 MiB through the echo peer: (MB/s, the worst heartbeat round trip in ms)."""
    peer_hello = await ctl.hello(Hello("primary", {"c_info": {"name": "web"}}), 10)
    assert peer_hello.protection == "secondary"
    ctl.conn.checkpoint_sent(1)
    events = Events(ctl)
    t0 = time.monotonic()
    push = asyncio.create_task(asyncio.to_thread(_push, stream, 64))
    beats = asyncio.create_task(events.heartbeats(push))
    digest, _ = await push
    assert await events.get(60) == report(stream_bytes=64 * MIB)
    assert await events.get() == Ack(1, digest)
    elapsed = time.monotonic() - t0
    await beats
    ctl.writer.write_eof()
    assert await events.get() == report(control_eof=True)
    assert events.rtts, "no heartbeat came back during the transfer"
    return 64 * MIB / elapsed / 1e6, max(events.rtts) * 1e3


def test_64_mib_over_ssh_paramiko_and_openssh(
    loopback_sshd: Sshd, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = loopback_sshd
    known = tmp_path / "known_hosts"
    known.write_text(server.known_hosts_line())
    command = peer("echo")  # the test's own secondary, by absolute paths

    async def over_paramiko() -> tuple[float, float]:
        target = parse_target(f"root@127.0.0.1:{server.port}")
        stream, ctl, link = await open_ssh(
            target, command, known_hosts=str(known), identity=str(server.client_key)
        )
        try:
            figures = await _throughput(stream, ctl)
            deadline = time.monotonic() + 10
            while not link.closed and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert link.returncode == 0 and link.error is None, link.error
            return figures
        finally:
            link.close()
            stream.close()

    async def over_openssh() -> tuple[float, float]:
        ssh = (
            f"ssh -F none -i {server.client_key} -o UserKnownHostsFile={known} "
            f"-o StrictHostKeyChecking=yes -o BatchMode=yes -p {server.port} root@127.0.0.1"
        )
        stream, ctl, link = await open_command(f"{ssh} {shlex.quote(command)}")
        try:
            figures = await _throughput(stream, ctl)
            assert await asyncio.wait_for(link.wait(), 10) == 0
            return figures
        finally:
            link.close()
            stream.close()

    ours = asyncio.run(over_paramiko())
    theirs = asyncio.run(over_openssh())
    with capsys.disabled():
        print(
            f"\n64 MiB over ssh on loopback: paramiko (--ssh) {ours[0]:.0f} MB/s, heartbeat "
            f"max {ours[1]:.1f} ms; OpenSSH's ssh (-s ssh) {theirs[0]:.0f} MB/s, heartbeat "
            f"max {theirs[1]:.1f} ms"
        )
