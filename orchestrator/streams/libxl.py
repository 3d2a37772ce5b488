"""The libxl layer of the migration stream, spec revision 2.

Header (big-endian) and records 0-5 (``libxl_sr_stream_format.h``,
``docs/specs/libxl-migration-stream.pandoc``). Records share the libxc framing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Final, Self

from .errors import RecordError
from .framing import empty_body, encode_record

LIBXL_IDENT: Final = 0x4C6962786C466D74  # "LibxlFmt"
LIBXL_VERSION: Final = 2
HEADER: Final = struct.Struct(">QII")
OPT_BIG_ENDIAN: Final = 1 << 0
OPT_LEGACY: Final = 1 << 1  # converted from a legacy (pre-4.6) stream


class RecType(IntEnum):
    END = 0
    LIBXC_CONTEXT = 1
    EMULATOR_XENSTORE_DATA = 2
    EMULATOR_CONTEXT = 3
    CHECKPOINT_END = 4
    CHECKPOINT_STATE = 5


def record_name(rtype: int) -> str:
    try:
        return f"{RecType(rtype).name} ({rtype:#x})"
    except ValueError:
        return f"unknown ({rtype:#x})"


class EmulatorId(IntEnum):
    UNKNOWN = 0
    QEMU_TRADITIONAL = 1
    QEMU_UPSTREAM = 2


class CheckpointState(IntEnum):
    """CHECKPOINT_STATE control ids (COLO)."""

    NEW = 0  # primary -> secondary, forward stream
    SVM_SUSPENDED = 1  # secondary -> primary, back channel
    SVM_READY = 2
    SVM_RESUMED = 3


@dataclass(frozen=True, slots=True)
class Header:
    options: int = 0

    SIZE: ClassVar[int] = HEADER.size

    def encode(self) -> bytes:
        return HEADER.pack(LIBXL_IDENT, LIBXL_VERSION, self.options)

    @classmethod
    def decode(cls, buf: memoryview | bytes) -> Self:
        ident, version, options = HEADER.unpack(buf)
        if ident != LIBXL_IDENT:
            raise RecordError(f"bad ident {ident:#018x} (want {LIBXL_IDENT:#x} 'LibxlFmt')")
        if version != LIBXL_VERSION:
            raise RecordError(f"unsupported version {version} (libxl reads only {LIBXL_VERSION})")
        if options & OPT_BIG_ENDIAN:
            raise RecordError("big-endian stream (options bit 0): refused by libxl")
        if options & ~(OPT_BIG_ENDIAN | OPT_LEGACY):
            raise RecordError(f"reserved option bits set: {options:#010x}")
        return cls(options)


_EMU_HDR: Final = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class EmulatorXenstoreData:
    """Key/value pairs relative to /local/domain/<dm>/device-model/<domid>/."""

    pairs: tuple[tuple[str, str], ...]
    emulator_id: int = EmulatorId.QEMU_UPSTREAM
    index: int = 0

    RTYPE: ClassVar[int] = RecType.EMULATOR_XENSTORE_DATA

    def encode(self) -> bytes:
        parts = [_EMU_HDR.pack(self.emulator_id, self.index)]
        for key, value in self.pairs:
            parts.append(key.encode() + b"\0" + value.encode() + b"\0")
        return b"".join(parts)

    @classmethod
    def decode(cls, body: memoryview | bytes) -> Self:
        emulator_id, index = _decode_emulator_header(body)
        data = bytes(body[8:])
        if not data:
            return cls((), emulator_id, index)
        if not data.endswith(b"\0"):
            raise RecordError("xenstore data is not NUL-terminated")
        words = data[:-1].split(b"\0")
        if len(words) % 2:
            raise RecordError(f"xenstore data has {len(words)} strings: a key lacks its value")
        try:
            strs = [w.decode() for w in words]
        except UnicodeDecodeError as exc:
            raise RecordError(f"xenstore data is not UTF-8: {exc}") from None
        if any(not k for k in strs[::2]):
            raise RecordError("xenstore data has an empty key")
        return cls(tuple(zip(strs[::2], strs[1::2], strict=True)), emulator_id, index)


@dataclass(frozen=True, slots=True)
class EmulatorContext:
    """QEMU's device-state blob (contents of /var/lib/xen/qemu-save.<domid>)."""

    blob: bytes
    emulator_id: int = EmulatorId.QEMU_UPSTREAM
    index: int = 0

    RTYPE: ClassVar[int] = RecType.EMULATOR_CONTEXT

    def encode(self) -> bytes:
        return _EMU_HDR.pack(self.emulator_id, self.index) + self.blob

    @classmethod
    def decode(cls, body: memoryview | bytes) -> Self:
        emulator_id, index = _decode_emulator_header(body)
        return cls(bytes(body[8:]), emulator_id, index)


def _decode_emulator_header(body: memoryview | bytes) -> tuple[int, int]:
    if len(body) < 8:
        raise RecordError(f"body length {len(body)} < 8 (emulator sub-header)")
    emulator_id, index = _EMU_HDR.unpack_from(body)
    if emulator_id not in EmulatorId._value2member_map_:
        raise RecordError(f"unknown emulator id {emulator_id}")
    return emulator_id, index


@dataclass(frozen=True, slots=True)
class CheckpointStateRecord:
    state: int

    RTYPE: ClassVar[int] = RecType.CHECKPOINT_STATE

    def encode(self) -> bytes:
        return struct.pack("<I", self.state)

    @classmethod
    def decode(cls, body: memoryview | bytes) -> Self:
        if len(body) != 4:
            raise RecordError(f"body length {len(body)} != 4")
        (state,) = struct.unpack("<I", body)
        if state not in CheckpointState._value2member_map_:
            raise RecordError(f"unknown control id {state}")
        return cls(state)


End = empty_body(RecType.END)
LibxcContext = empty_body(RecType.LIBXC_CONTEXT)
CheckpointEnd = empty_body(RecType.CHECKPOINT_END)

_DECODERS: Final[dict[int, type]] = {
    RecType.END: End,
    RecType.LIBXC_CONTEXT: LibxcContext,
    RecType.EMULATOR_XENSTORE_DATA: EmulatorXenstoreData,
    RecType.EMULATOR_CONTEXT: EmulatorContext,
    RecType.CHECKPOINT_END: CheckpointEnd,
    RecType.CHECKPOINT_STATE: CheckpointStateRecord,
}


def decode_body(rtype: int, body: memoryview | bytes) -> object:
    """Decode and check a libxl record body; every unknown type is an error.

    libxl has no optional-record bit: its reader fails on any type it does
    not know (libxl_stream_read.c, process_record).
    """
    codec = _DECODERS.get(rtype)
    if codec is None:
        raise RecordError("unknown record type: libxl refuses it")
    return codec.decode(body)  # type: ignore[attr-defined]


def encode(body: object) -> bytes:
    return encode_record(body.RTYPE, body.encode())  # type: ignore[attr-defined]


END_RECORD: Final = encode_record(RecType.END)
LIBXC_CONTEXT_RECORD: Final = encode_record(RecType.LIBXC_CONTEXT)
CHECKPOINT_END_RECORD: Final = encode_record(RecType.CHECKPOINT_END)


def checkpoint_state_record(state: CheckpointState) -> bytes:
    return encode_record(RecType.CHECKPOINT_STATE, struct.pack("<I", state))
