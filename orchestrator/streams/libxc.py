"""The libxc layer: "Domain Image Format", spec revision 3 (Xen 4.14+; v2 read too).

Image header (big-endian), domain header, and the record bodies 0x00-0x12,
each as a small frozen dataclass with ``encode()`` and a ``decode(body)``
classmethod that checks every rule of the body against the spec
(``docs/specs/libxc-migration-stream.pandoc``, ``xg_sr_stream_format.h``).
Decoders raise :class:`RecordError`; the stream decoder adds the offset.

PAGE_DATA is kept zero-copy: the decoded record holds memoryviews into the
receive buffer, and its checks run at C speed over the pfn array (no Python
loop per page).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Final, Protocol, Self

from .errors import RecordError
from .framing import REC_LENGTH_MAX, empty_body, encode_record, encode_record_parts

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT

IHDR_MARKER: Final = 0xFFFF_FFFF_FFFF_FFFF
IHDR_ID: Final = 0x58454E46  # "XENF"
IHDR_OPT_BIG_ENDIAN: Final = 1
IHDR: Final = struct.Struct(">QIIHHI")
DHDR: Final = struct.Struct("<IHHII")
SUPPORTED_VERSIONS: Final = (2, 3)

OPTIONAL_RECORD: Final = 0x8000_0000

# sizeof(vcpu_guest_context_t) for a 64-bit PV guest: libxc's restore refuses an
# X86_PV_VCPU_BASIC record of any other size (xg_sr_restore_x86_pv.c).
PV_VCPU_CONTEXT_SIZE_64: Final = 5168

# MAX_BATCH_SIZE in xg_save_restore.h: the saver never puts more pfns in one PAGE_DATA.
MAX_BATCH_SIZE: Final = 1024


class RecType(IntEnum):
    END = 0x00
    PAGE_DATA = 0x01
    X86_PV_INFO = 0x02
    X86_PV_P2M_FRAMES = 0x03
    X86_PV_VCPU_BASIC = 0x04
    X86_PV_VCPU_EXTENDED = 0x05
    X86_PV_VCPU_XSAVE = 0x06
    SHARED_INFO = 0x07
    X86_TSC_INFO = 0x08
    HVM_CONTEXT = 0x09
    HVM_PARAMS = 0x0A
    TOOLSTACK = 0x0B
    X86_PV_VCPU_MSRS = 0x0C
    VERIFY = 0x0D
    CHECKPOINT = 0x0E
    CHECKPOINT_DIRTY_PFN_LIST = 0x0F
    STATIC_DATA_END = 0x10
    X86_CPUID_POLICY = 0x11
    X86_MSR_POLICY = 0x12


# Records a v2 stream (Xen 4.6-4.13) cannot contain.
V3_ONLY: Final = frozenset(
    {RecType.STATIC_DATA_END, RecType.X86_CPUID_POLICY, RecType.X86_MSR_POLICY}
)
PV_ONLY: Final = frozenset(
    {
        RecType.X86_PV_INFO,
        RecType.X86_PV_P2M_FRAMES,
        RecType.X86_PV_VCPU_BASIC,
        RecType.X86_PV_VCPU_EXTENDED,
        RecType.X86_PV_VCPU_XSAVE,
        RecType.X86_PV_VCPU_MSRS,
        RecType.SHARED_INFO,
    }
)
HVM_ONLY: Final = frozenset({RecType.HVM_CONTEXT, RecType.HVM_PARAMS})


def record_name(rtype: int) -> str:
    """``PAGE_DATA (0x1)``; unknown types keep their number and optional bit."""
    try:
        return f"{RecType(rtype).name} ({rtype:#x})"
    except ValueError:
        kind = "optional" if rtype & OPTIONAL_RECORD else "mandatory"
        return f"unknown {kind} ({rtype:#x})"


class DomainType(IntEnum):
    X86_PV = 1
    X86_HVM = 2
    X86_PVH = 3
    ARM = 4


class PageType(IntEnum):
    """XEN_DOMCTL_PFINFO_* as carried in bits 63-60 of a PAGE_DATA pfn word."""

    NOTAB = 0x0
    L1TAB = 0x1
    L2TAB = 0x2
    L3TAB = 0x3
    L4TAB = 0x4
    L1TAB_PIN = 0x9
    L2TAB_PIN = 0xA
    L3TAB_PIN = 0xB
    L4TAB_PIN = 0xC
    BROKEN = 0xD
    XALLOC = 0xE
    XTAB = 0xF


PFN_MASK: Final = (1 << 52) - 1
PFN_RESERVED_MASK: Final = ((1 << 60) - 1) & ~PFN_MASK
TYPE_SHIFT: Final = 60
RESERVED_PAGE_TYPES: Final = frozenset({5, 6, 7, 8})
NO_DATA_PAGE_TYPES: Final = frozenset({PageType.BROKEN, PageType.XALLOC, PageType.XTAB})


def pfn_word(pfn: int, ptype: int = PageType.NOTAB) -> int:
    return (ptype << TYPE_SHIFT) | pfn


def page_has_data(ptype: int) -> bool:
    return ptype not in NO_DATA_PAGE_TYPES


# --- headers ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageHeader:
    version: int = 3
    options: int = 0

    SIZE: ClassVar[int] = IHDR.size

    def encode(self) -> bytes:
        return IHDR.pack(IHDR_MARKER, IHDR_ID, self.version, self.options, 0, 0)

    @classmethod
    def decode(cls, buf: memoryview | bytes) -> Self:
        marker, ident, version, options, res1, res2 = IHDR.unpack(buf)
        if marker != IHDR_MARKER:
            raise RecordError(
                f"bad marker {marker:#018x} (want {IHDR_MARKER:#x}; zero bits mean a legacy"
                " pre-4.6 image, which needs convert-legacy-stream)"
            )
        if ident != IHDR_ID:
            raise RecordError(f"bad id {ident:#010x} (want {IHDR_ID:#x} 'XENF')")
        if version not in SUPPORTED_VERSIONS:
            raise RecordError(f"unsupported version {version} (Xen 4.17 reads 2 and 3)")
        if options & IHDR_OPT_BIG_ENDIAN:
            raise RecordError("big-endian stream (options bit 0): refused by Xen's restore")
        if options & ~IHDR_OPT_BIG_ENDIAN:
            raise RecordError(f"reserved option bits set: {options & 0xFFFE:#06x}")
        if res1 or res2:
            raise RecordError(f"reserved fields not zero: {res1:#06x} {res2:#010x}")
        return cls(version, options)


@dataclass(frozen=True, slots=True)
class DomainHeader:
    domain_type: int = DomainType.X86_HVM
    xen_major: int = 4
    xen_minor: int = 17
    page_shift: int = PAGE_SHIFT

    SIZE: ClassVar[int] = DHDR.size

    def encode(self) -> bytes:
        return DHDR.pack(self.domain_type, self.page_shift, 0, self.xen_major, self.xen_minor)

    @classmethod
    def decode(cls, buf: memoryview | bytes) -> Self:
        dtype, page_shift, res, major, minor = DHDR.unpack(buf)
        if dtype not in (DomainType.X86_PV, DomainType.X86_HVM):
            what = DomainType(dtype).name if dtype in DomainType._value2member_map_ else "reserved"
            raise RecordError(
                f"domain type {dtype:#x} ({what}) is not restorable by Xen 4.17 (x86 PV 1, HVM 2)"
            )
        if page_shift != PAGE_SHIFT:
            raise RecordError(f"page_shift {page_shift} (want {PAGE_SHIFT})")
        if res:
            raise RecordError(f"reserved field not zero: {res:#06x}")
        return cls(dtype, major, minor, page_shift)

    @property
    def is_hvm(self) -> bool:
        return self.domain_type == DomainType.X86_HVM


# --- record bodies ---------------------------------------------------------


class Body(Protocol):
    RTYPE: ClassVar[int]

    def encode(self) -> bytes: ...


def _exact(body: memoryview | bytes, size: int, name: str) -> None:
    if len(body) != size:
        raise RecordError(f"body length {len(body)} != {size}")


End = empty_body(RecType.END)
Verify = empty_body(RecType.VERIFY)
Checkpoint = empty_body(RecType.CHECKPOINT)
StaticDataEnd = empty_body(RecType.STATIC_DATA_END)

_PAGE_DATA_HDR: Final = struct.Struct("<II")

# Byte-translation tables over the top two bytes of each little-endian pfn word:
# byte 7 holds the type nibble and reserved bits 59-56, byte 6 reserved bits 55-52.
_HIGH_CLASS: Final = bytes(
    0xFF if (b & 0x0F) or (b >> 4) in RESERVED_PAGE_TYPES else int(page_has_data(b >> 4))
    for b in range(256)
)
_MID_BAD: Final = bytes(1 if b & 0xF0 else 0 for b in range(256))


@dataclass(frozen=True, slots=True, eq=False)
class PageData:
    """PAGE_DATA: pfn words (type in bits 63-60) and the pages that carry data.

    ``words`` and ``data`` are views into the buffer the record was decoded
    from; nothing is copied. ``data`` holds the pages in pfn order, skipping
    pfns whose type carries no data (BROKEN, XALLOC, XTAB).
    """

    words: memoryview  # format "Q"
    data: memoryview  # format "B", 4096 * pages bytes

    RTYPE: ClassVar[int] = RecType.PAGE_DATA

    @classmethod
    def build(cls, words: Sequence[int], data: bytes | bytearray | memoryview) -> Self:
        arr = memoryview(struct.pack(f"<{len(words)}Q", *words)).cast("Q")
        return cls(arr, memoryview(data).cast("B"))

    @property
    def count(self) -> int:
        return len(self.words)

    @property
    def pages(self) -> int:
        return len(self.data) // PAGE_SIZE

    def encode_parts(self) -> list[bytes | bytearray | memoryview]:
        return [_PAGE_DATA_HDR.pack(self.count, 0), self.words.cast("B"), self.data]

    def encode(self) -> bytes:
        return b"".join(bytes(p) for p in self.encode_parts())

    def encode_record_parts(self) -> list[bytes | bytearray | memoryview]:
        return encode_record_parts(self.RTYPE, self.encode_parts())

    def iter_pages(self) -> Iterator[tuple[int, int, memoryview | None]]:
        """(pfn, page type, page view or None) for each pfn word."""
        off = 0
        for word in self.words:
            ptype = word >> TYPE_SHIFT
            if page_has_data(ptype):
                yield word & PFN_MASK, ptype, self.data[off : off + PAGE_SIZE]
                off += PAGE_SIZE
            else:
                yield word & PFN_MASK, ptype, None

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PageData)
            and self.words.tolist() == other.words.tolist()
            and self.data == other.data
        )

    @classmethod
    def decode(cls, body: memoryview | bytes) -> Self:
        view = memoryview(body).cast("B")
        if len(view) < 8:
            raise RecordError(f"body length {len(view)} < 8 (count, reserved)")
        count, reserved = _PAGE_DATA_HDR.unpack_from(view)
        if count == 0:
            raise RecordError("count is 0 (must be > 0)")
        if reserved:
            raise RecordError(f"reserved field not zero: {reserved:#010x}")
        words_end = 8 + 8 * count
        if len(view) < words_end:
            raise RecordError(
                f"body length {len(view)} < 8 + 8*count ({words_end}) for count {count}"
            )
        words = view[8:words_end]
        high = bytes(words[7::8]).translate(_HIGH_CLASS)
        bad = high.find(0xFF)
        if bad >= 0:
            word = struct.unpack_from("<Q", words, 8 * bad)[0]
            ptype = word >> TYPE_SHIFT
            if ptype in RESERVED_PAGE_TYPES:
                raise RecordError(f"pfn[{bad}] {word:#018x}: reserved page type {ptype:#x}")
            raise RecordError(
                f"pfn[{bad}] {word:#018x}: reserved bits 59-52 set ({word & PFN_RESERVED_MASK:#x})"
            )
        mid = bytes(words[6::8]).translate(_MID_BAD)
        bad = mid.find(1)
        if bad >= 0:
            word = struct.unpack_from("<Q", words, 8 * bad)[0]
            raise RecordError(
                f"pfn[{bad}] {word:#018x}: reserved bits 59-52 set ({word & PFN_RESERVED_MASK:#x})"
            )
        pages = high.count(1)
        want = words_end + PAGE_SIZE * pages
        if len(view) != want:
            raise RecordError(
                f"body length {len(view)} != 8 + 8*count + 4096*pages ({want}) "
                f"with count {count}, pages {pages}"
            )
        return cls(words.cast("Q"), view[words_end:])


@dataclass(frozen=True, slots=True)
class X86PvInfo:
    guest_width: int = 8
    pt_levels: int = 4

    RTYPE: ClassVar[int] = RecType.X86_PV_INFO
    FMT: ClassVar[struct.Struct] = struct.Struct("<BBHI")

    def encode(self) -> bytes:
        return self.FMT.pack(self.guest_width, self.pt_levels, 0, 0)

    @classmethod
    def decode(cls, body: memoryview | bytes) -> Self:
        _exact(body, 8, "X86_PV_INFO")
        width, levels, res1, res2 = cls.FMT.unpack(body)
        if width not in (4, 8):
            raise RecordError(f"guest_width {width} (want 4 or 8)")
        if levels not in (3, 4):
            raise RecordError(f"pt_levels {levels} (want 3 or 4)")
        if res1 or res2:
            raise RecordError("reserved bytes not zero")
        return cls(width, levels)


@dataclass(frozen=True, slots=True)
class X86PvP2mFrames:
    start_pfn: int
    end_pfn: int
    p2m_pfns: tuple[int, ...]

    RTYPE: ClassVar[int] = RecType.X86_PV_P2M_FRAMES

    def encode(self) -> bytes:
        n = len(self.p2m_pfns)
        return struct.pack(f"<II{n}Q", self.start_pfn, self.end_pfn, *self.p2m_pfns)

    @classmethod
    def decode(cls, body: memoryview | bytes) -> Self:
        if len(body) < 8 or len(body) % 8:
            raise RecordError(f"body length {len(body)}: want 8 + 8*n")
        start, end = struct.unpack_from("<II", body)
        if end < start:
            raise RecordError(f"p2m_end_pfn {end:#x} < p2m_start_pfn {start:#x}")
        pfns = struct.unpack_from(f"<{(len(body) - 8) // 8}Q", body, 8)
        return cls(start, end, pfns)


@dataclass(frozen=True, slots=True)
class X86PvVcpu:
    """X86_PV_VCPU_{BASIC,EXTENDED,XSAVE,MSRS}: vcpu header + a hypercall blob."""

    rtype: int
    vcpu_id: int
    context: bytes

    RTYPE: ClassVar[int] = RecType.X86_PV_VCPU_BASIC  # the family's first member
    TYPES: ClassVar[frozenset[int]] = frozenset(
        {
            RecType.X86_PV_VCPU_BASIC,
            RecType.X86_PV_VCPU_EXTENDED,
            RecType.X86_PV_VCPU_XSAVE,
            RecType.X86_PV_VCPU_MSRS,
        }
    )

    def encode(self) -> bytes:
        return struct.pack("<II", self.vcpu_id, 0) + self.context

    @classmethod
    def decode_as(cls, rtype: int, body: memoryview | bytes) -> Self:
        # Zero-length context is accepted: 4.6-4.8 senders wrote such records (spec errata).
        if len(body) < 8:
            raise RecordError(f"body length {len(body)} < 8 (vcpu_id, reserved)")
        vcpu, res = struct.unpack_from("<II", body)
        if res:
            raise RecordError(f"reserved field not zero: {res:#010x}")
        return cls(rtype, vcpu, bytes(body[8:]))


@dataclass(frozen=True, slots=True)
class SharedInfo:
    page: bytes

    RTYPE: ClassVar[int] = RecType.SHARED_INFO

    def encode(self) -> bytes:
        return self.page

    @classmethod
    def decode(cls, body: memoryview | bytes) -> Self:
        _exact(body, PAGE_SIZE, "SHARED_INFO")
        return cls(bytes(body))


@dataclass(frozen=True, slots=True)
class X86TscInfo:
    mode: int = 0
    khz: int = 0
    nsec: int = 0
    incarnation: int = 0

    RTYPE: ClassVar[int] = RecType.X86_TSC_INFO
    FMT: ClassVar[struct.Struct] = struct.Struct("<IIQII")

    def encode(self) -> bytes:
        return self.FMT.pack(self.mode, self.khz, self.nsec, self.incarnation, 0)

    @classmethod
    def decode(cls, body: memoryview | bytes) -> Self:
        _exact(body, 24, "X86_TSC_INFO")
        mode, khz, nsec, inc, res = cls.FMT.unpack(body)
        if res:
            raise RecordError(f"reserved field not zero: {res:#010x}")
        return cls(mode, khz, nsec, inc)


@dataclass(frozen=True, slots=True)
class HvmContext:
    blob: bytes

    RTYPE: ClassVar[int] = RecType.HVM_CONTEXT

    def encode(self) -> bytes:
        return self.blob

    @classmethod
    def decode(cls, body: memoryview | bytes) -> Self:
        if not len(body):
            raise RecordError("empty HVM context")
        return cls(bytes(body))


@dataclass(frozen=True, slots=True)
class HvmParams:
    params: tuple[tuple[int, int], ...]

    RTYPE: ClassVar[int] = RecType.HVM_PARAMS

    def encode(self) -> bytes:
        flat = [x for pair in self.params for x in pair]
        return struct.pack(f"<II{len(flat)}Q", len(self.params), 0, *flat)

    @classmethod
    def decode(cls, body: memoryview | bytes) -> Self:
        if len(body) < 8:
            raise RecordError(f"body length {len(body)} < 8 (count, reserved)")
        count, res = struct.unpack_from("<II", body)
        if res:
            raise RecordError(f"reserved field not zero: {res:#010x}")
        if len(body) != 8 + 16 * count:
            raise RecordError(f"body length {len(body)} != 8 + 16*count ({8 + 16 * count})")
        flat = struct.unpack_from(f"<{2 * count}Q", body, 8)
        return cls(tuple(zip(flat[::2], flat[1::2], strict=True)))


@dataclass(frozen=True, slots=True)
class CheckpointDirtyPfnList:
    pfns: tuple[int, ...]

    RTYPE: ClassVar[int] = RecType.CHECKPOINT_DIRTY_PFN_LIST

    def encode(self) -> bytes:
        return struct.pack(f"<{len(self.pfns)}Q", *self.pfns)

    @classmethod
    def decode(cls, body: memoryview | bytes) -> Self:
        if len(body) % 8:
            raise RecordError(f"body length {len(body)} is not a multiple of 8")
        return cls(struct.unpack(f"<{len(body) // 8}Q", body))


@dataclass(frozen=True, slots=True)
class X86CpuidPolicy:
    """xen_cpuid_leaf_t entries: leaf, subleaf, a, b, c, d (u32 each)."""

    entries: tuple[tuple[int, int, int, int, int, int], ...]

    RTYPE: ClassVar[int] = RecType.X86_CPUID_POLICY

    def encode(self) -> bytes:
        flat = [x for e in self.entries for x in e]
        return struct.pack(f"<{len(flat)}I", *flat)

    @classmethod
    def decode(cls, body: memoryview | bytes) -> Self:
        if len(body) % 24:
            raise RecordError(f"body length {len(body)} is not a multiple of 24")
        flat = struct.unpack(f"<{len(body) // 4}I", body)
        return cls(tuple(tuple(flat[i : i + 6]) for i in range(0, len(flat), 6)))


@dataclass(frozen=True, slots=True)
class X86MsrPolicy:
    """xen_msr_entry_t entries: idx (u32), flags (u32, must be 0), val (u64)."""

    entries: tuple[tuple[int, int], ...]

    RTYPE: ClassVar[int] = RecType.X86_MSR_POLICY

    def encode(self) -> bytes:
        return b"".join(struct.pack("<IIQ", idx, 0, val) for idx, val in self.entries)

    @classmethod
    def decode(cls, body: memoryview | bytes) -> Self:
        if len(body) % 16:
            raise RecordError(f"body length {len(body)} is not a multiple of 16")
        out = []
        for i, (idx, flags, val) in enumerate(struct.iter_unpack("<IIQ", body)):
            if flags:
                raise RecordError(f"entry {i}: flags {flags:#x} not zero")
            out.append((idx, val))
        return cls(tuple(out))


_DECODERS: Final[dict[int, type]] = {
    RecType.END: End,
    RecType.PAGE_DATA: PageData,
    RecType.X86_PV_INFO: X86PvInfo,
    RecType.X86_PV_P2M_FRAMES: X86PvP2mFrames,
    RecType.SHARED_INFO: SharedInfo,
    RecType.X86_TSC_INFO: X86TscInfo,
    RecType.HVM_CONTEXT: HvmContext,
    RecType.HVM_PARAMS: HvmParams,
    RecType.VERIFY: Verify,
    RecType.CHECKPOINT: Checkpoint,
    RecType.CHECKPOINT_DIRTY_PFN_LIST: CheckpointDirtyPfnList,
    RecType.STATIC_DATA_END: StaticDataEnd,
    RecType.X86_CPUID_POLICY: X86CpuidPolicy,
    RecType.X86_MSR_POLICY: X86MsrPolicy,
}


def decode_body(rtype: int, body: memoryview | bytes) -> object | None:
    """Decode and check a record body; None for an unknown optional record.

    Raises RecordError for a body that breaks its rules, an unknown mandatory
    record, and the deprecated TOOLSTACK record (Xen 4.17's restore refuses it).
    """
    if len(body) > REC_LENGTH_MAX:
        raise RecordError(f"body length {len(body)} exceeds REC_LENGTH_MAX ({REC_LENGTH_MAX})")
    if rtype in X86PvVcpu.TYPES:
        return X86PvVcpu.decode_as(rtype, body)
    codec = _DECODERS.get(rtype)
    if codec is not None:
        return codec.decode(body)  # type: ignore[attr-defined, no-any-return]
    if rtype == RecType.TOOLSTACK:
        raise RecordError("deprecated TOOLSTACK record: Xen 4.17 refuses it")
    if rtype & OPTIONAL_RECORD:
        return None
    raise RecordError("unknown mandatory record type: a restore must fail")


def encode(body: Body) -> bytes:
    """A whole record (header, body, padding) for any body dataclass."""
    rtype = body.rtype if isinstance(body, X86PvVcpu) else body.RTYPE
    return encode_record(rtype, body.encode())


def encode_headers(domain: DomainHeader, version: int = 3) -> bytes:
    return ImageHeader(version).encode() + domain.encode()
