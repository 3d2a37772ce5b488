"""The decoder and verifier on whole streams: good ones in every layout, and
each kind of bad stream with its own one-line message naming the offset."""

from __future__ import annotations

import io
import struct

import pytest

from orchestrator.streams import Layer, Record, StreamDecoder, StreamError, StreamType, libxc, libxl
from orchestrator.streams.fileio import iter_events, verify_file
from orchestrator.streams.framing import encode_record
from orchestrator.streams.synth import SynthSpec, generate
from orchestrator.streams.verify import Summary
from tests.conftest import join

HVM, PV = libxc.DomainType.X86_HVM, libxc.DomainType.X86_PV


def verify(data: bytes, start: Layer | None = None, st: StreamType = StreamType.AUTO) -> Summary:
    return verify_file(io.BytesIO(data), StreamDecoder(start, st))


def stream(**kw: object) -> bytes:
    return join(generate(SynthSpec(**kw)))  # type: ignore[arg-type]


def offsets(data: bytes, layer: Layer, rtype: int) -> list[int]:
    out = []
    for ev in iter_events(io.BytesIO(data), StreamDecoder()):
        if isinstance(ev, Record) and ev.layer is layer and ev.rtype == rtype:
            out.append(ev.offset)
    return out


def bad(data: bytes, st: StreamType = StreamType.AUTO) -> StreamError:
    with pytest.raises(StreamError) as info:
        verify(data, st=st)
    return info.value


@pytest.mark.parametrize("dtype", [HVM, PV])
@pytest.mark.parametrize("layer", [Layer.XL, Layer.LIBXL, Layer.LIBXC])
@pytest.mark.parametrize("stype", [StreamType.PLAIN, StreamType.REMUS, StreamType.COLO])
def test_generated_streams_verify(dtype: int, layer: Layer, stype: StreamType) -> None:
    data = stream(domain_type=dtype, top_layer=layer, stream_type=stype, pages=40, checkpoints=3)
    s = verify(data)
    assert s.bytes == len(data)
    assert s.pages == 40 + (3 * 16 if stype is not StreamType.PLAIN else 0)
    if stype is StreamType.PLAIN:
        assert s.checkpoints == 0 and s.end == "END record"
    else:
        assert s.checkpoints == 4
        assert s.end.startswith("checkpoint boundary")
        want = "remus" if stype is StreamType.REMUS or layer is Layer.LIBXC else "colo"
        assert s.stream_type == want
    assert s.layers[-1] == "libxc"
    # declared stream type agrees with auto-detection
    assert verify(data, st=stype).checkpoints == s.checkpoints


def test_version_2_stream_without_static_records() -> None:
    s = verify(stream(libxc_version=2, pages=8))
    assert s.libxc_version == 2
    assert "libxc STATIC_DATA_END (0x10)" not in s.records


def test_checkpoint_end_outside_checkpoint_is_an_error() -> None:
    data = stream(pages=4)
    end = offsets(data, Layer.LIBXL, libxl.RecType.END)[0]
    e = bad(data[:end] + libxl.CHECKPOINT_END_RECORD + libxl.END_RECORD)
    assert e.offset == end
    assert "CHECKPOINT_END outside a checkpoint" in str(e)


def test_page_data_length_equation_message() -> None:
    data = bytearray(stream(pages=1, top_layer=Layer.LIBXC))
    off = data.index(struct.pack("<II", 1, 8 + 8 + 4096))
    rec = libxc.PageData.build([0x1], bytes(4096))
    # claim two pfns with one page of data: 8 + 16 + 4096 != 8 + 16 + 8192
    body = struct.pack("<IIQQ", 2, 0, 0x1, 0x2) + bytes(rec.data)
    patched = data[:off] + encode_record(1, body) + data[off + 8 + 8 + 8 + 4096 :]
    e = bad(bytes(patched))
    assert str(e) == (
        f"offset {off}: libxc record PAGE_DATA (0x1): body length 4120 != "
        "8 + 8*count + 4096*pages (8216) with count 2, pages 2"
    )


