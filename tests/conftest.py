"""Shared test fixtures."""

from __future__ import annotations

import io
from collections.abc import Iterable

from orchestrator.streams.synth import Chunk


def join(chunks: Iterable[Chunk]) -> bytes:
    return b"".join(bytes(c) for c in chunks)


def stream_file(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)
