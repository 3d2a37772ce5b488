"""Writes complete, valid streams the way Xen 4.17 lays them out.

Used by `remusctl stream generate`, the benchmarks and the tests; the
record order follows ``xg_sr_save_x86_{pv,hvm}.c`` and
``libxl_stream_write.c`` (protocol notes 4.1.6, 4.3).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from . import libxc, libxl, xl
from .decoder import StreamType
from .errors import Layer
from .framing import encode_record

Chunk = bytes | bytearray | memoryview

HVM_PARAM_STORE_PFN = 1
HVM_PARAM_CONSOLE_PFN = 17


@dataclass(frozen=True)
class SynthSpec:
    domain_type: int = libxc.DomainType.X86_HVM
    pages: int = 256  # guest pages sent in the first pass
    stream_type: StreamType = StreamType.PLAIN
    checkpoints: int = 0  # for REMUS/COLO: checkpoints after the first
    dirty_pages: int = 16  # per later checkpoint
    batch: int = libxc.MAX_BATCH_SIZE
    name: str = "demo-guest"
    top_layer: Layer = Layer.XL  # XL: savefile; LIBXL: libxl stream; LIBXC: bare image
    libxc_version: int = 3


def _page_block(pages: int, seed: int) -> bytearray:
    """Distinct but cheap page contents: each page starts with its index and seed."""
    block = bytearray(pages * libxc.PAGE_SIZE)
    for i in range(pages):
        struct.pack_into("<QQ", block, i * libxc.PAGE_SIZE, i, seed)
    return block


def page_data_records(pfns: list[int], seed: int, batch: int) -> Iterator[Chunk]:
    block = _page_block(min(batch, len(pfns)), seed)
    view = memoryview(block)
    for start in range(0, len(pfns), batch):
        chunk = pfns[start : start + batch]
        record = libxc.PageData.build(chunk, view[: len(chunk) * libxc.PAGE_SIZE])
        yield from record.encode_record_parts()


def _static(spec: SynthSpec) -> Iterator[Chunk]:
    pv = spec.domain_type == libxc.DomainType.X86_PV
    yield libxc.encode_headers(libxc.DomainHeader(spec.domain_type), spec.libxc_version)
    if pv:
        yield libxc.encode(libxc.X86PvInfo(8, 4))
    if spec.libxc_version >= 3:
        yield libxc.encode(libxc.X86CpuidPolicy(((0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69),)))
        yield libxc.encode(libxc.X86MsrPolicy(((0xCE, 0),)))
        yield libxc.encode(libxc.StaticDataEnd())
    if pv:
        frames = max(1, spec.pages // 512)
        yield libxc.encode(libxc.X86PvP2mFrames(0, spec.pages - 1, tuple(range(frames))))


def _end_of_checkpoint(spec: SynthSpec, n: int) -> Iterator[Chunk]:
    yield libxc.encode(libxc.X86TscInfo(0, 2_000_000, 1_000_000 * n, n))
    if spec.domain_type == libxc.DomainType.X86_PV:
        yield libxc.encode(libxc.SharedInfo(bytes(libxc.PAGE_SIZE)))
        ctx = bytes(libxc.PV_VCPU_CONTEXT_SIZE_64)
        yield libxc.encode(libxc.X86PvVcpu(libxc.RecType.X86_PV_VCPU_BASIC, 0, ctx))
    else:
        yield libxc.encode(libxc.HvmContext(struct.pack("<II", 0x54524150, n) + bytes(56)))
        yield libxc.encode(
            libxc.HvmParams(((HVM_PARAM_STORE_PFN, 0xFEFFC), (HVM_PARAM_CONSOLE_PFN, 0xFEFFF)))
        )


def _emulator(spec: SynthSpec, n: int) -> Iterator[Chunk]:
    if spec.domain_type == libxc.DomainType.X86_HVM:
        yield libxl.encode(
            libxl.EmulatorXenstoreData((("physmap/f0000000/start_addr", "f0000000"),))
        )
        yield libxl.encode(libxl.EmulatorContext(b"QEVM" + struct.pack("<I", n) + bytes(24)))


def generate(spec: SynthSpec) -> Iterator[Chunk]:
    """The whole stream as a sequence of buffers (page data is not copied per record)."""
    checkpointed = spec.stream_type in (StreamType.REMUS, StreamType.COLO)
    with_libxl = spec.top_layer is not Layer.LIBXC
    if spec.top_layer is Layer.XL:
        config = {"c_info": {"name": spec.name, "type": "hvm" if spec.domain_type == 2 else "pv"}}
        yield xl.SavefileHeader(json.dumps(config).encode()).encode()
    if with_libxl:
        yield libxl.Header().encode() + libxl.LIBXC_CONTEXT_RECORD
    yield from _static(spec)
    yield from page_data_records(list(range(spec.pages)), 0, spec.batch)
    yield from _end_of_checkpoint(spec, 0)
    if not checkpointed:
        yield libxc.encode(libxc.End())
        if with_libxl:
            yield from _emulator(spec, 0)
            yield libxl.END_RECORD
        return
    for n in range(spec.checkpoints + 1):
        if n:
            dirty = [(n * 7919 + i * 31) % spec.pages for i in range(spec.dirty_pages)]
            yield from page_data_records(sorted(set(dirty)), n, spec.batch)
            yield from _end_of_checkpoint(spec, n)
        yield encode_record(libxc.RecType.CHECKPOINT)
        if with_libxl:
            yield from _emulator(spec, n)
            yield libxl.CHECKPOINT_END_RECORD
            if spec.stream_type is StreamType.COLO:
                yield libxl.checkpoint_state_record(libxl.CheckpointState.NEW)


def write_all(f: BinaryIO, chunks: Iterable[Chunk]) -> int:
    total = 0
    for chunk in chunks:
        total += f.write(chunk)
    return total
