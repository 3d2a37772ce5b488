"""Round-trip property tests: encode then decode gives back every record type."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from orchestrator.streams import libxc, libxl, xl
from orchestrator.streams.framing import RECORD_HEADER, padded_length

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
blob = st.binary(max_size=300)
DATA_TYPES = [t for t in libxc.PageType if libxc.page_has_data(t)]


def roundtrip_libxc(body: object, rtype: int) -> object:
    wire = libxc.encode(body)  # type: ignore[arg-type]
    t, length = RECORD_HEADER.unpack_from(wire)
    assert t == rtype
    assert len(wire) == 8 + padded_length(length)
    assert wire[8 + length :] == bytes(len(wire) - 8 - length)
    return libxc.decode_body(t, memoryview(wire)[8 : 8 + length])


@st.composite
def page_data(draw: st.DrawFn) -> libxc.PageData:
    n = draw(st.integers(1, 40))
    words, pages = [], 0
    for _ in range(n):
        ptype = draw(st.sampled_from(list(libxc.PageType)))
        words.append(libxc.pfn_word(draw(st.integers(0, libxc.PFN_MASK)), ptype))
        pages += libxc.page_has_data(ptype)
    seed = draw(st.integers(0, 255))
    return libxc.PageData.build(words, bytes([seed]) * (libxc.PAGE_SIZE * pages))


@given(page_data())
def test_page_data(rec: libxc.PageData) -> None:
    assert roundtrip_libxc(rec, libxc.RecType.PAGE_DATA) == rec


@given(st.sampled_from([4, 8]), st.sampled_from([3, 4]))
def test_pv_info(w: int, levels: int) -> None:
    rec = libxc.X86PvInfo(w, levels)
    assert roundtrip_libxc(rec, libxc.RecType.X86_PV_INFO) == rec


@given(u32, u32, st.lists(u64, max_size=20))
def test_p2m_frames(a: int, b: int, pfns: list[int]) -> None:
    lo, hi = sorted((a, b))
    rec = libxc.X86PvP2mFrames(lo, hi, tuple(pfns))
    assert roundtrip_libxc(rec, libxc.RecType.X86_PV_P2M_FRAMES) == rec


@given(st.sampled_from(sorted(libxc.X86PvVcpu.TYPES)), u32, blob)
def test_pv_vcpu_family(rtype: int, vcpu: int, ctx: bytes) -> None:
    rec = libxc.X86PvVcpu(rtype, vcpu, ctx)
    assert roundtrip_libxc(rec, rtype) == rec


@given(st.binary(max_size=64), st.integers(0, 255))
def test_shared_info(head: bytes, fill: int) -> None:
    rec = libxc.SharedInfo(head + bytes([fill]) * (4096 - len(head)))
    assert roundtrip_libxc(rec, libxc.RecType.SHARED_INFO) == rec


@given(u32, u32, u64, u32)
def test_tsc_info(mode: int, khz: int, nsec: int, inc: int) -> None:
    rec = libxc.X86TscInfo(mode, khz, nsec, inc)
    assert roundtrip_libxc(rec, libxc.RecType.X86_TSC_INFO) == rec


@given(st.binary(min_size=1, max_size=300))
def test_hvm_context(b: bytes) -> None:
    rec = libxc.HvmContext(b)
    assert roundtrip_libxc(rec, libxc.RecType.HVM_CONTEXT) == rec


@given(st.lists(st.tuples(u64, u64), max_size=20))
def test_hvm_params(params: list[tuple[int, int]]) -> None:
    rec = libxc.HvmParams(tuple(params))
    assert roundtrip_libxc(rec, libxc.RecType.HVM_PARAMS) == rec


@given(st.lists(u64, max_size=50))
def test_dirty_pfn_list(pfns: list[int]) -> None:
    rec = libxc.CheckpointDirtyPfnList(tuple(pfns))
    assert roundtrip_libxc(rec, libxc.RecType.CHECKPOINT_DIRTY_PFN_LIST) == rec


@given(st.lists(st.tuples(u32, u32, u32, u32, u32, u32), max_size=20))
def test_cpuid_policy(entries: list[tuple[int, int, int, int, int, int]]) -> None:
    rec = libxc.X86CpuidPolicy(tuple(entries))
    assert roundtrip_libxc(rec, libxc.RecType.X86_CPUID_POLICY) == rec


@given(st.lists(st.tuples(u32, u64), max_size=20))
def test_msr_policy(entries: list[tuple[int, int]]) -> None:
    rec = libxc.X86MsrPolicy(tuple(entries))
    assert roundtrip_libxc(rec, libxc.RecType.X86_MSR_POLICY) == rec


def test_empty_records() -> None:
    for body in (libxc.End(), libxc.Verify(), libxc.Checkpoint(), libxc.StaticDataEnd()):
        assert roundtrip_libxc(body, body.RTYPE) == body


@given(st.sampled_from([2, 3]))
def test_image_header(version: int) -> None:
    assert libxc.ImageHeader.decode(libxc.ImageHeader(version).encode()).version == version


@given(st.sampled_from([1, 2]), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))
def test_domain_header(dtype: int, major: int, minor: int) -> None:
    hdr = libxc.DomainHeader(dtype, major, minor)
    assert libxc.DomainHeader.decode(hdr.encode()) == hdr


# -- libxl ---------------------------------------------------------------------

key = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), min_size=1)
val = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"))


def roundtrip_libxl(body: object) -> object:
    wire = libxl.encode(body)
    t, length = RECORD_HEADER.unpack_from(wire)
    return libxl.decode_body(t, memoryview(wire)[8 : 8 + length])


@given(st.lists(st.tuples(key, val), max_size=8), st.sampled_from(list(libxl.EmulatorId)), u32)
def test_xenstore_data(pairs: list[tuple[str, str]], emu: int, index: int) -> None:
    rec = libxl.EmulatorXenstoreData(tuple(pairs), emu, index)
    assert roundtrip_libxl(rec) == rec


@given(blob, st.sampled_from(list(libxl.EmulatorId)), u32)
def test_emulator_context(b: bytes, emu: int, index: int) -> None:
    rec = libxl.EmulatorContext(b, emu, index)
    assert roundtrip_libxl(rec) == rec


@given(st.sampled_from(list(libxl.CheckpointState)))
def test_checkpoint_state(state: int) -> None:
    rec = libxl.CheckpointStateRecord(state)
    assert roundtrip_libxl(rec) == rec
    assert len(libxl.encode(rec)) == 16


def test_libxl_empty_records() -> None:
    for body in (libxl.End(), libxl.LibxcContext(), libxl.CheckpointEnd()):
        assert roundtrip_libxl(body) == body


@given(st.integers(0, 3))
def test_libxl_header(options: int) -> None:
    opts = options & libxl.OPT_LEGACY
    assert libxl.Header.decode(libxl.Header(opts).encode()).options == opts


@given(st.binary(max_size=200).filter(lambda b: b"\0" not in b))
def test_xl_header(config: bytes) -> None:
    hdr = xl.SavefileHeader(config, xl.FLAG_STREAM_V2)
    wire = hdr.encode()
    mandatory, optional, optlen = xl.SavefileHeader.decode_prefix(wire)
    assert optlen == len(wire) - xl.PREFIX_SIZE
    got = xl.SavefileHeader.decode_optional(mandatory, optional, wire[xl.PREFIX_SIZE :])
    assert got == hdr
    assert struct.unpack_from("<I", wire, xl.PREFIX_SIZE)[0] == len(config) + 1
