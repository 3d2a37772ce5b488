"""The simulated guest's key-value store: a hash table laid out in guest pages.

Everything the service knows lives in the domain's memory, so whatever a
checkpoint copies is the whole service state: a guest restored from a
checkpoint finds its data where it left it. Sans-I/O: it works on any
buffer (the domain's mmap) and a log-dirty map of one byte per page, and
marks every page it writes *after* writing it, so a saver that clears a
mark before copying the page never loses a write.

Layout (little-endian):
  page 0: magic "RKV1", u32 version, u64 slots, u64 keys, u64 generation,
          u64 journal sequence (the last record the service wrote to its disk
          journal, ``guest.journal``: memory and disk agree on it after a checkpoint);
          from byte 64, the connection table: entries of u16 client port, u16
          service port, u32 used, u64 bytes consumed, u64 bytes produced. A real
          guest's TCP positions live in its kernel, in guest memory, so a
          checkpoint carries them; this is that part of the simulated guest's
          "kernel" (see ``guest.simguest``: a COLO secondary realigns on them)
  pages 1..: slots of 256 bytes: u16 key length, u16 value length, u32 used,
             then key and value bytes (together at most 248)
  the last 1/16 of memory: scratch pages the service dirties on demand
"""

from __future__ import annotations

import struct
import zlib
from typing import Final

PAGE: Final = 4096
SLOT: Final = 256
SLOT_HDR: Final = struct.Struct("<HHI")
MAX_ITEM: Final = SLOT - SLOT_HDR.size
MAGIC: Final = b"RKV1"
HEADER: Final = struct.Struct("<4sIQQQQ")
CONN: Final = struct.Struct("<HHIQQ")
CONN_TABLE: Final = 64
CONN_SLOTS: Final = (PAGE - CONN_TABLE) // CONN.size


class StoreFull(Exception):
    pass


class BadItem(ValueError):
    pass


class GuestKV:
    def __init__(self, memory: memoryview, dirty: memoryview) -> None:
        self.mem = memory
        self.dirty = dirty
        self.pages = len(memory) // PAGE
        self.scratch_pages = max(1, self.pages // 16)
        self.scratch_start = self.pages - self.scratch_pages
        self._scratch_next = 0
        magic, _version, slots, keys, gen, jseq = HEADER.unpack_from(memory, 0)
        if magic == MAGIC:
            self.slots, self.keys, self.generation = slots, keys, gen
            self.journal_seq = jseq
        else:
            self.slots = (self.scratch_start - 1) * (PAGE // SLOT)
            if self.slots <= 0:
                raise BadItem(f"{self.pages} pages are too few for a store")
            self.keys, self.generation, self.journal_seq = 0, 0, 0
            self._write_header()

    def reload(self) -> None:
        """Re-read the header from memory: after a COLO checkpoint the toolstack
        overwrote this guest's memory with the primary's while it was suspended,
        and the guest carries on as the primary's copy (a real guest holds no state
        outside its memory; this process caches the header's counters)."""
        magic, _version, slots, keys, gen, jseq = HEADER.unpack_from(self.mem, 0)
        if magic != MAGIC:
            raise BadItem("no store in memory after a checkpoint")
        self.slots, self.keys, self.generation, self.journal_seq = slots, keys, gen, jseq

    def _mark(self, offset: int, length: int) -> None:
        first, last = offset // PAGE, (offset + length - 1) // PAGE
        self.dirty[first : last + 1] = b"\x01" * (last - first + 1)

    def _write_header(self) -> None:
        HEADER.pack_into(
            self.mem, 0, MAGIC, 1, self.slots, self.keys, self.generation, self.journal_seq
        )
        self._mark(0, HEADER.size)

    def _slot_offset(self, i: int) -> int:
        return PAGE + i * SLOT

    def _find(self, key: bytes) -> tuple[int, bool]:
        """(slot, found) by linear probing from the key's crc32."""
        i = zlib.crc32(key) % self.slots
        for _ in range(self.slots):
            off = self._slot_offset(i)
            klen, _vlen, used = SLOT_HDR.unpack_from(self.mem, off)
            if not used:
                return i, False
            start = off + SLOT_HDR.size
            if klen == len(key) and self.mem[start : start + klen] == key:
                return i, True
            i = (i + 1) % self.slots
        raise StoreFull(f"all {self.slots} slots are used")

    def put(self, key: bytes, value: bytes, journal_seq: int | None = None) -> None:
        if journal_seq is not None:
            self.journal_seq = journal_seq
        if not key or len(key) + len(value) > MAX_ITEM:
            raise BadItem(f"key + value must be 1..{MAX_ITEM} bytes")
        i, found = self._find(key)
        off = self._slot_offset(i)
        item = SLOT_HDR.pack(len(key), len(value), 1) + key + value
        self.mem[off : off + len(item)] = item
        self._mark(off, len(item))
        if not found:
            self.keys += 1
        self.generation += 1
        self._write_header()

    def get(self, key: bytes) -> bytes | None:
        i, found = self._find(key)
        if not found:
            return None
        off = self._slot_offset(i)
        klen, vlen, _ = SLOT_HDR.unpack_from(self.mem, off)
        start = off + SLOT_HDR.size + klen
        return bytes(self.mem[start : start + vlen])

    # -- the connection table ----------------------------------------------------

    def conn_find(self, client_port: int, port: int) -> int | None:
        for i in range(CONN_SLOTS):
            cp, p, used, _c, _o = CONN.unpack_from(self.mem, CONN_TABLE + i * CONN.size)
            if used and cp == client_port and p == port:
                return i
        return None

    def conn_open(self, client_port: int, port: int) -> int | None:
        """A fresh entry (nothing consumed or produced); None when the table is full."""
        i = self.conn_find(client_port, port)
        if i is None:
            for j in range(CONN_SLOTS):
                if not CONN.unpack_from(self.mem, CONN_TABLE + j * CONN.size)[2]:
                    i = j
                    break
            else:
                return None
        self._conn_write(i, client_port, port, 1, 0, 0)
        return i

    def conn_positions(self, i: int) -> tuple[int, int]:
        """(consumed, produced) of entry ``i``."""
        _cp, _p, _used, consumed, produced = CONN.unpack_from(self.mem, CONN_TABLE + i * CONN.size)
        return consumed, produced

    def conn_advance(self, i: int, consumed: int, produced: int) -> None:
        cp, p, used, _c, _o = CONN.unpack_from(self.mem, CONN_TABLE + i * CONN.size)
        self._conn_write(i, cp, p, used, consumed, produced)

    def conn_forget_all(self) -> None:
        """A guest that (re)starts has no connection: a restored image's entries
        name connections of a process that is gone, and would fill the table."""
        for i in range(CONN_SLOTS):
            if CONN.unpack_from(self.mem, CONN_TABLE + i * CONN.size)[2]:
                self.conn_close(i)

    def conn_close(self, i: int) -> None:
        self._conn_write(i, 0, 0, 0, 0, 0)

    def _conn_write(self, i: int, cp: int, p: int, used: int, consumed: int, produced: int) -> None:
        off = CONN_TABLE + i * CONN.size
        CONN.pack_into(self.mem, off, cp, p, used, consumed, produced)
        self._mark(off, CONN.size)

    def dirty_scratch(self, n: int) -> None:
        """Write ``n`` scratch pages (round robin), as a busy guest would."""
        for _ in range(n):
            page = self.scratch_start + self._scratch_next
            self._scratch_next = (self._scratch_next + 1) % self.scratch_pages
            self.generation += 1
            struct.pack_into("<Q", self.mem, page * PAGE, self.generation)
            self.dirty[page] = 1