def test_truncated_everywhere_gives_stream_error_with_offset() -> None:
    data = stream(pages=3)
    for cut in range(0, len(data), 97):
        e = bad(data[:cut])
        assert "stream truncated" in str(e) or "unrecognised" in str(e)
        assert e.offset <= cut


def test_truncation_inside_checkpoint_reports_failover_target() -> None:
    data = stream(stream_type=StreamType.REMUS, checkpoints=3, pages=8, domain_type=HVM)
    # cut inside the libxl part of the 3rd checkpoint (between CHECKPOINT and CHECKPOINT_END)
    ends = offsets(data, Layer.LIBXL, libxl.RecType.CHECKPOINT_END)
    e = bad(data[: ends[2] - 3])
    assert "a receiver would fail over to checkpoint 2" in str(e)
    e = bad(data[: ends[0] - 3])
    assert "nothing to fail over to" in str(e)


def test_truncation_in_libxc_part_of_next_checkpoint() -> None:
    data = stream(stream_type=StreamType.REMUS, checkpoints=2, pages=8)
    ends = offsets(data, Layer.LIBXL, libxl.RecType.CHECKPOINT_END)
    e = bad(data[: ends[1] + 8 + 50])
    assert "fail over to checkpoint 2" in str(e)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: b"\0" * 8 + d[8:], "unrecognised first bytes"),
        (lambda d: d[:32] + b"\x01\x02\x03\x04" + d[36:], "byte-order marker"),
        (lambda d: d[:36] + b"\x08\0\0\0" + d[40:], "unknown mandatory flags"),
    ],
)
def test_bad_xl_header(mutate: object, message: str) -> None:
    e = bad(mutate(stream(pages=1)))  # type: ignore[operator]
    assert message in str(e) and e.offset == 0


def _libxc_stream(*records: bytes, dtype: int = HVM) -> bytes:
    return libxc.encode_headers(libxc.DomainHeader(dtype)) + b"".join(records)


def test_unknown_mandatory_record() -> None:
    e = bad(_libxc_stream(encode_record(0x42, b"abc")))
    assert str(e) == (
        "offset 40: libxc record unknown mandatory (0x42): "
        "unknown mandatory record type: a restore must fail"
    )


def test_unknown_optional_record_is_skipped_with_warning() -> None:
    good = stream(top_layer=Layer.LIBXC, pages=2)
    data = good[:40] + encode_record(0x8000_0042, b"xyz") + good[40:]
    s = verify(data)
    assert any("unknown optional record 0x80000042" in w for w in s.warnings)


def test_non_zero_padding() -> None:
    rec = bytearray(encode_record(libxc.RecType.HVM_CONTEXT, b"abc"))
    rec[-1] = 1
    e = bad(_libxc_stream(bytes(rec)))
    assert str(e) == "offset 40: libxc record HVM_CONTEXT (0x9): non-zero padding byte"


def test_reserved_page_type() -> None:
    body = struct.pack("<IIQ", 1, 0, (6 << 60) | 5) + bytes(4096)
    e = bad(_libxc_stream(libxc.encode(libxc.StaticDataEnd()), encode_record(1, body)))
    assert "pfn[0] 0x6000000000000005: reserved page type 0x6" in str(e)
    assert e.offset == 48


def test_reserved_pfn_bits() -> None:
    body = struct.pack("<IIQ", 1, 0, (1 << 55) | 5) + bytes(4096)
    e = bad(_libxc_stream(libxc.encode(libxc.StaticDataEnd()), encode_record(1, body)))
    assert "reserved bits 59-52 set" in str(e)


def test_huge_length_field_refused_before_reading() -> None:
    e = bad(_libxc_stream(struct.pack("<II", 1, 0xFFFF_FFF0)))
    assert "exceeds REC_LENGTH_MAX" in str(e) and e.offset == 40


