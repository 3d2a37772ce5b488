"""A host's identity and the mutual TLS of the replication link, with peers pinned.

Each host has one key and one self-signed certificate (``remusctl host init``),
and a set of pinned peers (``remusctl host trust``): a peer's certificate, or
only its ``sha256:`` fingerprint (of the DER certificate). There is no CA: a
pin is the whole of trust, as with ssh's known_hosts.

Both ends authenticate (TLS 1.3, a certificate each):

- The connecting end (the primary, a prober) does not check a chain at all
  (``CERT_NONE``): it compares the receiver's certificate with its pins before
  it sends one byte of its own. That is sound because the handshake already
  proved that the receiver holds the key of the certificate it showed
  (CertificateVerify is checked whatever the verify mode), and it lets a
  fingerprint alone be a pin.
- The accepting end must make OpenSSL ask for a client certificate, which only
  ``CERT_REQUIRED`` does, and then OpenSSL checks it against a CA set: the set
  is exactly the pinned certificates (each self-signed, its own anchor). The
  fingerprint is compared again after the handshake, to name the peer and so
  that nothing but an exact pin passes.
  A refused certificate never reaches Python through the ssl module, so the
  handshake's messages are watched (:class:`_Presented`) to name the
  fingerprint it presented in the refusal. When that fingerprint is pinned by
  fingerprint only, the certificate is the pinned one by definition: it is
  stored beside the pin, and the primary's next attempt passes.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import re
import socket
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

log = logging.getLogger(__name__)

KEY_FILE: Final = "key.pem"
CERT_FILE: Final = "cert.pem"
TRUSTED_DIR: Final = "trusted"  # NAME.pem (a certificate) or NAME.fp (a fingerprint)
PREFIX: Final = "sha256:"
_FP_RE: Final = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# TLS handshake message type of Certificate (RFC 8446, 4.4.2)
_CERTIFICATE: Final = 11


class LinkError(Exception):
    """The link cannot be set up: no identity yet, a bad pin."""


class LinkRefused(LinkError):
    """A peer was refused, or refused us; the message names the certificate presented."""


def fingerprint(der: bytes) -> str:
    return PREFIX + hashlib.sha256(der).hexdigest()


def normalise_fingerprint(text: str) -> str:
    """``sha256:`` + 64 lower-case hex digits; colons between bytes are allowed in."""
    body = text.strip().lower()
    body = body.removeprefix(PREFIX).replace(":", "")
    fp = PREFIX + body
    if not _FP_RE.match(fp):
        raise LinkError(f"{text!r} is not a sha256:<64 hex digits> fingerprint")
    return fp


@dataclass(frozen=True)
class Pin:
    """One trusted peer."""

    name: str
    fingerprint: str
    cert_pem: str | None  # None: pinned by fingerprint only (its certificate not seen yet)


@dataclass(frozen=True)
class Identity:
    """This host's key and certificate, and the peers it trusts, in one directory."""

    directory: Path

    @property
    def cert_path(self) -> Path:
        return self.directory / CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.directory / KEY_FILE

    @property
    def fingerprint(self) -> str:
        return fingerprint(ssl.PEM_cert_to_DER_cert(self.cert_path.read_text()))

    def exists(self) -> bool:
        return self.cert_path.exists() and self.key_path.exists()

    def pins(self) -> list[Pin]:
        d = self.directory / TRUSTED_DIR
        if not d.is_dir():
            return []
        found: dict[str, Pin] = {}
        for path in sorted(d.iterdir()):
            if path.suffix == ".pem":
                pem = path.read_text()
                found[path.stem] = Pin(path.stem, fingerprint(ssl.PEM_cert_to_DER_cert(pem)), pem)
            elif path.suffix == ".fp" and path.stem not in found:
                found[path.stem] = Pin(path.stem, path.read_text().strip(), None)
        return list(found.values())

    def pinned(self, fp: str) -> Pin | None:
        return next((p for p in self.pins() if p.fingerprint == fp), None)

    # -- changing it (remusctl host init / trust) ---------------------------------

    def init(self, common_name: str) -> bool:
        """Make the key and the self-signed certificate unless they exist; True if made."""
        if self.exists():
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        key_pem, cert_pem = _self_signed(common_name)
        # the key is written 0600 from its first byte, and renamed into place last,
        # so that an interrupted init leaves no half identity that `exists` believes
        tmp = self.key_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        self.cert_path.write_bytes(cert_pem)
        tmp.rename(self.key_path)
        return True

    def trust(self, what: str, name: str | None = None) -> Pin:
        """Pin a peer: a certificate file's path, or ``sha256:FP``."""
        pem: str | None = None
        if what.lower().startswith(PREFIX):
            fp = normalise_fingerprint(what)
        else:
            try:
                pem = Path(what).read_text()
                der = ssl.PEM_cert_to_DER_cert(pem)
            except (OSError, ValueError) as exc:
                raise LinkError(f"{what}: not a PEM certificate ({exc})") from exc
            pem, fp = ssl.DER_cert_to_PEM_cert(der), fingerprint(der)
        name = name or f"peer-{fp[len(PREFIX) : len(PREFIX) + 12]}"
        if not _NAME_RE.match(name):
            raise LinkError(f"peer name {name!r}: letters, digits, '.', '_' and '-' only")
        if self.exists() and fp == self.fingerprint:
            raise LinkError(f"{fp} is this host's own certificate")
        d = self.directory / TRUSTED_DIR
        d.mkdir(parents=True, exist_ok=True)
        for old in self.pins():  # one pin per fingerprint, one per name
            if old.fingerprint == fp or old.name == name:
                for suffix in (".pem", ".fp"):
                    with contextlib.suppress(FileNotFoundError):
                        (d / f"{old.name}{suffix}").unlink()
        if pem is not None:
            (d / f"{name}.pem").write_text(pem)
        else:
            (d / f"{name}.fp").write_text(fp + "\n")
        return Pin(name, fp, pem)

    def _learn(self, pin: Pin, der: bytes) -> None:
        """A fingerprint-only pin's certificate, seen at last (its digest is the pin)."""
        d = self.directory / TRUSTED_DIR
        (d / f"{pin.name}.pem").write_text(ssl.DER_cert_to_PEM_cert(der))
        with contextlib.suppress(FileNotFoundError):
            (d / f"{pin.name}.fp").unlink()


