"""remus-sim-save-helper: a libxl-save-helper for simulated domains.

Same argv, same message protocol, same exit statuses as Xen 4.17's
``libxl-save-helper``; instead of calling libxc on a real domain it saves
and restores the simulated domains of ``orchestrator.hypervisors.simdomain``
(the host directory comes from ``$REMUS_SIM_HOST``), writing and reading real
libxc v3 streams. Selected, as libxl selects any helper, with
``LIBXL_SAVE_HELPER``.

The save and restore loops follow libxc 4.17 (``xg_sr_save.c``,
``xg_sr_restore.c``; protocol notes 3.1, 3.2): callback order per stream
type, the cbflags asserts, the meaning of each reply, and the helper's own
behaviour (SIGTERM on save fails the stream and cleans up; stdin EOF while
waiting for a reply exits 254; start-up failure exits 255).
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from orchestrator.hypervisors.simdomain import (
    NoSuchDomain,
    RunState,
    ShutdownReason,
    SimDomain,
    default_host_dir,
    domain_path,
)
from orchestrator.savehelper.messages import (
    DEFAULT_TABLE,
    XTL_DEBUG,
    XTL_ERROR,
    XTL_INFO,
    HelperCodec,
    callbacks_in,
)
from orchestrator.streams import Layer, Record, StreamDecoder, StreamError, StreamType, libxc
from orchestrator.streams.decoder import DomainHeader, ImageHeader, StreamEnd
from orchestrator.streams.fileio import iter_events
from orchestrator.streams.framing import encode_record, encode_record_parts

XCFLAGS_LIVE = 1
XCFLAGS_DEBUG = 2
PLAIN, REMUS, COLO = 0, 1, 2
XGR_CHECKPOINT_ERROR, XGR_CHECKPOINT_SUCCESS, XGR_CHECKPOINT_FAILOVER = 0, 1, 2
# libxc's built-in precopy policy (the helper never supplies another one)
PRECOPY_MAX_ITERATIONS = 5
PRECOPY_DIRTY_THRESHOLD = 50
HVM_PARAM_STORE_PFN, HVM_PARAM_CONSOLE_PFN = 1, 17
PV_STORE_GFN, PV_CONSOLE_GFN = 0xFEFFC, 0xFEFFF
IOV_MAX = 1024


class Exit(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


class SaveFailed(Exception):
    def __init__(self, message: str, err: int = 0, rc: int = -1) -> None:
        super().__init__(message)
        self.err = err
        self.rc = rc


def libc_assert(expr: str, where: str, func: str) -> NoReturn:
    """What glibc's assert prints before abort(), as libxc's asserts do."""
    sys.stderr.write(f"libxl-save-helper: {where}: {func}: Assertion `{expr}' failed.\n")
    sys.stderr.flush()
    os.abort()


class Channel:
    """The helper's end of the message pipes: frames to fd 1, replies from fd 0."""

    def __init__(self) -> None:
        self.codec = HelperCodec(DEFAULT_TABLE)
        self.waiting = False
        self._plain: dict[str, bytes] = {}  # frames of argument-less callbacks, built once

    def send(self, name: str, *args: int | str) -> None:
        if args:
            frame = self.codec.message(name, *args)
        else:
            frame = self._plain.get(name) or self._plain.setdefault(name, self.codec.message(name))
        view = memoryview(frame)
        while view:
            n = os.write(1, view)
            view = view[n:]

    def call(self, name: str, *args: int | str) -> int:
        self.send(name, *args)
        self.waiting = True
        try:
            buf = b""
            while len(buf) < 4:
                try:
                    chunk = os.read(0, 4 - len(buf))
                except OSError:
                    chunk = b""
                if not chunk:
                    raise Exit(254)  # libxl_save_helper.c: read failure or EOF -> exit(-2)
                buf += chunk
        finally:
            self.waiting = False
        return HelperCodec.decode_reply(buf)

    def log(self, level: int, text: str, errnoval: int = -1, context: str = "xc") -> None:
        self.send("log", level, errnoval & 0xFFFFFFFF, context, text)

    def progress(self, doing: str, done: int = 0, total: int = 0) -> None:
        self.send("progress", "xc", doing, done, total)


