"""A checkpoint gate: a Remus stream in, only whole checkpoints out (sans I/O).

On real Xen the secondary restores through Xen's own code (`xl migrate-receive
-r`), which reads the stream from a pipe. We sit between the primary and that
pipe so that Xen is given a checkpoint only once all of it has arrived: the
bytes up to and including each libxl CHECKPOINT_END are held, then released
in one piece, and the checkpoint's sequence number is reported so the
receiver can ACK it (xl itself acknowledges nothing). When the primary is
lost, what is still held is a partial checkpoint: it is dropped, the pipe is
closed at a checkpoint boundary, and libxc fails over to the last complete
checkpoint having never seen a byte of the broken one.

The gate frames the stream with :class:`StreamDecoder`, so it also rejects a
malformed stream with a :class:`StreamError` naming the offset and record,
and keeps the raw bytes of each framed unit until its checkpoint is whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import libxl
from .decoder import Record, StreamDecoder, StreamType
from .errors import Layer


@dataclass(frozen=True)
class Release:
    """Bytes to hand to Xen now: whole checkpoints (or the stream's clean end)."""

    data: bytes


@dataclass(frozen=True)
class CheckpointComplete:
    """Checkpoint ``seq`` (1-based) was released whole: it may be acknowledged."""

    seq: int
    size: int  # bytes of the checkpoint, with everything since the previous one


GateEvent = Release | CheckpointComplete


class CheckpointGate:
    def __init__(self, start: Layer | None = None) -> None:
        self.decoder = StreamDecoder(start, StreamType.REMUS)
        self._in = bytearray()  # received, not yet framed
        self._held: list[bytes] = []  # framed units of the checkpoint in progress
        self._held_bytes = 0
        self.released = 0  # stream bytes released so far
        self.seq = 0

    @property
    def held(self) -> int:
        """Bytes of the checkpoint in progress (framed or not)."""
        return self._held_bytes + len(self._in)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[GateEvent]:
        self._in += data
        out: list[GateEvent] = []
        pos = 0
        while len(self._in) - pos >= self.decoder.need and not self.decoder.done:
            need = self.decoder.need
            # one copy per unit: the decoder's records keep views of what they are fed
            unit = bytes(self._in[pos : pos + need])
            pos += need
            event = self.decoder.feed(memoryview(unit))
            self._held.append(unit)
            self._held_bytes += need
            if isinstance(event, Record) and (
                event.layer is Layer.LIBXL and event.rtype == libxl.RecType.CHECKPOINT_END
            ):
                out.extend(self._release(checkpoint=True))
            elif self.decoder.done:  # the primary ended the stream (END): all of it
                out.extend(self._release(checkpoint=False))
        del self._in[:pos]
        return out

    def _release(self, checkpoint: bool) -> list[GateEvent]:
        data = b"".join(self._held)
        self._held.clear()
        self._held_bytes = 0
        self.released += len(data)
        events: list[GateEvent] = [Release(data)]
        if checkpoint:
            self.seq += 1
            events.append(CheckpointComplete(self.seq, len(data)))
        return events

    def end_of_stream(self) -> int:
        """The primary is gone: drop what is held; returns how many bytes that was.

        What is held belongs to a checkpoint that never completed; the caller
        then closes Xen's input, which so ends exactly at the last released
        checkpoint (or at the stream's own END, when nothing is held).
        """
        dropped = self.held
        self._in.clear()
        self._held.clear()
        self._held_bytes = 0
        return dropped
