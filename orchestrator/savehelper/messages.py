"""The libxl <-> libxl-save-helper message protocol, sans I/O.

Frames from the helper: ``u16 length`` then a body of ``u16 message number``
and the arguments in host byte order with no padding; strings are ``u32 n``
then n bytes including the NUL. Replies to the helper are bare 4-byte ints,
sent only when the message asks for one (``libxl_save_msgs_gen.pl``;
protocol notes 2.1-2.3).

The message tables of each Xen generation are data (``TABLES``): message
numbers are list positions + 1, and a message that is a callback has
cbflags bit = its number. Nothing else in the code depends on the version.

Two codecs, one per side, both plain state machines over bytes:
:class:`ParentCodec` is what libxl (we) runs; :class:`HelperCodec` is what
the helper runs (our simulated helper uses it).
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final

if sys.byteorder != "little":  # pragma: no cover - every Xen toolstack we target is x86-64
    raise ImportError("the save-helper codec is written for little-endian x86-64 hosts")


class Arg(Enum):
    """Argument types with their x86-64 C sizes."""

    INT = "i"
    UINT = "I"
    U32 = "I"
    ULONG = "Q"
    PFN = "Q"
    STRING = "s"


@dataclass(frozen=True, slots=True)
class MessageSpec:
    name: str
    args: tuple[tuple[str, Arg], ...]
    reply: bool  # the helper blocks for a 4-byte int answer
    callback: bool  # installed only when its cbflags bit is set


def _m(name: str, *args: tuple[str, Arg], reply: bool = True, callback: bool = True) -> MessageSpec:
    return MessageSpec(name, args, reply, callback)


_LOG = _m(
    "log",
    ("level", Arg.U32),
    ("errnoval", Arg.U32),
    ("context", Arg.STRING),
    ("formatted", Arg.STRING),
    reply=False,
    callback=False,
)
_PROGRESS = _m(
    "progress",
    ("context", Arg.STRING),
    ("doing_what", Arg.STRING),
    ("done", Arg.ULONG),
    ("total", Arg.ULONG),
    reply=False,
    callback=False,
)
_COMPLETE = _m("complete", ("retval", Arg.INT), ("errnoval", Arg.INT), callback=False)

# protocol notes 2.3 (4.14+) and P-2 (older); libxl_save_msgs_gen.pl at each tag
TABLES: Final[dict[str, tuple[MessageSpec, ...]]] = {
    "4.14": (
        _LOG,
        _PROGRESS,
        _m("suspend"),
        _m("postcopy"),
        _m("checkpoint"),
        _m("wait_checkpoint"),
        _m("switch_qemu_logdirty", ("domid", Arg.U32), ("enable", Arg.UINT)),
        _m("static_data_done", ("missing", Arg.UINT)),
        _m("restore_results", ("store_gfn", Arg.PFN), ("console_gfn", Arg.PFN), reply=False),
        _COMPLETE,
    ),
    "4.7": (
        _LOG,
        _PROGRESS,
        _m("suspend"),
        _m("postcopy"),
        _m("checkpoint"),
        _m("wait_checkpoint"),
        _m("switch_qemu_logdirty", ("domid", Arg.INT), ("enable", Arg.UINT)),
        _m("restore_results", ("store_mfn", Arg.ULONG), ("console_mfn", Arg.ULONG), reply=False),
        _COMPLETE,
    ),
    "4.6": (
        _LOG,
        _PROGRESS,
        _m("suspend"),
        _m("postcopy"),
        _m("checkpoint"),
        _m("switch_qemu_logdirty", ("domid", Arg.INT), ("enable", Arg.UINT)),
        _m(
            "restore_results",
            ("store_mfn", Arg.ULONG),
            ("console_mfn", Arg.ULONG),
            reply=False,
            callback=False,
        ),
        _COMPLETE,
    ),
}


def table_for(xen_version: str) -> tuple[MessageSpec, ...]:
    """The table for a Xen version such as "4.17" (4.6, 4.7-4.13, 4.14-4.20)."""
    major, minor = (int(x) for x in xen_version.split(".")[:2])
    if (major, minor) >= (4, 14):
        return TABLES["4.14"]
    if (major, minor) >= (4, 7):
        return TABLES["4.7"]
    if (major, minor) == (4, 6):
        return TABLES["4.6"]
    raise ValueError(f"no save-helper message table for Xen {xen_version}")


DEFAULT_TABLE: Final = TABLES["4.14"]


def cbflag(table: Sequence[MessageSpec], name: str) -> int:
    for number, spec in enumerate(table, 1):
        if spec.name == name:
            if not spec.callback:
                raise ValueError(f"{name} has no cbflags bit")
            return 1 << number
    raise KeyError(name)


def cbflags(table: Sequence[MessageSpec], names: Sequence[str]) -> int:
    out = 0
    for name in names:
        out |= cbflag(table, name)
    return out


def callbacks_in(table: Sequence[MessageSpec], flags: int) -> frozenset[str]:
    return frozenset(
        spec.name for n, spec in enumerate(table, 1) if spec.callback and flags & (1 << n)
    )


class ProtocolError(Exception):
    """A frame or reply that breaks the message protocol."""


@dataclass(frozen=True, slots=True)
class Message:
    name: str
    number: int
    args: tuple[int | str, ...]
    needs_reply: bool

    def arg(self, name: str, table: Sequence[MessageSpec] = DEFAULT_TABLE) -> int | str:
        spec = table[self.number - 1]
        return self.args[[a for a, _ in spec.args].index(name)]


_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
MAX_BODY: Final = 0xFFFF


def encode_message(table: Sequence[MessageSpec], name: str, *values: int | str) -> bytes:
    """One helper -> libxl frame (length prefix included)."""
    number = next((n for n, s in enumerate(table, 1) if s.name == name), 0)
    if not number:
        raise KeyError(name)
    spec = table[number - 1]
    if len(values) != len(spec.args):
        raise ValueError(f"{name} takes {len(spec.args)} arguments, got {len(values)}")
    parts = [_U16.pack(number)]
    for (argname, kind), value in zip(spec.args, values, strict=True):
        if kind is Arg.STRING:
            assert isinstance(value, str)
            raw = value.encode() + b"\0"
            parts.append(_U32.pack(len(raw)) + raw)
        else:
            assert isinstance(value, int), argname
            parts.append(struct.pack("<" + kind.value, value))
    body = b"".join(parts)
    if len(body) > MAX_BODY:
        raise ValueError(f"{name} body of {len(body)} bytes exceeds the u16 length")
    return _U16.pack(len(body)) + body


def decode_body(table: Sequence[MessageSpec], body: bytes) -> Message:
    """Parse one frame body (without its length prefix)."""
    if len(body) < 2:
        raise ProtocolError(f"frame body of {len(body)} bytes has no message number")
    (number,) = _U16.unpack_from(body)
    if not 1 <= number <= len(table):
        raise ProtocolError(f"unknown message number {number} (table has 1..{len(table)})")
    spec = table[number - 1]
    off = 2
    args: list[int | str] = []
    for argname, kind in spec.args:
        if kind is Arg.STRING:
            if off + 4 > len(body):
                raise ProtocolError(f"{spec.name}: frame ends inside the length of {argname}")
            (n,) = _U32.unpack_from(body, off)
            off += 4
            raw = body[off : off + n]
            if n == 0 or len(raw) != n or raw[-1] != 0:
                raise ProtocolError(f"{spec.name}: {argname} is not a NUL-terminated string")
            args.append(raw[:-1].decode(errors="replace"))
            off += n
        else:
            size = struct.calcsize(kind.value)
            if off + size > len(body):
                raise ProtocolError(f"{spec.name}: frame ends inside {argname}")
            args.append(struct.unpack_from("<" + kind.value, body, off)[0])
            off += size
    if off != len(body):
        raise ProtocolError(f"{spec.name}: {len(body) - off} unexpected bytes after the arguments")
    return Message(spec.name, number, tuple(args), spec.reply)


class ParentCodec:
    """libxl's side: bytes from the helper's stdout in, messages out, replies as bytes.

    A reply may be produced only while a message that needs one is pending:
    an int the helper did not ask for would be read as the answer to its
    next callback and desynchronise the channel (pitfall P-7).
    """

    def __init__(self, table: Sequence[MessageSpec] = DEFAULT_TABLE) -> None:
        self.table = table
        self._buf = bytearray()
        self.pending: Message | None = None
        self.last_frame = b""  # the raw bytes of the last message, for logs and tests
        # argument-less frames (the callbacks of the checkpoint loop) decoded once
        self._bare = {
            _U16.pack(2) + _U16.pack(n): Message(s.name, n, (), s.reply)
            for n, s in enumerate(table, 1)
            if not s.args
        }

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def next_message(self) -> Message | None:
        if self.pending is not None:
            if self._buf:
                raise ProtocolError(
                    f"helper sent {len(self._buf)} bytes while waiting for the reply to "
                    f"{self.pending.name}"
                )
            return None
        if len(self._buf) < 2:
            return None
        bare = self._bare.get(bytes(self._buf[:4]))
        if bare is not None:
            self.last_frame = bytes(self._buf[:4])
            del self._buf[:4]
            if bare.needs_reply:
                self.pending = bare
            return bare
        (n,) = _U16.unpack_from(self._buf)
        if len(self._buf) < 2 + n:
            return None
        self.last_frame = bytes(self._buf[: 2 + n])
        body = self.last_frame[2:]
        del self._buf[: 2 + n]
        msg = decode_body(self.table, body)
        if msg.needs_reply:
            self.pending = msg
        return msg

    def reply(self, value: int) -> bytes:
        if self.pending is None:
            raise ProtocolError("no message is waiting for a reply")
        self.pending = None
        return _I32.pack(value)

    @property
    def unparsed(self) -> int:
        return len(self._buf)


class HelperCodec:
    """The helper's side: messages to bytes, and the 4-byte replies back."""

    def __init__(self, table: Sequence[MessageSpec] = DEFAULT_TABLE) -> None:
        self.table = table

    def message(self, name: str, *values: int | str) -> bytes:
        return encode_message(self.table, name, *values)

    @staticmethod
    def decode_reply(data: bytes) -> int:
        if len(data) != 4:
            raise ProtocolError(f"reply of {len(data)} bytes (want 4)")
        return int(_I32.unpack(data)[0])


# xentoollog levels (xentoollog.h)
XTL_LEVELS: Final = (
    "NONE",
    "DEBUG",
    "VERBOSE",
    "DETAIL",
    "PROGRESS",
    "INFO",
    "NOTICE",
    "WARN",
    "ERROR",
    "CRITICAL",
)
XTL_DEBUG, XTL_INFO, XTL_WARN, XTL_ERROR = 1, 5, 7, 8

# cbflags libxl 4.17 passes (protocol notes 1.4)
CBFLAGS_SAVE_PLAIN: Final = 136
CBFLAGS_SAVE_REMUS: Final = 184
CBFLAGS_SAVE_COLO: Final = 248
CBFLAGS_RESTORE_PLAIN: Final = 768
CBFLAGS_RESTORE_REMUS: Final = 800
CBFLAGS_RESTORE_COLO: Final = 888
