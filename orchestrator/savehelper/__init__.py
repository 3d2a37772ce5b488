"""The libxl/libxc save-helper boundary: spawning, message codec, mediated session."""

from .messages import ParentCodec, ProtocolError
from .session import (
    Callbacks,
    Failure,
    HelperFailed,
    HelperResult,
    HelperSession,
    Progress,
    SessionBounds,
)
from .spawn import HelperNotFound, Mode, RestoreArgs, SaveArgs, StreamType, find_helper

__all__ = [
    "Callbacks",
    "Failure",
    "HelperFailed",
    "HelperNotFound",
    "HelperResult",
    "HelperSession",
    "Mode",
    "ParentCodec",
    "Progress",
    "ProtocolError",
    "RestoreArgs",
    "SaveArgs",
    "SessionBounds",
    "StreamType",
    "find_helper",
]