def dirty_runs(dirty: bytes | memoryview) -> Iterator[tuple[int, int]]:
    """[start, end) runs of marked pages (a mark is the byte 1), found with memchr."""
    data = bytes(dirty)
    end = len(data)
    pos = data.find(1)
    while pos >= 0:
        stop = data.find(0, pos)
        if stop < 0:
            stop = end
        yield pos, stop
        pos = data.find(1, stop)


def runs_to_pfns(runs: list[tuple[int, int]]) -> list[int]:
    return [p for a, b in runs for p in range(a, b)]


class StreamOut:
    """Exact writes on io_fd (libxc's write_exact: EINTR is retried, anything else fails)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.bytes = 0

    def write(self, parts: list[bytes | bytearray | memoryview], what: str) -> None:
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        try:
            while views:
                n = os.writev(self.fd, views[:IOV_MAX])
                self.bytes += n
                while n and views:
                    if n >= len(views[0]):
                        n -= len(views[0])
                        views.pop(0)
                    else:
                        views[0] = views[0][n:]
                        n = 0
        except OSError as exc:
            raise SaveFailed(
                f"Failed to write {what} to stream ({exc.errno} = {os.strerror(exc.errno or 0)})",
                exc.errno or errno.EIO,
            ) from None


@dataclass
class Saver:
    chan: Channel
    dom: SimDomain
    out: StreamOut
    flags: int
    stream_type: int
    recv_fd: int
    hvm: bool
    checkpoint_no: int = 0
    staging: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        self.memview = memoryview(self.dom.memory)

    # -- memory -------------------------------------------------------------------

    def send_pages(self, runs: list[tuple[int, int]], staged: memoryview | None = None) -> int:
        """PAGE_DATA records for the pages in ``runs``, in batches of <= 1024 pfns.

        Page contents go from guest memory (or the staging copy taken while
        the domain was suspended) to the fd by writev, without a Python copy.
        """
        mem = self.memview if staged is None else staged
        sent = 0
        batch: list[tuple[int, int]] = []
        count = 0
        staged_off = 0

        def flush() -> None:
            nonlocal batch, count, staged_off
            if not count:
                return
            words = [p for a, b in batch for p in range(a, b)]
            parts: list[bytes | bytearray | memoryview] = [
                struct.pack("<II", count, 0),
                struct.pack(f"<{count}Q", *words),
            ]
            if staged is None:
                parts += [mem[a * libxc.PAGE_SIZE : b * libxc.PAGE_SIZE] for a, b in batch]
            else:
                size = count * libxc.PAGE_SIZE
                parts.append(mem[staged_off : staged_off + size])
                staged_off += size
            self.out.write(encode_record_parts(libxc.RecType.PAGE_DATA, parts), "page data")
            batch, count = [], 0

        for a, b in runs:
            while a < b:
                take = min(b - a, libxc.MAX_BATCH_SIZE - count)
                batch.append((a, a + take))
                count += take
                sent += take
                a += take
                if count == libxc.MAX_BATCH_SIZE:
                    flush()
        flush()
        if sent:
            self.chan.progress("Frames", sent, self.dom.pages)
        return sent

    def take_dirty(self, suspended: bool = False) -> list[tuple[int, int]]:
        """Marked pages, their marks cleared before anyone copies them.

        While the guest runs only the marks taken are cleared, run by run (a
        mark set meanwhile stays for the next pass); while it is suspended
        nothing can set one, so the whole map is cleared at once.
        """
        dirty = self.dom.dirty
        runs = list(dirty_runs(dirty[:]))
        if suspended:
            dirty[:] = bytes(len(dirty))
        else:
            for a, b in runs:
                dirty[a:b] = bytes(b - a)
        return runs

    def stage(self, runs: list[tuple[int, int]]) -> memoryview:
        """Copy pages out of a suspended guest, so sending can follow the resume.

        The staging buffer is kept between checkpoints: allocating and
        faulting in a fresh one costs more than the copy itself.
        """
        mem = self.memview
        total = sum(b - a for a, b in runs) * libxc.PAGE_SIZE
        if len(self.staging) < total:
            self.staging = bytearray(total)
        buf = memoryview(self.staging)
        off = 0
        for a, b in runs:
            size = (b - a) * libxc.PAGE_SIZE
            buf[off : off + size] = mem[a * libxc.PAGE_SIZE : b * libxc.PAGE_SIZE]
            off += size
        return buf[:total]

    # -- records ------------------------------------------------------------------

    def write(self, *records: bytes) -> None:
        self.out.write(list(records), "record")

    def static_records(self) -> None:
        dtype = libxc.DomainType.X86_HVM if self.hvm else libxc.DomainType.X86_PV
        self.write(libxc.encode_headers(libxc.DomainHeader(dtype, 4, 17)))
        if not self.hvm:
            self.write(libxc.encode(libxc.X86PvInfo(8, 4)))
        self.write(
            libxc.encode(libxc.X86CpuidPolicy(((0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69),))),
            libxc.encode(libxc.X86MsrPolicy(((0xCE, 0),))),
            libxc.encode(libxc.StaticDataEnd()),
        )
        if not self.hvm:
            pages = self.dom.pages
            frames = (pages + 511) // 512
            self.write(libxc.encode(libxc.X86PvP2mFrames(0, pages - 1, tuple(range(frames)))))

    def end_of_checkpoint(self, vcpu: bytes) -> None:
        n = self.checkpoint_no
        recs = [libxc.encode(libxc.X86TscInfo(0, 2_000_000, n * 1_000_000, n))]
        if self.hvm:
            recs += [
                libxc.encode(libxc.HvmContext(vcpu)),
                libxc.encode(
                    libxc.HvmParams(
                        (
                            (HVM_PARAM_STORE_PFN, PV_STORE_GFN),
                            (HVM_PARAM_CONSOLE_PFN, PV_CONSOLE_GFN),
                        )
                    )
                ),
            ]
        else:
            recs += [
                libxc.encode(libxc.SharedInfo(bytes(libxc.PAGE_SIZE))),
                libxc.encode(
                    libxc.X86PvVcpu(libxc.RecType.X86_PV_VCPU_BASIC, 0, pack_pv_vcpu(vcpu))
                ),
            ]
        self.write(*recs)

    # -- callbacks ----------------------------------------------------------------

    def suspend(self) -> None:
        if not self.chan.call("suspend"):
            raise SaveFailed("save callback suspend() failed")
        st = self.dom.read_state()
        if (st.state, st.reason) != (RunState.SHUTDOWN, ShutdownReason.SUSPEND):
            raise SaveFailed("Domain has not been suspended")
        self.chan.progress("Domain now suspended")

    def read_secondary_dirty(self) -> list[tuple[int, int]]:
        """COLO: the secondary's CHECKPOINT_DIRTY_PFN_LIST from the back channel."""
        decoder = StreamDecoder(Layer.LIBXC, records_only=True)
        with os.fdopen(os.dup(self.recv_fd), "rb", buffering=0) as f:
            for event in iter_events(f, decoder, reuse_buffer=False, read_ahead=False):
                if isinstance(event, StreamEnd):
                    break
                if isinstance(event, Record):
                    if event.rtype != libxc.RecType.CHECKPOINT_DIRTY_PFN_LIST:
                        raise SaveFailed(f"Expected CHECKPOINT_DIRTY_PFN_LIST, got {event.name}")
                    body = event.decode()
                    assert isinstance(body, libxc.CheckpointDirtyPfnList)
                    pfns = sorted({p for p in body.pfns if p < self.dom.pages})
                    return [(p, p + 1) for p in pfns]
        raise SaveFailed("Failed to read the secondary's dirty pfn list (back channel closed)")

    def run(self) -> int:
        live = bool(self.flags & XCFLAGS_LIVE)
        self.static_records()
        self.chan.progress("Start of stream")
        first = True
        while True:
            if first and live:
                self.dom.dirty[:] = bytes(self.dom.pages)  # enable log-dirty: a clean map
                self.send_pages([(0, self.dom.pages)])
                for _ in range(1, PRECOPY_MAX_ITERATIONS):
                    runs = list(dirty_runs(self.dom.dirty[:]))
                    if sum(b - a for a, b in runs) < PRECOPY_DIRTY_THRESHOLD:
                        break
                    self.send_pages(self.take_dirty())
                self.suspend()
                staged_runs = self.take_dirty(suspended=True)
            elif first:
                self.suspend()
                self.dom.dirty[:] = bytes(self.dom.pages)
                staged_runs = [(0, self.dom.pages)]
            else:
                self.suspend()
                staged_runs = self.take_dirty(suspended=True)
                if self.stream_type == COLO:
                    staged_runs = merge_runs(staged_runs + self.read_secondary_dirty())
            vcpu = self.dom.read_vcpu() or bytes(64)
            if self.stream_type == REMUS:
                # Unlike libxc 4.17, which writes the checkpoint while the guest stays
                # suspended, copy the dirty pages aside and let the guest resume first:
                # its pause is the copy, not the network. The stream and the callback
                # order are the same; only the writes move after postcopy.
                staged = self.stage(staged_runs)
                r = self.chan.call("postcopy")
                if r <= 0:
                    raise SaveFailed("Save failed", 0, r)
                self.send_pages(staged_runs, staged)
            else:
                self.send_pages(staged_runs)
            self.end_of_checkpoint(vcpu)
            self.checkpoint_no += 1
            if self.stream_type == PLAIN:
                self.write(libxc.encode(libxc.End()))
                self.chan.progress("End of stream")
                return 0
            self.write(encode_record(libxc.RecType.CHECKPOINT))
            if self.stream_type == REMUS:
                r = self.chan.call("checkpoint")
                if r <= 0:
                    raise SaveFailed("Save failed", 0, r)
            else:
                if self.chan.call("checkpoint") == 0:
                    raise SaveFailed("Save failed", 0, -1)
                r = self.chan.call("postcopy")
                if r <= 0:
                    raise SaveFailed("Save failed", 0, r)
                r = self.chan.call("wait_checkpoint")
                if r <= 0:
                    raise SaveFailed("Save failed", 0, r)
            first = False


