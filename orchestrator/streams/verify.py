"""Stream verifier: every rule of the libxc and libxl specs, through checkpoints.

Sans-I/O: feed it the decoder's events (``on_event``) and how the stream
ended (``on_end`` / ``on_truncated``); it raises :class:`StreamError` with
the byte offset at the first broken rule and otherwise builds a
:class:`Summary`. Unlike Xen's ``verify-stream-v2`` it follows checkpointed
(Remus/COLO) streams through the libxl layer with libxl's own reader phases.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from . import libxc, libxl
from .decoder import (
    DomainHeader,
    EndKind,
    Event,
    ImageHeader,
    LibxlHeader,
    Record,
    StreamDecoder,
    StreamEnd,
    XlHeader,
)
from .errors import Layer, StreamError, StreamTruncated
from .reader import Apply, CheckpointReader, CheckpointReady, Outcome, Phase

X = libxc.RecType
L = libxl.RecType


@dataclass
class Summary:
    layers: list[str] = field(default_factory=list)
    domain_name: str | None = None
    domain_type: str | None = None
    saved_on_xen: str | None = None
    libxc_version: int | None = None
    stream_type: str = "plain"
    records: Counter[str] = field(default_factory=Counter)  # "libxc PAGE_DATA (0x1)": n
    pfns: int = 0
    pages: int = 0
    page_bytes: int = 0
    checkpoints: int = 0
    bytes: int = 0
    end: str = ""
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["records"] = dict(sorted(self.records.items()))
        return d

    def render(self) -> str:
        lines = [
            f"layers:        {' > '.join(self.layers)}",
            f"domain:        {self.domain_name or '-'} ({self.domain_type or '?'}, "
            f"saved on Xen {self.saved_on_xen or '?'})",
            f"libxc stream:  version {self.libxc_version}",
            f"stream type:   {self.stream_type}",
            f"checkpoints:   {self.checkpoints}",
            f"pages:         {self.pages} with data, {self.pfns} pfns, "
            f"{self.page_bytes} bytes of page data",
            f"bytes:         {self.bytes}",
            f"ends at:       {self.end}",
            "records:",
        ]
        lines += [f"  {name:<40} {n}" for name, n in sorted(self.records.items())]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


class Verifier:
    def __init__(self, decoder: StreamDecoder) -> None:
        self.decoder = decoder
        self.summary = Summary()
        self.reader = CheckpointReader()
        self.dhdr: libxc.DomainHeader | None = None
        self.version = 3
        self.seen: set[int] = set()  # libxc record types so far
        self.colo = False
        self._counts: Counter[tuple[Layer, int]] = Counter()

    # -- events -----------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        if isinstance(event, Record):
            self._counts[(event.layer, event.rtype)] += 1
            if event.layer is Layer.LIBXC:
                self._libxc(event)
            else:
                self._libxl_in(event)
        elif isinstance(event, XlHeader):
            self.summary.layers.append("xl")
            self.summary.domain_name = _config_name(event.header.config)
        elif isinstance(event, LibxlHeader):
            self.summary.layers.append("libxl")
        elif isinstance(event, ImageHeader):
            self.summary.layers.append("libxc")
            self.version = self.summary.libxc_version = event.header.version
        elif isinstance(event, DomainHeader):
            self.dhdr = event.header
            self.summary.domain_type = libxc.DomainType(event.header.domain_type).name
            self.summary.saved_on_xen = (
                f"{event.header.xen_major}.{event.header.xen_minor}"
                if event.header.xen_major
                else "legacy-converted"
            )

    def on_end(self, end: StreamEnd) -> Summary:
        s = self.summary
        for (layer, rtype), n in self._counts.items():
            name = libxc.record_name(rtype) if layer is Layer.LIBXC else libxl.record_name(rtype)
            s.records[f"{layer.value} {name}"] = n
        s.bytes = end.offset
        if end.kind is EndKind.CHECKPOINT_BOUNDARY:
            s.end = (
                f"checkpoint boundary after checkpoint {s.checkpoints} "
                "(no END record, as Remus/COLO streams end)"
            )
        else:
            s.end = "END record"
        if self.decoder.checkpointed:
            s.stream_type = "colo" if self.colo else "remus"
        return s

    def on_truncated(self, exc: StreamTruncated) -> StreamError:
        """The error to report for a stream cut short, with what a receiver would do."""
        if not self.decoder.checkpointed:
            return exc
        if self.reader.phase is Phase.BUFFERING:
            outcome = self.reader.stream_broken("stream broken while buffering")
            n = outcome.seq
        else:
            n = self.summary.checkpoints
        what = (
            f"a receiver would fail over to checkpoint {n}"
            if n
            else "no complete checkpoint: nothing to fail over to"
        )
        return StreamError(exc.offset, exc.layer, exc.what, f"{exc.message}; {what}")

    # -- libxc ------------------------------------------------------------------

    def _libxc(self, rec: Record) -> None:
        body = rec.decode()
        rtype = rec.rtype
        dhdr = self.dhdr
        assert dhdr is not None  # the decoder emits the domain header first
        if body is None:
            self.summary.warnings.append(
                f"offset {rec.offset}: unknown optional record {rtype:#x} skipped"
            )
            return
        if self.version == 2 and rtype in libxc.V3_ONLY:
            raise rec.error("record is new in stream version 3; this is a version 2 stream")
        if rtype in libxc.PV_ONLY and dhdr.domain_type != libxc.DomainType.X86_PV:
            raise rec.error("PV-only record in an HVM stream")
        if rtype in libxc.HVM_ONLY and dhdr.domain_type != libxc.DomainType.X86_HVM:
            raise rec.error("HVM-only record in a PV stream")
        check = _LIBXC_ORDER.get(rtype)
        if check is not None:
            problem = check(self)
            if problem:
                raise rec.error(problem)
        if isinstance(body, libxc.PageData):
            self.summary.pfns += body.count
            self.summary.pages += body.pages
            self.summary.page_bytes += len(body.data)
        if rtype in (X.END, X.CHECKPOINT):
            self._consistent(rec)
        self.seen.add(rtype)
        if rtype == X.CHECKPOINT:
            if self.decoder.has_libxl:
                self.reader.start_checkpoint()
            else:
                self.summary.checkpoints += 1

    def _consistent(self, rec: Record) -> None:
        """The state a restore needs must be in the stream by the first END/CHECKPOINT."""
        assert self.dhdr is not None
        if self.dhdr.is_hvm:
            needed = [X.HVM_CONTEXT]
        else:
            needed = [X.X86_PV_INFO, X.X86_PV_P2M_FRAMES, X.SHARED_INFO, X.X86_PV_VCPU_BASIC]
        if self.version == 3:
            needed.append(X.STATIC_DATA_END)
        missing = [t.name for t in needed if t not in self.seen]
        if missing:
            raise rec.error(f"stream is not restorable here: no {', '.join(missing)} before it")

    # -- libxl ------------------------------------------------------------------

    def _libxl_in(self, rec: Record) -> None:
        event = self.reader.receive(rec, rec.rtype == L.CHECKPOINT_END)
        if isinstance(event, Apply):
            self._libxl_apply(event.record)
        elif isinstance(event, CheckpointReady):
            try:
                for queued in event.records:
                    self._libxl_apply(queued)
            except StreamError as exc:
                self.reader.apply_failed(str(exc))
                raise
            self.summary.checkpoints = self.reader.applied().seq
        elif isinstance(event, Outcome):
            raise rec.error(event.reason)

    def _libxl_apply(self, rec: Record) -> None:
        body = rec.decode()
        rtype = rec.rtype
        if rtype in (L.EMULATOR_XENSTORE_DATA, L.EMULATOR_CONTEXT):
            if self.dhdr is None:
                raise rec.error("emulator record before the libxc stream (domain type unknown)")
            if not self.dhdr.is_hvm:
                raise rec.error("emulator records are only for HVM domains")
        elif rtype == L.END and not self.decoder.libxc_started:
            raise rec.error("END before LIBXC_CONTEXT: the stream holds no domain")
        elif rtype == L.CHECKPOINT_STATE:
            assert isinstance(body, libxl.CheckpointStateRecord)
            if not self.decoder.libxc_started:
                raise rec.error("CHECKPOINT_STATE before LIBXC_CONTEXT")
            if body.state != libxl.CheckpointState.NEW:
                name = libxl.CheckpointState(body.state).name
                raise rec.error(f"{name} belongs on the back channel, not the forward stream")
            self.colo = True


def _order_rules() -> dict[int, Any]:
    def static_policy(v: Verifier) -> str | None:
        if X.STATIC_DATA_END in v.seen:
            return "policy record after STATIC_DATA_END"
        return None

    def static_end(v: Verifier) -> str | None:
        if X.STATIC_DATA_END in v.seen:
            return "second STATIC_DATA_END"
        if X.PAGE_DATA in v.seen or X.X86_PV_P2M_FRAMES in v.seen:
            return "STATIC_DATA_END after memory records"
        if v.dhdr is not None and not v.dhdr.is_hvm and X.X86_PV_INFO not in v.seen:
            return "STATIC_DATA_END before X86_PV_INFO"
        return None

    def pv_info(v: Verifier) -> str | None:
        if X.X86_PV_INFO in v.seen:
            return "second X86_PV_INFO"
        if v.seen - {X.X86_CPUID_POLICY, X.X86_MSR_POLICY}:
            return "X86_PV_INFO must precede the other records"
        return None

    def p2m(v: Verifier) -> str | None:
        if X.X86_PV_INFO not in v.seen:
            return "X86_PV_P2M_FRAMES before X86_PV_INFO"
        if v.version == 3 and X.STATIC_DATA_END not in v.seen:
            return "X86_PV_P2M_FRAMES before STATIC_DATA_END"
        return None

    def page_data(v: Verifier) -> str | None:
        if v.version == 3 and X.STATIC_DATA_END not in v.seen:
            return "PAGE_DATA before STATIC_DATA_END"
        if v.dhdr is not None and not v.dhdr.is_hvm and X.X86_PV_P2M_FRAMES not in v.seen:
            return "PV PAGE_DATA before X86_PV_P2M_FRAMES"
        return None

    def dirty_list(v: Verifier) -> str | None:
        return "CHECKPOINT_DIRTY_PFN_LIST belongs on the COLO back channel, not the stream"

    def verify(v: Verifier) -> str | None:
        if v.decoder.checkpointed:
            return "VERIFY in a checkpointed stream"
        return None

    return {
        X.X86_CPUID_POLICY: static_policy,
        X.X86_MSR_POLICY: static_policy,
        X.STATIC_DATA_END: static_end,
        X.X86_PV_INFO: pv_info,
        X.X86_PV_P2M_FRAMES: p2m,
        X.PAGE_DATA: page_data,
        X.CHECKPOINT_DIRTY_PFN_LIST: dirty_list,
        X.VERIFY: verify,
    }


_LIBXC_ORDER = _order_rules()


def _config_name(config: bytes) -> str | None:
    try:
        cfg = json.loads(config)
    except ValueError:
        return None
    if isinstance(cfg, dict):
        name = cfg.get("c_info", {}).get("name")
        return name if isinstance(name, str) else None
    return None
