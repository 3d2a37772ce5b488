"""Byte-level vectors from the protocol notes (sections 4.1.1-4.1.5, 4.2, 4.4)."""

from __future__ import annotations

import struct

from orchestrator.streams import libxc, libxl, xl
from orchestrator.streams.framing import encode_record


def h(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", ""))


def test_image_header_as_written_by_4_17() -> None:
    want = h("ff ff ff ff ff ff ff ff 58 45 4e 46 00 00 00 03 00 00 00 00 00 00 00 00")
    assert libxc.ImageHeader(3).encode() == want
    assert libxc.ImageHeader.decode(want) == libxc.ImageHeader(3)


def test_domain_header_hvm_on_4_17() -> None:
    want = h("02 00 00 00 0c 00 00 00 04 00 00 00 11 00 00 00")
    hdr = libxc.DomainHeader(libxc.DomainType.X86_HVM, 4, 17)
    assert hdr.encode() == want
    assert libxc.DomainHeader.decode(want) == hdr


def test_page_data_example_two_pfns_one_xtab() -> None:
    page = bytes(range(256)) * 16
    rec = libxc.PageData.build(
        [libxc.pfn_word(0x100), libxc.pfn_word(0x200, libxc.PageType.XTAB)], page
    )
    wire = libxc.encode(rec)
    assert wire[:8] == h("01 00 00 00 18 10 00 00")
    assert wire[8:16] == h("02 00 00 00 00 00 00 00")
    assert wire[16:24] == h("00 01 00 00 00 00 00 00")
    assert wire[24:32] == h("00 02 00 00 00 00 00 f0")
    assert wire[32:] == page
    assert len(wire) == 4128
    decoded = libxc.PageData.decode(wire[8:])
    assert decoded.count == 2 and decoded.pages == 1
    assert list(decoded.iter_pages())[1] == (0x200, libxc.PageType.XTAB, None)


def test_libxl_header_and_small_records() -> None:
    assert libxl.Header().encode() == h("4c 69 62 78 6c 46 6d 74 00 00 00 02 00 00 00 00")
    assert h("01 00 00 00 00 00 00 00") == libxl.LIBXC_CONTEXT_RECORD
    assert h("04 00 00 00 00 00 00 00") == libxl.CHECKPOINT_END_RECORD
    assert libxl.checkpoint_state_record(libxl.CheckpointState.SVM_READY) == h(
        "05 00 00 00 04 00 00 00 02 00 00 00 00 00 00 00"
    )


def test_emulator_records_include_sub_header_in_length() -> None:
    wire = libxl.encode(libxl.EmulatorContext(b"abc", libxl.EmulatorId.QEMU_UPSTREAM, 0))
    rtype, length = struct.unpack_from("<II", wire)
    assert (rtype, length) == (3, 11)
    assert len(wire) == 8 + 16  # padded to 8
    assert wire[8:16] == h("02 00 00 00 00 00 00 00")


def test_xl_savefile_header_layout() -> None:
    assert (
        h(
            "58 65 6e 20 73 61 76 65 64 20 64 6f 6d 61 69 6e 2c 20 78 6c 20 66 6f 72 6d 61 74 0a"
            " 20 00 20 0d"
        )
        == xl.MAGIC
    )
    wire = xl.SavefileHeader(b'{"c_info": {}}').encode()
    marker, mandatory, optional, optlen = struct.unpack_from("<IIII", wire, 32)
    assert (marker, mandatory, optional) == (0x01020304, 3, 0)
    assert optlen == 4 + 15
    assert struct.unpack_from("<I", wire, 48)[0] == 15
    assert wire.endswith(b"}}\0")


def test_checkpoint_and_end_records_are_empty() -> None:
    assert encode_record(libxc.RecType.CHECKPOINT) == h("0e 00 00 00 00 00 00 00")
    assert libxc.encode(libxc.End()) == bytes(8)
