"""The simulated guest's disk journal: every PUT is written to disk before memory.

A write-ahead log, as a database in a real guest keeps one, so that the
guest's state spans memory *and* disk and a checkpoint is only consistent
if both are taken at the same instant: Remus's disk replication exists for
exactly this. After a failover, the journal's newest sequence number must
equal the one the store's memory header records (``GuestKV.journal_seq``);
without disk replication the secondary's disk lags its memory and the
guest can tell.

Sans-I/O over a block-addressed buffer. Layout: 512-byte records, eight to
a 4 KiB block, used as a ring (record ``seq`` lives in slot ``seq % slots``):
u32 magic "RJ1\\0", u32 crc32 of the rest, u64 seq, u16 key length,
u16 value length, key and value bytes.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from typing import Final

BLOCK: Final = 4096
RECORD: Final = 512
PER_BLOCK: Final = BLOCK // RECORD
MAGIC: Final = b"RJ1\0"
_HDR: Final = struct.Struct("<4sIQHH")
MAX_ITEM: Final = RECORD - _HDR.size

# (offset, data) -> None: the block device's write path (pwrite, then mark dirty)
WriteFn = Callable[[int, bytes], None]
# (offset, length) -> bytes
ReadFn = Callable[[int, int], bytes]


def encode_record(seq: int, key: bytes, value: bytes) -> bytes:
    if len(key) + len(value) > MAX_ITEM:
        raise ValueError(f"journal record of {len(key) + len(value)} bytes > {MAX_ITEM}")
    rest = struct.pack("<QHH", seq, len(key), len(value)) + key + value
    rec = MAGIC + struct.pack("<I", zlib.crc32(rest)) + rest
    return rec.ljust(RECORD, b"\0")


def decode_record(raw: bytes) -> tuple[int, bytes, bytes] | None:
    """(seq, key, value) of a valid record, None for an empty or torn slot."""
    magic, crc, seq, klen, vlen = _HDR.unpack_from(raw)
    if magic != MAGIC or _HDR.size + klen + vlen > RECORD:
        return None
    if zlib.crc32(raw[8 : _HDR.size + klen + vlen]) != crc:
        return None
    key = raw[_HDR.size : _HDR.size + klen]
    return seq, bytes(key), bytes(raw[_HDR.size + klen : _HDR.size + klen + vlen])


class Journal:
    def __init__(self, blocks: int, write: WriteFn, read: ReadFn) -> None:
        if blocks <= 0:
            raise ValueError("a journal needs at least one block")
        self.slots = blocks * PER_BLOCK
        self._write, self._read = write, read

    def append(self, seq: int, key: bytes, value: bytes) -> None:
        self._write((seq % self.slots) * RECORD, encode_record(seq, key, value))

    def scan(self) -> tuple[int, int, dict[bytes, tuple[int, bytes]]]:
        """(newest seq, valid records, key -> (seq, value) of its newest record)."""
        newest, count = 0, 0
        latest: dict[bytes, tuple[int, bytes]] = {}
        size = self.slots * RECORD
        chunk = 64 * BLOCK
        for base in range(0, size, chunk):
            data = self._read(base, min(chunk, size - base))
            for off in range(0, len(data), RECORD):
                rec = decode_record(data[off : off + RECORD])
                if rec is None:
                    continue
                seq, key, value = rec
                count += 1
                newest = max(newest, seq)
                if key not in latest or latest[key][0] < seq:
                    latest[key] = (seq, value)
        return newest, count, latest