def pack_pv_vcpu(blob: bytes) -> bytes:
    """A simulated vCPU blob inside a real-sized 64-bit vcpu_guest_context_t."""
    room = libxc.PV_VCPU_CONTEXT_SIZE_64 - 4
    if len(blob) > room:
        raise SaveFailed(f"vCPU context of {len(blob)} bytes exceeds {room}")
    return struct.pack("<I", len(blob)) + blob + bytes(room - len(blob))


def unpack_pv_vcpu(ctx: bytes) -> bytes:
    (n,) = struct.unpack_from("<I", ctx)
    return ctx[4 : 4 + min(n, len(ctx) - 4)]


def merge_runs(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(runs):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def do_save(chan: Channel, host: Path, argv: list[str]) -> tuple[int, int]:
    io_fd, recv_fd = int(argv[0]), int(argv[1])
    domid, flags, cbflags, stream_type = (int(x) for x in argv[2:6])
    cbs = callbacks_in(DEFAULT_TABLE, cbflags)
    if stream_type == REMUS and not {"checkpoint", "postcopy"} <= cbs:
        libc_assert(
            "callbacks->checkpoint && callbacks->postcopy", "xg_sr_save.c:1018", "xc_domain_save"
        )
    if stream_type == COLO and not {"checkpoint", "postcopy", "wait_checkpoint"} <= cbs:
        libc_assert("callbacks->wait_checkpoint", "xg_sr_save.c:1021", "xc_domain_save")
    try:
        dom = SimDomain(domain_path(host, domid))
    except NoSuchDomain:
        chan.log(
            XTL_ERROR, f"Unable to get domain info for dom{domid}: No such process", errno.ESRCH
        )
        return -1, errno.ESRCH
    hvm = dom.config.domain_type == "hvm"
    if hvm and "switch_qemu_logdirty" not in cbs:
        libc_assert("callbacks->switch_qemu_logdirty", "xg_sr_save.c:1026", "xc_domain_save")
    saver = Saver(chan, dom, StreamOut(io_fd), flags, stream_type, recv_fd, hvm)
    logdirty = False
    rc, err = 0, 0
    try:
        if hvm:
            if chan.call("switch_qemu_logdirty", domid, 1) != 0:
                chan.log(XTL_ERROR, "Couldn't enable qemu log-dirty mode")
                return -1, errno.EIO
            logdirty = True
        rc = saver.run()
    except SaveFailed as exc:
        if str(exc) != "Save failed":
            chan.log(XTL_ERROR, str(exc), exc.err or -1)
        chan.log(XTL_ERROR, "Save failed", exc.err or -1)
        rc, err = exc.rc, (exc.err if exc.rc else 0)
    finally:
        if logdirty:
            chan.call("switch_qemu_logdirty", domid, 0)
        saver.memview.release()
        dom.close()
    chan.progress("Complete")
    return rc, err


@dataclass
class Restorer:
    chan: Channel
    dom: SimDomain
    stream_type: int
    send_back_fd: int
    cbs: frozenset[str]
    hvm: bool = False
    version: int = 3
    static_done: bool = False
    seen_cpuid: bool = False
    seen_msr: bool = False
    consistent: bool = False  # a CHECKPOINT has been passed: buffer from now on
    buffered: list[Record] = field(default_factory=list)
    vcpu: bytes = b""
    store_gfn: int = PV_STORE_GFN
    console_gfn: int = PV_CONSOLE_GFN
    checkpoints: int = 0

    def static_data_done(self, missing: int) -> None:
        self.static_done = True
        if self.chan.call("static_data_done", missing) != 0:
            raise SaveFailed("Mandatory record 0x10 (Static data end) not handled")

    def apply(self, rec: Record) -> None:
        body = rec.decode()
        t = rec.rtype
        if isinstance(body, libxc.PageData):
            mem = self.dom.memory
            off = 0
            for word in body.words:
                pfn = word & libxc.PFN_MASK
                if not libxc.page_has_data(word >> libxc.TYPE_SHIFT):
                    continue
                if pfn >= self.dom.pages:
                    raise SaveFailed(f"pfn {pfn:#x} beyond the domain's {self.dom.pages} pages")
                mem[pfn * libxc.PAGE_SIZE : (pfn + 1) * libxc.PAGE_SIZE] = body.data[
                    off : off + libxc.PAGE_SIZE
                ]
                off += libxc.PAGE_SIZE
        elif isinstance(body, libxc.X86PvVcpu) and t == libxc.RecType.X86_PV_VCPU_BASIC:
            if len(body.context) != libxc.PV_VCPU_CONTEXT_SIZE_64:
                raise SaveFailed(
                    f"x86 PV vcpu basic record wrong size: expected "
                    f"{libxc.PV_VCPU_CONTEXT_SIZE_64 + 8}, got {len(body.context) + 8}"
                )
            self.vcpu = unpack_pv_vcpu(body.context)
        elif isinstance(body, libxc.HvmContext):
            self.vcpu = body.blob
        elif isinstance(body, libxc.HvmParams):
            params = dict(body.params)
            self.store_gfn = params.get(HVM_PARAM_STORE_PFN, self.store_gfn)
            self.console_gfn = params.get(HVM_PARAM_CONSOLE_PFN, self.console_gfn)

    def record(self, rec: Record) -> None:
        t = rec.rtype
        if t == libxc.RecType.X86_CPUID_POLICY:
            self.seen_cpuid = True
        elif t == libxc.RecType.X86_MSR_POLICY:
            self.seen_msr = True
        elif t == libxc.RecType.STATIC_DATA_END:
            missing = (0 if self.seen_cpuid else 1) | (0 if self.seen_msr else 2)
            self.static_data_done(missing)
            return
        elif (
            t in (libxc.RecType.PAGE_DATA, libxc.RecType.X86_PV_P2M_FRAMES)
            and not self.static_done
            and self.version == 2
        ):
            self.static_data_done(3)
        if self.consistent:
            self.buffered.append(rec)
        else:
            self.apply(rec)

    def checkpoint(self) -> bool:
        """True to go on reading; False to finish from the last consistent state."""
        if self.stream_type == PLAIN:
            raise SaveFailed("Found checkpoint in non-checkpointed stream")
        r = self.chan.call("checkpoint")
        if r == XGR_CHECKPOINT_FAILOVER:
            if not self.consistent:
                raise SaveFailed("Unexpected failover before the first consistent checkpoint")
            self.buffered.clear()
            return False
        if r != XGR_CHECKPOINT_SUCCESS:
            raise SaveFailed(f"Checkpoint callback failed ({r})")
        for rec in self.buffered:
            self.apply(rec)
        self.buffered.clear()
        self.consistent = True
        self.checkpoints += 1
        if self.stream_type == COLO:
            return self.colo_after_checkpoint()
        return True

    def colo_after_checkpoint(self) -> bool:
        self.dom.write_vcpu(self.vcpu)
        self.chan.send("restore_results", self.store_gfn, self.console_gfn)
        for name in ("postcopy", "wait_checkpoint", "suspend"):
            r = self.chan.call(name)
            if r == 2:
                return False  # broken channel: failover
            if r != 1:
                raise SaveFailed(f"{name} callback failed ({r})")
        runs = list(dirty_runs(self.dom.dirty[:]))
        for a, b in runs:
            self.dom.dirty[a:b] = bytes(b - a)
        pfns = runs_to_pfns(runs)
        rec = libxc.encode(libxc.CheckpointDirtyPfnList(tuple(pfns)))
        try:
            StreamOut(self.send_back_fd).write([rec], "dirty pfn list")
        except SaveFailed as exc:
            raise SaveFailed(f"Failed to send dirty pfn list: {exc}", exc.err) from None
        return True

    def finish(self) -> None:
        self.dom.write_vcpu(self.vcpu)


def do_restore(chan: Channel, host: Path, argv: list[str]) -> tuple[int, int, int, int]:
    io_fd, send_back_fd = int(argv[0]), int(argv[1])
    domid = int(argv[2])
    cbflags, stream_type = int(argv[7]), int(argv[8])
    cbs = callbacks_in(DEFAULT_TABLE, cbflags)
    if stream_type in (REMUS, COLO) and "checkpoint" not in cbs:
        libc_assert("callbacks->checkpoint", "xg_sr_restore.c:888", "xc_domain_restore")
    if (
        stream_type == COLO
        and not {"suspend", "postcopy", "wait_checkpoint", "restore_results"} <= cbs
    ):
        libc_assert(
            "callbacks->suspend && callbacks->postcopy && callbacks->wait_checkpoint && "
            "callbacks->restore_results",
            "xg_sr_restore.c:895",
            "xc_domain_restore",
        )
    try:
        dom = SimDomain(domain_path(host, domid))
    except NoSuchDomain:
        chan.log(
            XTL_ERROR, f"Unable to get domain info for dom{domid}: No such process", errno.ESRCH
        )
        return -1, errno.ESRCH, 0, 0
    res = Restorer(chan, dom, stream_type, send_back_fd, cbs)
    want = {PLAIN: StreamType.PLAIN, REMUS: StreamType.REMUS, COLO: StreamType.COLO}.get(
        stream_type, StreamType.AUTO
    )
    try:  # name file offsets in errors, as `remusctl stream verify` would
        base = os.lseek(io_fd, 0, os.SEEK_CUR)
    except OSError:
        base = 0  # a socket or pipe
    decoder = StreamDecoder(Layer.LIBXC, want, offset=base)
    try:
        with os.fdopen(os.dup(io_fd), "rb", buffering=0) as f:
            ended = False
            try:
                for event in iter_events(f, decoder, reuse_buffer=False, read_ahead=False):
                    if isinstance(event, ImageHeader):
                        res.version = event.header.version
                    elif isinstance(event, DomainHeader):
                        res.hvm = event.header.is_hvm
                        if res.hvm != (dom.config.domain_type == "hvm"):
                            raise SaveFailed("Domain type of the stream does not match the domain")
                    elif isinstance(event, Record):
                        if event.rtype == libxc.RecType.END:
                            for rec in res.buffered:
                                res.apply(rec)
                            res.buffered.clear()
                            ended = True
                            break
                        if event.rtype == libxc.RecType.CHECKPOINT:
                            if not res.checkpoint():
                                ended = True
                                break
                            continue
                        res.record(event)
                    elif isinstance(event, StreamEnd):
                        break
            except (StreamError, OSError) as exc:
                if not res.consistent or stream_type == PLAIN:
                    raise SaveFailed(f"Failed to read stream: {exc}") from None
                chan.log(XTL_ERROR, f"Failed to read Record Header ({exc})")
            if not ended and not res.consistent:
                raise SaveFailed("Stream ended before an END record or a consistent checkpoint")
        if stream_type == COLO and res.consistent:
            chan.log(XTL_INFO, "COLO Failover")
        else:
            chan.log(XTL_INFO, "Restore successful")
        res.finish()
        return 0, 0, res.store_gfn, res.console_gfn
    except SaveFailed as exc:
        chan.log(XTL_ERROR, str(exc), exc.err or -1)
        chan.log(XTL_ERROR, "Restore failed")
        return -1, exc.err or errno.EIO, 0, 0
    finally:
        dom.close()


def pingpong(chan: Channel, n: int) -> tuple[int, int]:
    """Benchmark mode: n checkpoint callbacks back to back, nothing else."""
    for _ in range(n):
        chan.call("checkpoint")
    return 0, 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    chan = Channel()
    if not args:
        libc_assert("mode", "libxl_save_helper.c:245", "main")
    mode, rest = args[0], args[1:]
    if mode == "--save-domain":
        if len(rest) != 6:
            libc_assert("!*++argv", "libxl_save_helper.c:262", "main")
        chan.log(XTL_DEBUG, "starting save", 0, "libxl-save-helper")
    elif mode == "--restore-domain":
        if len(rest) != 9:
            libc_assert("!*++argv", "libxl_save_helper.c:290", "main")
        chan.log(XTL_DEBUG, "starting restore", 0, "libxl-save-helper")
    else:
        libc_assert('!"unexpected mode argument"', "libxl_save_helper.c:296", "main")
    try:
        host = default_host_dir()
        if not (host / "domains").is_dir():
            chan.log(
                XTL_ERROR,
                f"simulated hypervisor not found: no {host}/domains (set REMUS_SIM_HOST)",
                errno.ENOENT,
                "xencall",
            )
            chan.log(XTL_ERROR, "xc_interface_open failed", 0, "libxl-save-helper")
            return 255
        if mode == "--save-domain":
            io_fd = int(rest[0])

            def on_term(signum: int, frame: object) -> None:
                # libxl_save_helper.c: make libxc's next write fail so it cleans up;
                # a read of a reply interrupted by the signal ends the helper (254)
                if chan.waiting:
                    raise Exit(254)
                null = os.open("/dev/null", os.O_RDONLY)
                os.dup2(null, io_fd)
                os.close(null)

            signal.signal(signal.SIGTERM, on_term)
            bench = os.environ.get("REMUS_SIM_HELPER_PINGPONG")
            rc, err = pingpong(chan, int(bench)) if bench else do_save(chan, host, rest)
            chan.log(XTL_DEBUG, f"complete r={rc}", 0, "libxl-save-helper")
            chan.call("complete", rc, err)
        else:
            rc, err, store, console = do_restore(chan, host, rest)
            chan.send("restore_results", store, console)
            chan.log(XTL_DEBUG, f"complete r={rc}", 0, "libxl-save-helper")
            chan.call("complete", rc, err)
    except Exit as exc:
        return exc.status
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
