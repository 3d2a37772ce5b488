"""Mutual TLS on the replication link (transport/tls.py, relay.py), over real sockets:
each refusal (an untrusted host, a wrong certificate, a plain-TCP client, a probe
without TLS) named on both sides, nothing answered or paired before the peer is
authenticated, and the bytes of an accepted pair carried both ways."""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from pathlib import Path

import pytest

from orchestrator.transport.channels import STREAM, connect, open_channel, probe
from orchestrator.transport.control import Hello
from orchestrator.transport.endpoint import Endpoint, control_of
from orchestrator.transport.tls import (
    PLAIN,
    Identity,
    Link,
    LinkError,
    LinkRefused,
    first_certificate,
    normalise_fingerprint,
)


def _identity(tmp_path: Path, name: str) -> Identity:
    ident = Identity(tmp_path / name / "tls")
    assert ident.init(name)
    assert not ident.init(name)  # idempotent: the same key and certificate
    return ident


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Identity, Identity]:
    a, b = _identity(tmp_path, "a"), _identity(tmp_path, "b")
    a.trust(str(b.cert_path), "b")
    b.trust(str(a.cert_path), "a")
    return a, b


async def _endpoint(ident: Identity | None, asked: list[int] | None = None) -> Endpoint:
    def describe() -> dict[str, object]:
        if asked is not None:
            asked.append(1)
        return {"backend": "sim", "domains": ["secret-vm"]}

    ep = Endpoint("127.0.0.1", 0, describe, link=Link(ident) if ident else PLAIN)
    await ep.start()
    return ep


def test_a_pair_over_tls_carries_bytes_both_ways(pair: tuple[Identity, Identity]) -> None:
    a, b = pair

    async def main() -> None:
        ep = await _endpoint(b)
        try:
            pid = str(uuid.uuid4())
            stream, ctl = await connect(f"127.0.0.1:{ep.port}", pid, Link(a), timeout=5)
            got = await asyncio.wait_for(ep.next_pair(), 5)
            assert got.protection == pid
            theirs = await control_of(got)
            ctl.send(Hello("primary"))
            assert await asyncio.wait_for(theirs.next(), 5) == Hello("primary")
            # the stream is a plain blocking fd on both ends (the save helper's)
            assert stream.getblocking() and got.stream.getblocking()
            payload = bytes(range(256)) * 4096  # 1 MiB, many records
            sender = asyncio.to_thread(stream.sendall, payload)
            received = bytearray()

            def drain() -> None:
                while len(received) < len(payload):
                    received.extend(got.stream.recv(1 << 20))

            await asyncio.gather(sender, asyncio.to_thread(drain))
            assert bytes(received) == payload
            # the back channel (COLO) runs the other way on the same fd
            got.stream.sendall(b"back")
            assert await asyncio.to_thread(stream.recv, 10) == b"back"
            # one end shut: the other reads EOF through the relays
            stream.shutdown(socket.SHUT_WR)
            assert await asyncio.to_thread(got.stream.recv, 10) == b""
            for s in (stream, got.stream):
                s.close()
            ctl.close()
            theirs.close()
        finally:
            await ep.close()

    asyncio.run(main())


def test_an_untrusted_host_is_refused_naming_its_certificate(
    tmp_path: Path, pair: tuple[Identity, Identity], caplog: pytest.LogCaptureFixture
) -> None:
    _, b = pair
    stranger = _identity(tmp_path, "stranger")
    stranger.trust(str(b.cert_path), "b")  # it knows b; b never trusted it

    async def main() -> None:
        asked: list[int] = []
        ep = await _endpoint(b, asked)
        try:
            with pytest.raises(LinkRefused) as err:
                await connect(f"127.0.0.1:{ep.port}", str(uuid.uuid4()), Link(stranger), 5, 1)
            assert stranger.fingerprint in str(err.value)
            assert "refused this host's certificate" in str(err.value)
            with pytest.raises(LinkRefused):
                await probe(f"127.0.0.1:{ep.port}", Link(stranger), timeout=5)
            assert ep.pending == 0 and ep.queued == 0 and not asked
            assert ep.unauthenticated >= 2
        finally:
            await ep.close()

    with caplog.at_level(logging.WARNING, "orchestrator.transport.endpoint"):
        asyncio.run(main())
    assert f"presented certificate {stranger.fingerprint}" in caplog.text
    assert "does not trust" in caplog.text


