"""Thin blocking adapters between files/fds and the sans-I/O stream decoder."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import Protocol

from .decoder import Event, StreamDecoder, StreamEnd
from .errors import StreamError, StreamTruncated
from .verify import Summary, Verifier


class Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


def readinto_exact(f: Readable, view: memoryview, minimum: int | None = None) -> int:
    """Read into ``view`` until at least ``minimum`` (default: all) bytes or EOF."""
    got = 0
    n = len(view) if minimum is None else minimum
    while got < n:
        r = f.readinto(view[got:])
        if not r:
            break
        got += r
    return got


class _Window:
    """Serves exactly-sized units from a file with few, large reads.

    Small units (record headers, small records) come out of one read-ahead
    window; a large unit (PAGE_DATA) is read straight into a buffer of its
    own, so page data is never copied after the read. Read-ahead is only
    for files and pipes we own alone: an fd shared with a helper must use
    exact reads (``read_exact_units``).
    """

    SMALL = 32 << 10

    def __init__(self, f: Readable, size: int = 128 << 10) -> None:
        self.f = f
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self.big = bytearray(0)

    def take(self, n: int, keep: bool) -> memoryview:
        avail = self.end - self.start
        if avail >= n:
            out = self.view[self.start : self.start + n]
            self.start += n
            return memoryview(bytes(out)) if keep else out
        if n <= self.SMALL:
            # move the partial unit (< 32 KiB) to the front and refill behind it
            self.buf[:avail] = self.buf[self.start : self.end]
            self.start, self.end = 0, avail
            self.end += readinto_exact(self.f, self.view[avail:], minimum=n - avail)
            take = min(n, self.end)
            out = self.view[:take]
            self.start = take
            return memoryview(bytes(out)) if keep else out
        if keep or len(self.big) < n:
            target = bytearray(n)
            if not keep:
                self.big = target
        else:
            target = self.big
        tview = memoryview(target)[:n]
        tview[:avail] = self.view[self.start : self.end]
        self.start = self.end = 0
        got = avail + readinto_exact(self.f, tview[avail:])
        return tview[:got]


def iter_events(
    f: Readable, decoder: StreamDecoder, reuse_buffer: bool = True, read_ahead: bool = True
) -> Iterator[Event]:
    """Yield the decoder's events for everything ``f`` holds, ending with StreamEnd.

    With ``reuse_buffer`` a record's body is a view into a buffer that later
    reads overwrite, except for the libxl records of a checkpoint, which a
    reader holds until CHECKPOINT_END and so get buffers of their own. Pass
    False to keep every record.

    ``read_ahead=False`` reads exactly one unit at a time and never a byte
    more: required on an fd shared with another reader (the libxl and libxc
    layers of one stream are read by different processes).
    """
    window = _Window(f) if read_ahead else None
    while True:
        n = decoder.need
        keep = not reuse_buffer or decoder.in_checkpoint
        if window is not None:
            view = window.take(n, keep)
        else:
            view = memoryview(bytearray(n))
            view = view[: readinto_exact(f, view)]
        if len(view) < n:
            yield decoder.eof(len(view))
            return
        event = decoder.feed(view)
        if event is not None:
            yield event


def verify_file(f: Readable, decoder: StreamDecoder | None = None) -> Summary:
    """Verify a whole stream; raises StreamError at the first broken rule."""
    decoder = decoder or StreamDecoder()
    verifier = Verifier(decoder)
    try:
        for event in iter_events(f, decoder):
            if isinstance(event, StreamEnd):
                return verifier.on_end(event)
            verifier.on_event(event)
    except StreamTruncated as exc:
        raise verifier.on_truncated(exc) from None
    raise StreamError(decoder.offset, decoder.describe_unit()[0], "stream", "no end seen")


def open_input(path: str) -> io.FileIO:
    """``-`` is stdin; unbuffered so every readinto is one read(2) at most."""
    if path == "-":
        return io.FileIO(os.dup(0), "rb")
    return io.FileIO(path, "rb")
