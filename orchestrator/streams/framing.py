"""Record framing shared by the libxc and libxl layers (and our control channel).

A record is ``u32 type, u32 body_length, body, zero padding to 8 bytes`` in
the stream's byte order (little-endian on x86; both layers refuse big-endian
streams). The length excludes the padding.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, Final

from .errors import RecordError

RECORD_HEADER: Final = struct.Struct("<II")
RECORD_HEADER_SIZE: Final = RECORD_HEADER.size

# libxc's REC_LENGTH_MAX (xg_sr_common.h): a larger length is a corrupt stream,
# not a big record, and must be refused before anyone allocates it.
REC_LENGTH_MAX: Final = 128 << 20

_ZERO_PAD: Final = bytes(8)


def padded_length(length: int) -> int:
    """ROUNDUP(length, 8): what a reader consumes after the header."""
    return (length + 7) & ~7


def padding_for(length: int) -> bytes:
    return _ZERO_PAD[: padded_length(length) - length]


def encode_record(rtype: int, body: bytes | bytearray | memoryview = b"") -> bytes:
    """One complete record (header, body, padding) as bytes."""
    length = len(body)
    if length > REC_LENGTH_MAX:
        raise RecordError(f"body length {length} exceeds REC_LENGTH_MAX ({REC_LENGTH_MAX})")
    return b"".join((RECORD_HEADER.pack(rtype, length), body, padding_for(length)))


def encode_record_parts(
    rtype: int, parts: Sequence[bytes | bytearray | memoryview]
) -> list[bytes | bytearray | memoryview]:
    """A record as a list of buffers, for ``writev``/``sendmsg`` without copying.

    Page data goes out of the guest's memory map straight into the socket;
    joining it into one bytes object would copy every page once more.
    """
    length = sum(len(p) for p in parts)
    if length > REC_LENGTH_MAX:
        raise RecordError(f"body length {length} exceeds REC_LENGTH_MAX ({REC_LENGTH_MAX})")
    out: list[bytes | bytearray | memoryview] = [RECORD_HEADER.pack(rtype, length)]
    out.extend(p for p in parts if len(p))
    pad = padding_for(length)
    if pad:
        out.append(pad)
    return out


def padding_is_zero(padding: memoryview | bytes) -> bool:
    return bytes(padding) == _ZERO_PAD[: len(padding)]


def empty_body(rtype: IntEnum) -> Any:
    """A body class for a record that must be empty (END, CHECKPOINT, ...)."""

    @dataclass(frozen=True, slots=True)
    class Empty:
        RTYPE: ClassVar[int] = rtype

        def encode(self) -> bytes:
            return b""

        @classmethod
        def decode(cls, body: memoryview | bytes) -> Empty:
            if len(body):
                raise RecordError(f"body length {len(body)} != 0 ({rtype.name} is empty)")
            return cls()

    Empty.__name__ = Empty.__qualname__ = rtype.name.title().replace("_", "")
    return Empty
