"""Mutated and truncated streams: only the defined stream errors, never a hang
or another exception."""

from __future__ import annotations

import io
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.streams import Layer, StreamDecoder, StreamError, StreamType
from orchestrator.streams.dump import dump_lines
from orchestrator.streams.fileio import verify_file
from orchestrator.streams.synth import SynthSpec, generate
from tests.conftest import join

SEEDS = [
    join(generate(SynthSpec(pages=6, stream_type=t, checkpoints=2, dirty_pages=2, top_layer=la)))
    for t in (StreamType.PLAIN, StreamType.REMUS, StreamType.COLO)
    for la in (Layer.XL, Layer.LIBXC)
]


def run(data: bytes) -> None:
    try:
        verify_file(io.BytesIO(data), StreamDecoder())
    except StreamError as exc:
        assert str(exc).startswith("offset ")
    try:
        for _ in dump_lines(io.BytesIO(data)):
            pass
    except StreamError:
        pass


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.sampled_from(range(len(SEEDS))),
    st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(0, 2**31),
)
def test_mutations(seed: int, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(SEEDS[seed])
    for pos, val in flips:
        data[pos % len(data)] = val
    run(bytes(data))
    run(bytes(data[: cut % (len(data) + 1)]))


def test_every_truncation_point_of_a_small_stream() -> None:
    data = join(
        generate(
            SynthSpec(
                pages=1,
                stream_type=StreamType.COLO,
                checkpoints=1,
                dirty_pages=1,
                top_layer=Layer.XL,
            )
        )
    )
    for cut in range(len(data)):
        run(data[:cut])


def test_random_garbage_after_valid_prefixes() -> None:
    rng = random.Random(1)
    for data in SEEDS:
        for _ in range(50):
            cut = rng.randrange(len(data))
            run(data[:cut] + rng.randbytes(rng.randrange(1, 64)))
