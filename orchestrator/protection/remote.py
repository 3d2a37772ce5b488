"""The receiver a primary starts on its peer: ``remusctl receive --stdio`` and its options.

``protect -s CMD`` runs it through ``sh -c "CMD HOST <this>"`` and ``protect
--ssh`` as the SSH session's command: one command line for both, so what
works by hand with ``ssh HOST remusctl receive --stdio`` works for either.
``remusctl`` is found on the peer's ``PATH``, as for any command run over
ssh.
"""

from __future__ import annotations

import shlex
from dataclasses import fields
from typing import Final

from .spec import FIELDS, ProtectionSpec

# What a receiver decides for itself; the rest of a protection's settings come in
# the primary's HELLO. The witness too: a receiver takes over only under the lease
# the primary protects with; -F for `--witness none` (a receiver that takes over on
# heartbeats alone).
RECEIVER_FIELDS: Final = (
    "heartbeat_timeout_ms",
    "ack_timeout_ms",
    "witness",
    "lease_ttl_ms",
    "unsafe",
    # the link's mode is each side's own decision: a receiver refuses what it was not told
    "insecure_link",
)

RECEIVE: Final = ("remusctl", "receive", "--stdio")


def receive_args(spec: ProtectionSpec, *, e: bool = False) -> list[str]:
    """The receiver's argv for ``spec``: each receiver setting that is not the
    default, by its own option (the receiver must know it too); ``e``: xl's -e."""
    defaults = {f.name: f.default for f in fields(ProtectionSpec)}
    argv = [*RECEIVE, *(["-e"] if e else [])]
    for f in FIELDS:
        if f.name not in RECEIVER_FIELDS or not f.flags:
            continue
        value = getattr(spec, f.name)
        if value == defaults[f.name]:
            continue
        argv += [f.flags[0]] if f.kind is bool else [f.flags[0], str(value)]
    return argv


def receive_command(spec: ProtectionSpec, *, e: bool = False) -> str:
    """:func:`receive_args` as one shell command line (what ssh hands the peer's shell)."""
    return shlex.join(receive_args(spec, e=e))