def test_bad_image_header_fields() -> None:
    good = _libxc_stream()
    assert "bad id" in str(bad(good[:8] + b"XENG" + good[12:]))
    assert "unsupported version 4" in str(bad(good[:12] + b"\0\0\0\x04" + good[16:]))
    assert "big-endian" in str(bad(good[:16] + b"\0\x01" + good[18:]))
    e = bad(good[:24] + b"\x05\0\0\0" + good[28:])
    assert "domain header" in str(e) and e.offset == 24


def test_order_rules() -> None:
    sde = libxc.encode(libxc.StaticDataEnd())
    page = libxc.encode(libxc.PageData.build([1], bytes(4096)))
    assert "PAGE_DATA before STATIC_DATA_END" in str(bad(_libxc_stream(page)))
    pol = libxc.encode(libxc.X86MsrPolicy(((1, 2),)))
    assert "policy record after STATIC_DATA_END" in str(bad(_libxc_stream(sde, pol)))
    pvinfo = libxc.encode(libxc.X86PvInfo())
    assert "PV-only record in an HVM stream" in str(bad(_libxc_stream(pvinfo)))
    assert "PV PAGE_DATA before X86_PV_P2M_FRAMES" in str(
        bad(_libxc_stream(pvinfo, sde, page, dtype=PV))
    )
    end = libxc.encode(libxc.End())
    e = bad(_libxc_stream(sde, page, end))
    assert "no HVM_CONTEXT" in str(e)
    dirty = libxc.encode(libxc.CheckpointDirtyPfnList((1, 2)))
    assert "back channel" in str(bad(_libxc_stream(sde, dirty)))
    assert "TOOLSTACK" in str(bad(_libxc_stream(encode_record(0xB, b"x"))))


def test_emulator_record_in_pv_stream() -> None:
    data = stream(domain_type=PV, pages=2)
    end = offsets(data, Layer.LIBXL, libxl.RecType.END)[0]
    emu = libxl.encode(libxl.EmulatorContext(b"x"))
    e = bad(data[:end] + emu + libxl.END_RECORD)
    assert "only for HVM" in str(e) and e.offset == end


def test_colo_back_channel_state_on_forward_stream() -> None:
    data = stream(stream_type=StreamType.COLO, checkpoints=1, pages=4)
    at = offsets(data, Layer.LIBXL, libxl.RecType.CHECKPOINT_STATE)[0]
    ready = libxl.checkpoint_state_record(libxl.CheckpointState.SVM_READY)
    swapped = data[:at] + ready + data[at + 16 :]
    e = bad(swapped)
    assert e.offset == at and "back channel" in str(e)


def test_trailing_bytes_after_end() -> None:
    data = stream(pages=2)
    e = bad(data + b"go")
    assert e.offset == len(data) and "after the last END" in str(e)


def test_declared_colo_requires_checkpoint_state() -> None:
    data = stream(stream_type=StreamType.REMUS, checkpoints=1, pages=4)
    assert "CHECKPOINT_STATE(NEW) must follow" in str(bad(data, st=StreamType.COLO))


def test_plain_declared_refuses_checkpoint() -> None:
    data = stream(stream_type=StreamType.REMUS, checkpoints=1, pages=4)
    assert "CHECKPOINT in a plain" in str(bad(data, st=StreamType.PLAIN))


def test_page_data_views_point_into_the_receive_buffer() -> None:
    """Zero-copy: decoded pages are views of the buffer the record was read into."""
    page = bytes([7]) * 4096
    wire = bytearray(libxc.encode(libxc.PageData.build([libxc.pfn_word(9)], page)))
    rec = libxc.PageData.decode(memoryview(wire)[8:])
    wire[8 + 16] = 0x55  # first byte of the page in the receive buffer
    assert rec.data[0] == 0x55
    assert rec.data.obj is wire
