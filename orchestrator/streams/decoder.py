"""Sans-I/O decoder for whole migration streams: xl, libxl and libxc layers.

The decoder never reads: it says how many bytes it needs next (``need``),
and the caller hands exactly that many to ``feed``. This mirrors how libxl
and libxc share one fd (exact-length reads, never a byte of read-ahead), so
the same decoder can sit on a live stream whose fd is also the helper's.

It checks the framing (headers, lengths, padding, which layer owns the
bytes) and returns events; the record bodies' own rules are in
``libxc.py``/``libxl.py`` and order rules in ``verify.py``.

Layer switching, as libxl writes it:

    [xl savefile header] libxl header, LIBXC_CONTEXT
      libxc: image header, domain header, records ... END -> back to libxl
                                                   ... CHECKPOINT -> libxl
      libxl (checkpoint): [emulator records] CHECKPOINT_END -> back to libxc
      COLO only: CHECKPOINT_STATE(NEW) after each CHECKPOINT_END
    libxl: [emulator records] END

libxl type 5 (CHECKPOINT_STATE) and libxc type 5 (X86_PV_VCPU_EXTENDED)
can both start the unit after CHECKPOINT_END; with ``StreamType.AUTO`` a
type-5 record of length 4 is taken as CHECKPOINT_STATE (a vCPU record is
at least 8 bytes long), which is unambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto
from typing import Final

from . import libxc, libxl, xl
from .errors import Layer, RecordError, StreamError, StreamTruncated
from .framing import (
    REC_LENGTH_MAX,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    padded_length,
    padding_is_zero,
)


class StreamType(Enum):
    """libxl_checkpointed_stream / xc_stream_type_t, plus AUTO for captured files."""

    AUTO = "auto"
    PLAIN = "plain"
    REMUS = "remus"
    COLO = "colo"


class Expect(Enum):
    DETECT = auto()
    XL_PREFIX = auto()
    XL_OPTIONAL = auto()
    LIBXL_HEADER = auto()
    LIBXL_RECORD_HEADER = auto()
    LIBXL_RECORD_BODY = auto()
    LIBXC_IMAGE_HEADER = auto()
    LIBXC_DOMAIN_HEADER = auto()
    LIBXC_RECORD_HEADER = auto()
    LIBXC_RECORD_BODY = auto()
    AFTER_CHECKPOINT_END = auto()  # either layer may come next (COLO)
    DONE = auto()


@dataclass(frozen=True, slots=True)
class Record:
    layer: Layer
    rtype: int
    offset: int  # of the record header
    body: memoryview

    @property
    def name(self) -> str:
        if self.layer is Layer.LIBXC:
            return libxc.record_name(self.rtype)
        return libxl.record_name(self.rtype)

    def error(self, message: str) -> StreamError:
        return StreamError(self.offset, self.layer, f"record {self.name}", message)

    def decode(self) -> object | None:
        """The checked body dataclass; StreamError (with offset) if it breaks a rule."""
        try:
            if self.layer is Layer.LIBXC:
                return libxc.decode_body(self.rtype, self.body)
            return libxl.decode_body(self.rtype, self.body)
        except RecordError as exc:
            raise self.error(str(exc)) from None


@dataclass(frozen=True, slots=True)
class XlHeader:
    offset: int
    header: xl.SavefileHeader


@dataclass(frozen=True, slots=True)
class LibxlHeader:
    offset: int
    header: libxl.Header


@dataclass(frozen=True, slots=True)
class ImageHeader:
    offset: int
    header: libxc.ImageHeader


@dataclass(frozen=True, slots=True)
class DomainHeader:
    offset: int
    header: libxc.DomainHeader


class EndKind(Enum):
    END = "END record"
    CHECKPOINT_BOUNDARY = "checkpoint boundary"  # Remus/COLO streams never write END


@dataclass(frozen=True, slots=True)
class StreamEnd:
    offset: int
    kind: EndKind


Event = XlHeader | LibxlHeader | ImageHeader | DomainHeader | Record | StreamEnd

_LIBXL_IDENT_BYTES: Final = libxl.LIBXL_IDENT.to_bytes(8, "big")
_LIBXC_MARKER_BYTES: Final = b"\xff" * 8


class StreamDecoder:
    """Turns exactly-sized chunks of a stream into events.

    ``start`` fixes the first layer (``None`` detects it from the first 8
    bytes); ``records_only`` skips the headers (the COLO back channel has
    none). After ``LIBXC_CONTEXT`` the libxc layer follows; a stream that
    starts at the libxc layer has no libxl records at all.
    """

    def __init__(
        self,
        start: Layer | None = None,
        stream_type: StreamType = StreamType.AUTO,
        records_only: bool = False,
        offset: int = 0,
    ) -> None:
        self.stream_type = stream_type
        self.offset = offset  # stream offset of the next byte (non-zero: joined mid-stream)
        self.has_libxl = start in (Layer.XL, Layer.LIBXL)
        self.libxc_started = False
        self.in_checkpoint = False  # between libxc CHECKPOINT and libxl CHECKPOINT_END
        self.checkpointed = False  # a CHECKPOINT record has been seen
        self.libxc_records_since_checkpoint = 0
        self._unit_offset = 0
        self._rtype = 0
        self._length = 0
        self._body_layer = Layer.LIBXC
        self._prefix = b""
        self._xl_flags = (0, 0)
        self.expect, self.need = {
            None: (Expect.DETECT, 8),
            Layer.XL: (Expect.XL_PREFIX, xl.PREFIX_SIZE),
            Layer.LIBXL: (Expect.LIBXL_HEADER, libxl.Header.SIZE),
            Layer.LIBXC: (Expect.LIBXC_IMAGE_HEADER, libxc.ImageHeader.SIZE),
        }[start]
        if records_only:
            # a bare run of records with no headers: the COLO back channel
            self.expect = (
                Expect.LIBXL_RECORD_HEADER if start is Layer.LIBXL else Expect.LIBXC_RECORD_HEADER
            )
            self.need = RECORD_HEADER_SIZE
            self.libxc_started = True

    @property
    def done(self) -> bool:
        return self.expect is Expect.DONE

    # -- helpers --------------------------------------------------------------

    def _go(self, expect: Expect, need: int) -> None:
        self.expect, self.need = expect, need
        self._unit_offset = self.offset

    def _fail(self, layer: Layer, what: str, message: str) -> StreamError:
        return StreamError(self._unit_offset, layer, what, message)

    def _record_header(self, layer: Layer, data: memoryview) -> None:
        rtype, length = RECORD_HEADER.unpack(data)
        if length > REC_LENGTH_MAX:
            name = libxc.record_name(rtype) if layer is Layer.LIBXC else libxl.record_name(rtype)
            raise self._fail(
                layer,
                f"record {name}",
                f"body length {length} exceeds REC_LENGTH_MAX ({REC_LENGTH_MAX})",
            )
        self._rtype, self._length, self._body_layer = rtype, length, layer
        expect = Expect.LIBXC_RECORD_BODY if layer is Layer.LIBXC else Expect.LIBXL_RECORD_BODY
        # keep the record's offset (the header's), not the body's
        self.expect, self.need = expect, padded_length(length)

    # -- the one entry point --------------------------------------------------

    def feed(self, data: memoryview) -> Event | None:
        """Consume exactly ``self.need`` bytes; return an event or None."""
        if len(data) != self.need:
            raise ValueError(f"feed wants exactly {self.need} bytes, got {len(data)}")
        self.offset += len(data)
        handler = _HANDLERS[self.expect]
        return handler(self, data)

    def eof(self, got: int = 0) -> StreamEnd:
        """The stream ended with ``got`` bytes of the current unit read.

        Returns how a well-formed stream ended, or raises StreamTruncated.
        """
        boundary = self.libxc_records_since_checkpoint == 0 and self.checkpointed
        if got == 0 and self.expect is Expect.DONE:
            return StreamEnd(self.offset, EndKind.END)
        if got == 0 and self.expect is Expect.AFTER_CHECKPOINT_END:
            return StreamEnd(self.offset, EndKind.CHECKPOINT_BOUNDARY)
        if got == 0 and self.expect is Expect.LIBXC_RECORD_HEADER and boundary:
            return StreamEnd(self.offset, EndKind.CHECKPOINT_BOUNDARY)
        layer, what = self.describe_unit()
        raise StreamTruncated(self._unit_offset, layer, what, self.need, got)

    def skip_libxc(self, offset: int) -> None:
        """The libxc layer (image header to END) was read by the helper, not us.

        libxl hands the fd to libxc at LIBXC_CONTEXT and takes it back when
        the helper exits; ``offset`` is where the fd stands then.
        """
        if self.expect is not Expect.LIBXC_IMAGE_HEADER:
            raise ValueError(f"skip_libxc at {self.expect.name}, not after LIBXC_CONTEXT")
        self.offset = offset
        self._go(Expect.LIBXL_RECORD_HEADER, RECORD_HEADER_SIZE)

    def describe_unit(self) -> tuple[Layer, str]:
        e = self.expect
        if e in (Expect.LIBXC_RECORD_BODY, Expect.LIBXL_RECORD_BODY):
            name = (
                libxc.record_name(self._rtype)
                if self._body_layer is Layer.LIBXC
                else libxl.record_name(self._rtype)
            )
            return self._body_layer, f"record {name} body"
        return {
            Expect.DETECT: (Layer.LIBXC, "stream header"),
            Expect.XL_PREFIX: (Layer.XL, "savefile header"),
            Expect.XL_OPTIONAL: (Layer.XL, "savefile config"),
            Expect.LIBXL_HEADER: (Layer.LIBXL, "header"),
            Expect.LIBXL_RECORD_HEADER: (Layer.LIBXL, "record header"),
            Expect.LIBXC_IMAGE_HEADER: (Layer.LIBXC, "image header"),
            Expect.LIBXC_DOMAIN_HEADER: (Layer.LIBXC, "domain header"),
            Expect.LIBXC_RECORD_HEADER: (Layer.LIBXC, "record header"),
            Expect.AFTER_CHECKPOINT_END: (Layer.LIBXC, "record header"),
            Expect.DONE: (Layer.LIBXL, "trailing data"),
        }[e]

    # -- per-state handlers ---------------------------------------------------

    def _detect(self, data: memoryview) -> Event | None:
        first = bytes(data)
        self._prefix = first
        if first == xl.MAGIC[:8]:
            self.has_libxl = True
            self.expect, self.need = Expect.XL_PREFIX, xl.PREFIX_SIZE - 8
        elif first == _LIBXL_IDENT_BYTES:
            self.has_libxl = True
            self.expect, self.need = Expect.LIBXL_HEADER, libxl.Header.SIZE - 8
        elif first == _LIBXC_MARKER_BYTES:
            self.expect, self.need = Expect.LIBXC_IMAGE_HEADER, libxc.ImageHeader.SIZE - 8
        else:
            raise self._fail(
                Layer.LIBXC,
                "stream header",
                f"unrecognised first bytes {first.hex(' ')}: not an xl savefile "
                "('Xen sav'), a libxl stream ('LibxlFmt') or a libxc image (ff x 8)",
            )
        return None

    def _take_prefix(self, data: memoryview) -> memoryview | bytes:
        if self._prefix:
            joined, self._prefix = self._prefix + bytes(data), b""
            return joined
        return data

    def _xl_prefix(self, data: memoryview) -> Event | None:
        try:
            mandatory, optional, optlen = xl.SavefileHeader.decode_prefix(self._take_prefix(data))
        except RecordError as exc:
            raise self._fail(Layer.XL, "savefile header", str(exc)) from None
        self._xl_flags = (mandatory, optional)
        self.expect, self.need = Expect.XL_OPTIONAL, optlen
        return None

    def _xl_optional(self, data: memoryview) -> Event | None:
        try:
            header = xl.SavefileHeader.decode_optional(*self._xl_flags, data)
        except RecordError as exc:
            raise self._fail(Layer.XL, "savefile header", str(exc)) from None
        if header.legacy_stream:
            raise self._fail(
                Layer.XL,
                "savefile header",
                "legacy (pre-4.6) stream: mandatory flag STREAM_V2 not set; "
                "convert it with convert-legacy-stream first",
            )
        event = XlHeader(self._unit_offset, header)
        self._go(Expect.LIBXL_HEADER, libxl.Header.SIZE)
        return event

    def _libxl_header(self, data: memoryview) -> Event | None:
        try:
            header = libxl.Header.decode(self._take_prefix(data))
        except RecordError as exc:
            raise self._fail(Layer.LIBXL, "header", str(exc)) from None
        event = LibxlHeader(self._unit_offset, header)
        self._go(Expect.LIBXL_RECORD_HEADER, RECORD_HEADER_SIZE)
        return event

    def _libxl_record_header(self, data: memoryview) -> Event | None:
        self._record_header(Layer.LIBXL, data)
        return None

    def _after_checkpoint_end(self, data: memoryview) -> Event | None:
        rtype, length = RECORD_HEADER.unpack(data)
        is_state = rtype == libxl.RecType.CHECKPOINT_STATE and length == 4
        if self.stream_type is StreamType.COLO and not is_state:
            raise self._fail(
                Layer.LIBXL,
                f"record {libxl.record_name(rtype)}",
                "COLO stream: CHECKPOINT_STATE(NEW) must follow CHECKPOINT_END",
            )
        if is_state and self.stream_type is not StreamType.REMUS:
            self._record_header(Layer.LIBXL, data)
        else:
            self._record_header(Layer.LIBXC, data)
        return None

    def _body(self, data: memoryview) -> Record:
        body = data[: self._length]
        if not padding_is_zero(data[self._length :]):
            layer = self._body_layer
            name = (
                libxc.record_name(self._rtype)
                if layer is Layer.LIBXC
                else libxl.record_name(self._rtype)
            )
            raise self._fail(layer, f"record {name}", "non-zero padding byte")
        return Record(self._body_layer, self._rtype, self._unit_offset, body)

    def _libxl_record_body(self, data: memoryview) -> Event | None:
        record = self._body(data)
        rtype = record.rtype
        if rtype == libxl.RecType.LIBXC_CONTEXT:
            if self.libxc_started:
                raise record.error("second LIBXC_CONTEXT: the libxc stream appears once")
            self.libxc_started = True
            self._go(Expect.LIBXC_IMAGE_HEADER, libxc.ImageHeader.SIZE)
        elif rtype == libxl.RecType.END:
            if self.in_checkpoint:
                raise record.error("END inside a checkpoint (before CHECKPOINT_END)")
            self._go(Expect.DONE, 1)
        elif rtype == libxl.RecType.CHECKPOINT_END:
            if not self.in_checkpoint:
                raise record.error("CHECKPOINT_END outside a checkpoint")
            self.in_checkpoint = False
            self.libxc_records_since_checkpoint = 0
            self._go(Expect.AFTER_CHECKPOINT_END, RECORD_HEADER_SIZE)
        elif rtype == libxl.RecType.CHECKPOINT_STATE and self.libxc_started:
            # COLO: NEW sits between CHECKPOINT_END and the next checkpoint's libxc records
            self._go(Expect.LIBXC_RECORD_HEADER, RECORD_HEADER_SIZE)
        else:
            self._go(Expect.LIBXL_RECORD_HEADER, RECORD_HEADER_SIZE)
        return record

    def _libxc_image_header(self, data: memoryview) -> Event | None:
        try:
            header = libxc.ImageHeader.decode(self._take_prefix(data))
        except RecordError as exc:
            raise self._fail(Layer.LIBXC, "image header", str(exc)) from None
        self.libxc_started = True
        event = ImageHeader(self._unit_offset, header)
        self._go(Expect.LIBXC_DOMAIN_HEADER, libxc.DomainHeader.SIZE)
        return event

    def _libxc_domain_header(self, data: memoryview) -> Event | None:
        try:
            header = libxc.DomainHeader.decode(data)
        except RecordError as exc:
            raise self._fail(Layer.LIBXC, "domain header", str(exc)) from None
        event = DomainHeader(self._unit_offset, header)
        self._go(Expect.LIBXC_RECORD_HEADER, RECORD_HEADER_SIZE)
        return event

    def _libxc_record_header(self, data: memoryview) -> Event | None:
        self._record_header(Layer.LIBXC, data)
        return None

    def _libxc_record_body(self, data: memoryview) -> Event | None:
        record = self._body(data)
        rtype = record.rtype
        self.libxc_records_since_checkpoint += 1
        if rtype == libxc.RecType.END:
            if self.has_libxl:
                self._go(Expect.LIBXL_RECORD_HEADER, RECORD_HEADER_SIZE)
            else:
                self._go(Expect.DONE, 1)
        elif rtype == libxc.RecType.CHECKPOINT:
            if self.stream_type is StreamType.PLAIN:
                raise record.error("CHECKPOINT in a plain (non-checkpointed) stream")
            self.checkpointed = True
            self.libxc_records_since_checkpoint = 0
            if self.has_libxl:
                self.in_checkpoint = True
                self._go(Expect.LIBXL_RECORD_HEADER, RECORD_HEADER_SIZE)
            else:
                self._go(Expect.LIBXC_RECORD_HEADER, RECORD_HEADER_SIZE)
        else:
            self._go(Expect.LIBXC_RECORD_HEADER, RECORD_HEADER_SIZE)
        return record

    def _done(self, data: memoryview) -> Event | None:
        # DONE asks for one byte only to tell EOF (good) from trailing bytes (bad)
        raise self._fail(Layer.LIBXL, "trailing data", "bytes after the last END record")


_HANDLERS: Final = {
    Expect.DETECT: StreamDecoder._detect,
    Expect.XL_PREFIX: StreamDecoder._xl_prefix,
    Expect.XL_OPTIONAL: StreamDecoder._xl_optional,
    Expect.LIBXL_HEADER: StreamDecoder._libxl_header,
    Expect.LIBXL_RECORD_HEADER: StreamDecoder._libxl_record_header,
    Expect.LIBXL_RECORD_BODY: StreamDecoder._libxl_record_body,
    Expect.LIBXC_IMAGE_HEADER: StreamDecoder._libxc_image_header,
    Expect.LIBXC_DOMAIN_HEADER: StreamDecoder._libxc_domain_header,
    Expect.LIBXC_RECORD_HEADER: StreamDecoder._libxc_record_header,
    Expect.LIBXC_RECORD_BODY: StreamDecoder._libxc_record_body,
    Expect.AFTER_CHECKPOINT_END: StreamDecoder._after_checkpoint_end,
    Expect.DONE: StreamDecoder._done,
}
