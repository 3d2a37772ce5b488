"""Sans-I/O codecs for Xen's migration streams (xl savefile, libxl v2, libxc v2/v3)."""

from .decoder import Record, StreamDecoder, StreamEnd, StreamType
from .errors import Layer, RecordError, StreamError, StreamTruncated
from .reader import CheckpointReader, CheckpointReply, Phase

__all__ = [
    "CheckpointReader",
    "CheckpointReply",
    "Layer",
    "Phase",
    "Record",
    "RecordError",
    "StreamDecoder",
    "StreamEnd",
    "StreamError",
    "StreamTruncated",
    "StreamType",
]
