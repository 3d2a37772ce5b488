"""One line per header and record, for `remusctl stream dump`."""

from __future__ import annotations

from collections.abc import Iterator

from . import libxc, libxl
from .decoder import (
    DomainHeader,
    ImageHeader,
    LibxlHeader,
    Record,
    StreamDecoder,
    StreamEnd,
    XlHeader,
)
from .fileio import Readable, iter_events


def _fields(body: object) -> str:
    if isinstance(body, libxc.PageData):
        words = body.words
        first, last = words[0] & libxc.PFN_MASK, words[-1] & libxc.PFN_MASK
        return f"count={body.count} pages={body.pages} pfns={first:#x}..{last:#x}"
    if isinstance(body, libxc.X86PvInfo):
        return f"guest_width={body.guest_width} pt_levels={body.pt_levels}"
    if isinstance(body, libxc.X86PvP2mFrames):
        return f"start={body.start_pfn:#x} end={body.end_pfn:#x} frames={len(body.p2m_pfns)}"
    if isinstance(body, libxc.X86PvVcpu):
        return f"vcpu={body.vcpu_id} context={len(body.context)}"
    if isinstance(body, libxc.X86TscInfo):
        return f"mode={body.mode} khz={body.khz} nsec={body.nsec} incarnation={body.incarnation}"
    if isinstance(body, libxc.HvmParams):
        return " ".join(f"{i}={v:#x}" for i, v in body.params)
    if isinstance(body, libxc.CheckpointDirtyPfnList):
        return f"pfns={len(body.pfns)}"
    if isinstance(body, libxc.X86CpuidPolicy | libxc.X86MsrPolicy):
        return f"entries={len(body.entries)}"
    if isinstance(body, libxl.EmulatorXenstoreData):
        return f"emulator={body.emulator_id} keys={len(body.pairs)}"
    if isinstance(body, libxl.EmulatorContext):
        return f"emulator={body.emulator_id} blob={len(body.blob)}"
    if isinstance(body, libxl.CheckpointStateRecord):
        return f"state={libxl.CheckpointState(body.state).name}"
    return ""


def dump_lines(f: Readable, decoder: StreamDecoder | None = None) -> Iterator[str]:
    """Lines of ``offset layer type length fields``; StreamError ends the walk."""
    decoder = decoder or StreamDecoder()
    for event in iter_events(f, decoder):
        if isinstance(event, Record):
            body = event.decode()
            head = f"{event.offset:>12} {event.layer.value:<6} {event.name:<32}"
            yield f"{head} {len(event.body):>9} {_fields(body)}".rstrip()
        elif isinstance(event, XlHeader):
            xh = event.header
            yield (
                f"{event.offset:>12} xl     savefile header flags={xh.mandatory_flags:#x}"
                f" config={len(xh.config)} bytes"
            )
        elif isinstance(event, LibxlHeader):
            yield f"{event.offset:>12} libxl  header version=2 options={event.header.options:#x}"
        elif isinstance(event, ImageHeader):
            yield f"{event.offset:>12} libxc  image header version={event.header.version}"
        elif isinstance(event, DomainHeader):
            h = event.header
            yield (
                f"{event.offset:>12} libxc  domain header type="
                f"{libxc.DomainType(h.domain_type).name} xen={h.xen_major}.{h.xen_minor}"
            )
        elif isinstance(event, StreamEnd):
            yield f"{event.offset:>12} end    ({event.kind.value})"
