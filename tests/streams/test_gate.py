"""The checkpoint gate: only whole checkpoints are released, a partial one is dropped."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.streams import StreamError, StreamType
from orchestrator.streams.errors import Layer
from orchestrator.streams.gate import CheckpointComplete, CheckpointGate, Release
from orchestrator.streams.synth import SynthSpec, generate

from ..conftest import join

# an xl savefile header, the libxl header, the initial copy and 3 more checkpoints
SPEC = SynthSpec(pages=40, stream_type=StreamType.REMUS, checkpoints=3, dirty_pages=5, batch=16)
STREAM = join(generate(SPEC))


def run(chunks: list[bytes]) -> tuple[bytes, list[int], CheckpointGate]:
    gate = CheckpointGate()
    released, seqs = bytearray(), []
    last = b""
    for c in chunks:
        for ev in gate.receive_data(c):
            if isinstance(ev, Release):
                released += ev.data
                last = ev.data
            elif isinstance(ev, CheckpointComplete):
                seqs.append(ev.seq)
                assert ev.size == len(last)  # the checkpoint's bytes came just before it
    assert len(released) == gate.released
    return bytes(released), seqs, gate


def test_whole_stream_releases_every_checkpoint_byte_for_byte() -> None:
    released, seqs, gate = run([STREAM])
    assert seqs == [1, 2, 3, 4]
    assert released == STREAM  # a Remus stream ends at a checkpoint: nothing is held
    assert gate.held == 0 and gate.end_of_stream() == 0


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_arbitrary_splits_and_a_cut_release_only_whole_checkpoints(data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(STREAM)))
    points = sorted(data.draw(st.lists(st.integers(0, cut), max_size=12)))
    chunks = [STREAM[a:b] for a, b in zip([0, *points], [*points, cut], strict=True)]
    released, seqs, gate = run(chunks)
    # what was released is a prefix that ends exactly at a CHECKPOINT_END
    assert STREAM.startswith(released)
    whole = run([STREAM[: len(released)]])[1]
    assert seqs == whole and (not seqs or len(run([released])[0]) == len(released))
    dropped = gate.end_of_stream()
    assert dropped == cut - len(released)


def test_a_malformed_stream_is_a_stream_error_naming_the_offset() -> None:
    bad = bytearray(STREAM)
    # the first libxl record after the libxl header is LIBXC_CONTEXT: make its length absurd
    start = STREAM.index(b"\x01\x00\x00\x00\x00\x00\x00\x00", 0x40)
    bad[start + 4 : start + 8] = (1 << 30).to_bytes(4, "little")
    with pytest.raises(StreamError, match=r"offset \d+"):
        CheckpointGate().receive_data(bytes(bad))


def test_a_stream_starting_at_the_libxl_layer() -> None:
    spec = SynthSpec(pages=8, stream_type=StreamType.REMUS, checkpoints=1, top_layer=Layer.LIBXL)
    data = join(generate(spec))
    gate = CheckpointGate(Layer.LIBXL)
    events = gate.receive_data(data)
    assert [e.seq for e in events if isinstance(e, CheckpointComplete)] == [1, 2]
