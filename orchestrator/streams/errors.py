"""Errors raised by the stream codecs.

Every error carries where it happened (byte offset from the start of the
stream, the layer, the record) so an admin staring at a 2 GiB checkpoint
capture can go straight to the bad bytes with `remusctl stream dump`.
"""

from __future__ import annotations

from enum import StrEnum


class Layer(StrEnum):
    """The three framings that nest in a Xen migration stream."""

    XL = "xl"
    LIBXL = "libxl"
    LIBXC = "libxc"


class StreamError(Exception):
    """A stream that breaks a rule of the xl, libxl or libxc format.

    ``what`` is the record (``"record PAGE_DATA (0x1)"``) or header
    (``"image header"``) the problem was found in; ``offset`` the stream
    offset of its first byte.
    """

    def __init__(self, offset: int, layer: Layer, what: str, message: str) -> None:
        self.offset = offset
        self.layer = layer
        self.what = what
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"offset {self.offset}: {self.layer.value} {self.what}: {self.message}"


class StreamTruncated(StreamError):
    """The stream ended (EOF) before the unit being read was complete."""

    def __init__(self, offset: int, layer: Layer, what: str, needed: int, got: int) -> None:
        self.needed = needed
        self.got = got
        super().__init__(offset, layer, what, f"stream truncated: needed {needed} bytes, got {got}")


class RecordError(ValueError):
    """A record body that is wrong in itself; the decoder adds the location."""
