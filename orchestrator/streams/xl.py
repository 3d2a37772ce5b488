"""xl's savefile header, written before the libxl stream by `xl save`,
`xl migrate` and `xl remus` (``tools/xl/xl.h``, ``xl_saverestore.c``).

libxl never sees it: xl consumes it and hands libxl the fd positioned at
the libxl header.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import ClassVar, Final, Self

from .errors import RecordError

MAGIC: Final = b"Xen saved domain, xl format\n \0 \r"
BYTEORDER_MARKER: Final = 0x01020304
FLAG_JSON: Final = 1 << 0  # config is libxl JSON, not xl.cfg text
FLAG_STREAM_V2: Final = 1 << 1  # a libxl v2 stream follows (else legacy, pre-4.6)
KNOWN_MANDATORY: Final = FLAG_JSON | FLAG_STREAM_V2
FIXED: Final = struct.Struct("<IIII")
PREFIX_SIZE: Final = len(MAGIC) + FIXED.size  # everything before the optional data


@dataclass(frozen=True, slots=True)
class SavefileHeader:
    config: bytes  # without the terminating NUL
    mandatory_flags: int = FLAG_JSON | FLAG_STREAM_V2
    optional_flags: int = 0

    SIZE_PREFIX: ClassVar[int] = PREFIX_SIZE

    def encode(self) -> bytes:
        config = self.config + b"\0"
        optional = struct.pack("<I", len(config)) + config
        fixed = FIXED.pack(
            BYTEORDER_MARKER, self.mandatory_flags, self.optional_flags, len(optional)
        )
        return MAGIC + fixed + optional

    @staticmethod
    def decode_prefix(buf: memoryview | bytes) -> tuple[int, int, int]:
        """Check magic and fixed fields; return (mandatory, optional, optional_data_len)."""
        if bytes(buf[: len(MAGIC)]) != MAGIC:
            raise RecordError("bad magic (want 'Xen saved domain, xl format\\n \\0 \\r')")
        marker, mandatory, optional, optlen = FIXED.unpack_from(buf, len(MAGIC))
        if marker != BYTEORDER_MARKER:
            raise RecordError(
                f"byte-order marker {marker:#010x} != {BYTEORDER_MARKER:#010x}"
                " (saved on a host of the other endianness)"
            )
        if mandatory & ~KNOWN_MANDATORY:
            raise RecordError(f"unknown mandatory flags {mandatory & ~KNOWN_MANDATORY:#x}")
        if optlen > (1 << 24):
            raise RecordError(f"optional_data_len {optlen} is implausibly large")
        return mandatory, optional, optlen

    @classmethod
    def decode_optional(cls, mandatory: int, optional: int, data: memoryview | bytes) -> Self:
        if len(data) < 4:
            raise RecordError(f"optional data of {len(data)} bytes has no config length")
        (config_len,) = struct.unpack_from("<I", data)
        if config_len > len(data) - 4:
            raise RecordError(f"config_len {config_len} > optional data after it ({len(data) - 4})")
        config = bytes(data[4 : 4 + config_len])
        if config_len and not config.endswith(b"\0"):
            raise RecordError("config is not NUL-terminated")
        config = config[:-1] if config else config
        if mandatory & FLAG_JSON:
            try:
                json.loads(config)
            except ValueError as exc:
                raise RecordError(f"config flagged JSON does not parse: {exc}") from None
        return cls(config, mandatory, optional)

    @property
    def legacy_stream(self) -> bool:
        return not self.mandatory_flags & FLAG_STREAM_V2