def test_a_wrong_certificate_is_refused_by_the_primary(
    tmp_path: Path, pair: tuple[Identity, Identity]
) -> None:
    a, _ = pair
    # b's key and certificate made anew (a rebuilt host, or an impostor on its address):
    # a pinned the old one, and must not send even its preamble
    impostor = Identity(tmp_path / "impostor" / "tls")
    impostor.init("b")
    impostor.trust(str(a.cert_path), "a")

    async def main() -> None:
        asked: list[int] = []
        ep = await _endpoint(impostor, asked)
        try:
            with pytest.raises(LinkRefused) as err:
                await connect(f"127.0.0.1:{ep.port}", str(uuid.uuid4()), Link(a), 5, 1)
            assert impostor.fingerprint in str(err.value) and "does not trust" in str(err.value)
            with pytest.raises(LinkRefused):
                await probe(f"127.0.0.1:{ep.port}", Link(a), timeout=5)
            await asyncio.sleep(0.2)
            assert ep.pending == 0 and ep.queued == 0 and not asked
        finally:
            await ep.close()

    asyncio.run(main())


def test_a_plain_tcp_client_is_refused_by_a_tls_receiver(
    pair: tuple[Identity, Identity], caplog: pytest.LogCaptureFixture
) -> None:
    _, b = pair

    async def main() -> None:
        asked: list[int] = []
        ep = await _endpoint(b, asked)
        try:
            with pytest.raises(LinkRefused) as err:
                await connect(f"127.0.0.1:{ep.port}", str(uuid.uuid4()), PLAIN, 5, 1)
            assert "requires TLS" in str(err.value)
            assert ep.pending == 0 and ep.queued == 0 and not asked
        finally:
            await ep.close()

    with caplog.at_level(logging.WARNING, "orchestrator.transport.endpoint"):
        asyncio.run(main())
    assert "plain TCP, and this receiver requires TLS" in caplog.text


def test_a_probe_without_tls_reveals_nothing(pair: tuple[Identity, Identity]) -> None:
    a, b = pair

    async def main() -> None:
        asked: list[int] = []
        ep = await _endpoint(b, asked)
        try:
            with pytest.raises(LinkRefused) as err:
                await probe(f"127.0.0.1:{ep.port}", PLAIN, timeout=5)
            assert "requires TLS" in str(err.value) and "secret-vm" not in str(err.value)
            assert not asked  # the host was not even described
            hello = await probe(f"127.0.0.1:{ep.port}", Link(a), timeout=5)
            assert hello.config["domains"] == ["secret-vm"] and asked
        finally:
            await ep.close()

    asyncio.run(main())


def test_a_tls_primary_against_a_plain_receiver_says_so(pair: tuple[Identity, Identity]) -> None:
    a, _ = pair

    async def main() -> None:
        ep = await _endpoint(None)
        try:
            with pytest.raises(LinkRefused) as err:
                await connect(f"127.0.0.1:{ep.port}", str(uuid.uuid4()), Link(a), 5, 1)
            assert "--insecure-link" in str(err.value)
        finally:
            await ep.close()

    asyncio.run(main())


def test_a_fingerprint_pin_learns_its_certificate_on_first_contact(tmp_path: Path) -> None:
    a, b = _identity(tmp_path, "a"), _identity(tmp_path, "b")
    a.trust(b.fingerprint.upper().replace("SHA256:", "sha256:"), "b")
    b.trust(a.fingerprint, "a")
    assert [p.cert_pem for p in b.pins()] == [None]

    async def main() -> None:
        ep = await _endpoint(b)
        try:
            # refused once (b has no certificate to check a's against), then accepted
            stream, ctl = await connect(f"127.0.0.1:{ep.port}", str(uuid.uuid4()), Link(a), 5)
            (await asyncio.wait_for(ep.next_pair(), 5)).close()
            stream.close()
            ctl.close()
        finally:
            await ep.close()

    asyncio.run(main())
    (pin,) = b.pins()
    assert pin.fingerprint == a.fingerprint and pin.cert_pem is not None


def test_no_identity_is_a_clear_error(tmp_path: Path) -> None:
    nobody = Identity(tmp_path / "none")
    with pytest.raises(Exception, match="remusctl host init"):
        open_channel("127.0.0.1:1", STREAM, bytes(16), Link(nobody), 1)


def test_fingerprints_and_certificate_messages() -> None:
    fp = "sha256:" + "ab" * 32
    assert normalise_fingerprint(":".join(["AB"] * 32)) == fp
    with pytest.raises(LinkError, match="not a sha256"):
        normalise_fingerprint("sha256:abc")
    der = b"\x30\x03\x02\x01\x01"
    entry = len(der).to_bytes(3, "big") + der + b"\x00\x00"
    body = b"\x00" + len(entry).to_bytes(3, "big") + entry
    assert first_certificate(b"\x0b" + len(body).to_bytes(3, "big") + body) == der
    assert first_certificate(b"\x0b\x00\x00\x04\x00\x00\x00\x00") is None
    assert first_certificate(b"\x0b\x00") is None