def _self_signed(common_name: str) -> tuple[bytes, bytes]:
    # imported here: only `host init` needs it, not every process of the link
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        # a pin, not a CA, decides trust: rotating is `host init` anew and `trust` anew
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


# -- the link --------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """How replication connections are made: mutual TLS with ``identity``, or plain TCP
    (``identity`` None: ``--insecure-link``, ``replication.insecure``)."""

    identity: Identity | None

    @property
    def mode(self) -> str:
        return "plain" if self.identity is None else "tls"

    def require(self) -> Identity:
        ident = self.identity
        assert ident is not None, "a plain link has no identity"
        if not ident.exists():
            raise LinkError(
                f"this host has no identity in {ident.directory}: run `remusctl host init`, "
                "and `remusctl host trust` the peer's certificate on each side "
                "(or --insecure-link for plain TCP)"
            )
        return ident

    def client_context(self) -> ssl.SSLContext:
        ident = self.require()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the pin is checked after the handshake: see above
        ctx.load_cert_chain(ident.cert_path, ident.key_path)
        return ctx

    def server_context(self) -> tuple[ssl.SSLContext, _Presented]:
        ident = self.require()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        # no session tickets: nothing is resumed, and nothing but data follows the handshake
        ctx.num_tickets = 0
        ctx.load_cert_chain(ident.cert_path, ident.key_path)
        anchors = "".join(p.cert_pem for p in ident.pins() if p.cert_pem)
        if anchors:
            ctx.load_verify_locations(cadata=anchors)
        presented = _Presented()
        presented.attach(ctx)
        return ctx, presented


PLAIN: Final = Link(None)


class _Presented:
    """The certificates clients presented, by connection, read off the handshake.

    The ssl module hides a certificate it refused; its message callback (a
    CPython facility since 3.8, there for tracing) sees the Certificate message
    before it is checked. Only for naming a refused peer: what is trusted is
    decided by OpenSSL and the pins.
    """

    def __init__(self) -> None:
        self._by_conn: dict[int, bytes] = {}

    def attach(self, ctx: ssl.SSLContext) -> None:
        if hasattr(ctx, "_msg_callback"):
            ctx._msg_callback = self._on_message

    def _on_message(
        self, conn: Any, direction: str, version: Any, content_type: Any, msg_type: Any, data: bytes
    ) -> None:
        if direction == "read" and msg_type == _CERTIFICATE and data[:1] == bytes([_CERTIFICATE]):
            der = first_certificate(data)
            if der is not None:
                self._by_conn[id(conn)] = der

    def pop(self, conn: object) -> bytes | None:
        return self._by_conn.pop(id(conn), None)


def first_certificate(message: bytes) -> bytes | None:
    """The leaf certificate of a TLS 1.3 Certificate handshake message (RFC 8446, 4.4.2):
    type u8, length u24, context <0..255>, certificate_list <0..2^24-1> of entries
    (cert_data <1..2^24-1>, extensions <0..2^16-1>); None when it holds none."""
    try:
        pos = 4
        ctx_len = message[pos]
        pos += 1 + ctx_len
        (list_len,) = struct.unpack(">I", b"\0" + message[pos : pos + 3])
        pos += 3
        if list_len == 0:
            return None
        (cert_len,) = struct.unpack(">I", b"\0" + message[pos : pos + 3])
        der = message[pos + 3 : pos + 3 + cert_len]
        return der if len(der) == cert_len and der else None
    except (IndexError, struct.error):
        return None


# -- handshakes --------------------------------------------------------------------


def check_server(tls: ssl.SSLSocket | ssl.SSLObject, link: Link, addr: str) -> Pin:
    """After the client handshake: the receiver's certificate must be pinned."""
    ident = link.require()
    der = tls.getpeercert(binary_form=True)
    if not der:
        raise LinkRefused(f"{addr} presented no certificate")
    fp = fingerprint(der)
    pin = ident.pinned(fp)
    if pin is None:
        raise LinkRefused(
            f"{addr} presented certificate {fp}, which this host does not trust: "
            f"if that is the peer's (`remusctl host init` there prints it), "
            f"`remusctl host trust {fp} --name PEER`"
        )
    return pin


