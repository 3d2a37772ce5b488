"""The simulated guest: one process per running domain, serving a key-value store
that lives entirely in the domain's memory (``guestkv``).

Protocol (TCP, one request per line): ``PUT key value`` -> ``OK`` once the
write is in the disk journal (when the domain has a disk) and in guest
memory, both marked dirty; ``GET key`` -> ``VALUE value`` or ``NOTFOUND``;
``STATS`` -> ``KEYS n GENERATION g``; ``JGET key`` -> the newest value of
``key`` in the disk journal; ``JSTATS`` -> ``JOURNAL SEQ s RECORDS n MEMORY m
CONSISTENT yes|no`` (the journal's newest record against the sequence number
memory remembers writing: they differ when disk and memory come from
different instants).

Suspend is cooperative, as for a PV guest: the toolstack writes ``S`` to the
domain's event-channel socket; the guest finishes the request in hand (its
safe point: requests are applied whole within one event-loop step), stops
touching memory, records shutdown(suspend) as the hypercall would, and
answers ``s``. ``R`` resumes the same guest (suspend cancelled) -> ``r``.
A restored domain starts a fresh process of this program, which attaches to
the restored memory and carries on from the state it finds.

    python -m orchestrator.hypervisors.simguest DOMAIN_DIR [--listen HOST:PORT] [--dirty-rate N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from .guestjournal import BLOCK, Journal
from .guestkv import BadItem, GuestKV, StoreFull
from .simdomain import DomainState, RunState, ShutdownReason, SimDomain

EVTCHN = "evtchn.sock"


class Guest:
    def __init__(self, dom: SimDomain, dirty_rate: int) -> None:
        self.dom = dom
        self.kv = GuestKV(memoryview(dom.memory), memoryview(dom.dirty))
        self.running = asyncio.Event()
        self.running.set()
        self.dirty_rate = dirty_rate
        self.journal: Journal | None = None
        path = dom.disk_path
        if path is not None and dom.disk_blocks:
            self._disk_fd = os.open(path, os.O_RDWR)
            self._disk_dirty = dom.disk_dirty()
            self.journal = Journal(dom.disk_blocks, self._disk_write, self._disk_read)

    def _disk_write(self, offset: int, data: bytes) -> None:
        # the block backend's view: the write reaches the image, then the block is marked
        os.pwrite(self._disk_fd, data, offset)
        first, last = offset // BLOCK, (offset + len(data) - 1) // BLOCK
        self._disk_dirty[first : last + 1] = b"\x01" * (last - first + 1)

    def _disk_read(self, offset: int, length: int) -> bytes:
        return os.pread(self._disk_fd, length, offset)

    async def serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while line := await reader.readline():
                await self.running.wait()  # a suspended guest runs no code
                writer.write(self.handle(line.rstrip(b"\r\n")))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def handle(self, line: bytes) -> bytes:
        verb, _, rest = line.partition(b" ")
        try:
            if verb == b"PUT":
                key, _, value = rest.partition(b" ")
                if self.journal is None:
                    self.kv.put(key, value)
                    return b"OK\n"
                seq = self.kv.journal_seq + 1
                self.journal.append(seq, key, value)  # write-ahead: disk, then memory
                self.kv.put(key, value, journal_seq=seq)
                return b"OK\n"
            if verb == b"GET":
                found = self.kv.get(rest)
                return b"NOTFOUND\n" if found is None else b"VALUE " + found + b"\n"
            if verb in (b"JGET", b"JSTATS"):
                if self.journal is None:
                    return b"ERROR no disk\n"
                newest, count, latest = self.journal.scan()
                if verb == b"JGET":
                    item = latest.get(rest)
                    return b"NOTFOUND\n" if item is None else b"VALUE " + item[1] + b"\n"
                ok = "yes" if newest == self.kv.journal_seq else "no"
                return (
                    f"JOURNAL SEQ {newest} RECORDS {count} MEMORY {self.kv.journal_seq} "
                    f"CONSISTENT {ok}\n".encode()
                )
            if verb == b"STATS":
                return f"KEYS {self.kv.keys} GENERATION {self.kv.generation}\n".encode()
        except (BadItem, StoreFull) as exc:
            return f"ERROR {exc}\n".encode()
        return b"ERROR unknown request\n"

    async def evtchn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The suspend event channel: the toolstack's requests, one byte each."""
        try:
            while req := await reader.read(1):
                if req == b"S":
                    self.running.clear()
                    self.dom.write_state(DomainState(RunState.SHUTDOWN, ShutdownReason.SUSPEND))
                    writer.write(b"s")
                elif req == b"R":
                    self.kv.reload()  # memory may have been replaced while suspended (COLO)
                    self.dom.write_state(DomainState(RunState.RUNNING))
                    self.running.set()
                    writer.write(b"r")
                else:
                    writer.write(b"?")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def dirtier(self) -> None:
        """Dirty ``dirty_rate`` scratch pages per second, in 10 ms slices."""
        per_tick = self.dirty_rate / 100
        owed = 0.0
        while True:
            await asyncio.sleep(0.01)
            await self.running.wait()
            owed += per_tick
            n = int(owed)
            owed -= n
            self.kv.dirty_scratch(n)


async def run(domdir: Path, listen: str, dirty_rate: int) -> None:
    dom = SimDomain(domdir)
    guest = Guest(dom, dirty_rate)
    host, _, port = listen.rpartition(":")
    server = await asyncio.start_server(guest.serve_client, host or "0.0.0.0", int(port))
    # bound by a relative name: a unix socket path is limited to 107 bytes, and host
    # directories (a test's tmp_path, say) can be longer than that
    os.chdir(domdir)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(EVTCHN)
    evt = await asyncio.start_unix_server(guest.evtchn, EVTCHN)
    bound = server.sockets[0].getsockname()
    (domdir / "address").write_text(f"{bound[0]}:{bound[1]}\n")
    dom.write_state(DomainState(RunState.RUNNING))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    tasks = [asyncio.create_task(guest.dirtier())] if dirty_rate else []
    async with server, evt:
        await stop.wait()
    for t in tasks:
        t.cancel()
    dom.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="simguest", description=__doc__)
    ap.add_argument("domain_dir", type=Path)
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--dirty-rate", type=int, default=0, help="scratch pages dirtied per second")
    args = ap.parse_args(argv)
    asyncio.run(run(args.domain_dir, args.listen, args.dirty_rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