def refused_by_server(exc: BaseException, link: Link, addr: str) -> LinkRefused:
    """The receiver's alert after our certificate, said so that the admin knows what to do."""
    ident = link.require()
    return LinkRefused(
        f"{addr} refused this host's certificate {ident.fingerprint} ({_reason(exc)}): "
        f"on the peer, `remusctl host trust {ident.cert_path}` (a copy of it) or "
        f"`remusctl host trust {ident.fingerprint}`"
    )


def accept_refusal(
    exc: BaseException, tls: ssl.SSLSocket, link: Link, presented: _Presented, peer: str
) -> LinkRefused:
    """Why the server's handshake with ``peer`` failed, naming the certificate presented;
    a fingerprint-only pin learns its certificate here (see the module docstring)."""
    ident = link.require()
    der = presented.pop(tls)  # the callback is given the SSLSocket
    if der is None:
        return LinkRefused(f"{peer}: TLS handshake failed ({_reason(exc)}), no certificate seen")
    fp = fingerprint(der)
    pin = ident.pinned(fp)
    if pin is not None and pin.cert_pem is None:
        ident._learn(pin, der)
        return LinkRefused(
            f"{peer} presented {fp}, pinned by fingerprint as {pin.name}: its certificate "
            "is stored now, and its next connection passes"
        )
    return LinkRefused(
        f"{peer} presented certificate {fp}, which this host does not trust "
        f"({_reason(exc)}); if it is the peer's, `remusctl host trust {fp} --name PEER`"
    )


def check_client(tls: ssl.SSLSocket, link: Link, presented: _Presented, peer: str) -> Pin:
    """After the server handshake (OpenSSL accepted a pinned anchor): the exact pin."""
    ident = link.require()
    presented.pop(tls)
    der = tls.getpeercert(binary_form=True)
    fp = fingerprint(der) if der else "no certificate"
    pin = ident.pinned(fp) if der else None
    if pin is None:
        raise LinkRefused(f"{peer} presented certificate {fp}, which this host does not trust")
    return pin


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    return str(exc) or type(exc).__name__


def looks_like_tls(first: bytes) -> bool:
    """A TLS record starts with its content type, 22 for a handshake (a ClientHello)."""
    return first[:1] == b"\x16"


def peer_name(sock: socket.socket) -> str:
    with contextlib.suppress(OSError):
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    return "a peer"
