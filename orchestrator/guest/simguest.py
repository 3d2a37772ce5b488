"""The simulated guest: one process per running domain, serving a key-value store
that lives entirely in the domain's memory (``guest.kv``).

Protocol (TCP, one request per line): ``PUT key value`` -> ``OK`` once the
write is in the disk journal (when the domain has a disk) and in guest
memory, both marked dirty (``OK <token>`` now and then with
``remus_sim.nondeterministic=N`` on the command line: see ``Guest._ok``);
``GET key`` -> ``VALUE value`` or ``NOTFOUND``;
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

    python -m orchestrator.guest.simguest DOMAIN_DIR [--listen HOST:PORT] [--dirty-rate N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import signal
import sys
from pathlib import Path
from typing import Final

from .journal import Journal
from .kv import BadItem, GuestKV, StoreFull
from .machine import BLOCK_SIZE, EVTCHN, DomainState, Machine, RunState, ShutdownReason

HISTORY: Final = 1 << 20  # input kept below the consumed position, for replay


class HistoryLost(Exception):
    """A checkpoint moved a connection back further than its kept input."""


class Connection:
    """One client connection's byte positions, as a guest kernel would keep them.

    Consumed and produced bytes are recorded in guest memory (``GuestKV``'s
    connection table), so that a checkpoint carries them, as it carries a real
    guest's TCP state. The process keeps what a kernel keeps outside that: the
    input received (``HISTORY`` bytes of it below the consumed position).
    After a COLO checkpoint replaced the memory, the secondary's copy carries
    on from the primary's positions: it replays input it had already
    consumed, or skips input the primary had consumed and it had not yet.
    What it had already sent stays sent (this kernel does not rewind with the
    memory), so its next output byte, the primary's byte ``produced``, leaves
    at its own next sequence number: COLO's rewriter shifts the offsets
    (``colo_compare.Rewriter.realign``). A primary, whose memory is its own,
    never replays or skips.
    """

    def __init__(
        self, kv: GuestKV, writer: asyncio.StreamWriter, client_port: int, port: int
    ) -> None:
        self.kv, self.writer = kv, writer
        self.key = (client_port, port)
        self.slot = kv.conn_open(client_port, port)
        self.buf = bytearray()
        self.base = 0  # stream offset of buf[0]
        self._local = (0, 0)  # positions when the table is full
        self._pending = 0  # length of the request next_request returned

    def positions(self) -> tuple[int, int]:
        return self.kv.conn_positions(self.slot) if self.slot is not None else self._local

    def _advance(self, consumed: int, produced: int) -> None:
        if self.slot is not None:
            self.kv.conn_advance(self.slot, consumed, produced)
        else:
            self._local = (consumed, produced)

    def received(self, data: bytes) -> None:
        self.buf += data

    def next_request(self) -> bytes | None:
        consumed, _ = self.positions()
        start = consumed - self.base
        if start < 0:
            raise HistoryLost(f"connection {self.key}: input from {consumed} is gone")
        if start > HISTORY:  # keep HISTORY bytes of consumed input, no more
            cut = min(start - HISTORY, len(self.buf))
            del self.buf[:cut]
            self.base += cut
            start -= cut
        nl = self.buf.find(b"\n", start)
        if nl < 0:  # no whole request (or, after a skip, the input is still to come)
            return None
        line = bytes(self.buf[start:nl]).rstrip(b"\r")
        self._pending = nl + 1 - start
        return line

    def reply(self, data: bytes) -> None:
        consumed, produced = self.positions()
        self._advance(consumed + self._pending, produced + len(data))
        self.writer.write(data)

    def realign(self) -> None:
        slot = self.kv.conn_find(*self.key)
        # absent from the checkpoint's table: the primary had not taken the
        # connection yet, so it had consumed and produced nothing of it
        self.slot = slot if slot is not None else self.kv.conn_open(*self.key)

    def close(self) -> None:
        if self.slot is not None and self.kv.conn_find(*self.key) == self.slot:
            self.kv.conn_close(self.slot)


class Guest:
    def __init__(self, dom: Machine, dirty_rate: int, nondeterministic: int = 0) -> None:
        self.dom = dom
        self.kv = GuestKV(memoryview(dom.memory), memoryview(dom.dirty))
        self.kv.conn_forget_all()
        self.connections: set[Connection] = set()
        self.nondeterministic = nondeterministic
        self._tokens_path = dom.path / "tokens"
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
        first, last = offset // BLOCK_SIZE, (offset + len(data) - 1) // BLOCK_SIZE
        self._disk_dirty[first : last + 1] = b"\x01" * (last - first + 1)

    def _disk_read(self, offset: int, length: int) -> bytes:
        return os.pread(self._disk_fd, length, offset)

    async def serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
        conn = Connection(self.kv, writer, int(peer[1]), int(local[1]))
        self.connections.add(conn)
        try:
            while data := await reader.read(65536):
                conn.received(data)
                await self.running.wait()  # a suspended guest runs no code
                self.serve(conn)
                await writer.drain()
        except (ConnectionError, HistoryLost):
            pass
        finally:
            self.connections.discard(conn)
            conn.close()
            writer.close()

    def serve(self, conn: Connection) -> None:
        """Answer every whole request ``conn`` holds; requests are applied whole
        within one event-loop step, which is what makes that step a safe point."""
        while (line := conn.next_request()) is not None:
            conn.reply(self.handle(line))

    def reloaded(self) -> None:
        """The memory was replaced while suspended (a COLO checkpoint): realign every
        connection on the positions the memory now records, and answer what that
        leaves to answer."""
        self.kv.reload()
        for conn in list(self.connections):
            try:
                conn.realign()
                self.serve(conn)
            except HistoryLost:
                conn.writer.close()

    def handle(self, line: bytes) -> bytes:
        verb, _, rest = line.partition(b" ")
        try:
            if verb == b"PUT":
                key, _, value = rest.partition(b" ")
                if self.journal is None:
                    self.kv.put(key, value)
                else:
                    seq = self.kv.journal_seq + 1
                    self.journal.append(seq, key, value)  # write-ahead: disk, then memory
                    self.kv.put(key, value, journal_seq=seq)
                return self._ok()
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

    def _ok(self) -> bytes:
        """``OK``, or, about once in ``nondeterministic`` replies, ``OK <token>`` with a
        random token that only this copy can produce (logged, outside guest memory,
        to the domain's ``tokens`` file, so tests can tell whose reply a client saw)."""
        if not self.nondeterministic or random.randrange(self.nondeterministic):
            return b"OK\n"
        token = secrets.token_hex(8)
        with open(self._tokens_path, "a") as f:
            f.write(token + "\n")
        return f"OK {token}\n".encode()

    async def evtchn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The suspend event channel: the toolstack's requests, one byte each."""
        try:
            while req := await reader.read(1):
                if req == b"S":
                    self.running.clear()
                    self.dom.write_state(DomainState(RunState.SHUTDOWN, ShutdownReason.SUSPEND))
                    writer.write(b"s")
                elif req == b"R":
                    self.reloaded()  # memory may have been replaced while suspended (COLO)
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


def parse_cmdline(cmdline: str) -> dict[str, str]:
    """``remus_sim.KEY=VALUE`` words of the guest's kernel command line."""
    out = {}
    for word in cmdline.split():
        key, eq, value = word.partition("=")
        if eq and key.startswith("remus_sim."):
            out[key.removeprefix("remus_sim.")] = value
    return out


async def run(
    domdir: Path, listen: str, dirty_rate: int, cmdline: str = "", paused: bool = False
) -> None:
    dom = Machine(domdir)
    options = parse_cmdline(cmdline)
    guest = Guest(dom, dirty_rate, int(options.get("nondeterministic", "0")))
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
    if paused:
        # built but not to run yet (a secondary waiting for the lease): stop before
        # the event loop can serve anybody; the host's unpause sends SIGCONT and
        # marks us running. Synchronous from the address to the stop, so no client
        # is answered in between.
        dom.write_state(DomainState(RunState.PAUSED))
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
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
    ap.add_argument("--cmdline", default="", help="the guest's kernel command line")
    ap.add_argument("--paused", action="store_true", help="stop once ready, until SIGCONT")
    args = ap.parse_args(argv)
    asyncio.run(run(args.domain_dir, args.listen, args.dirty_rate, args.cmdline, args.paused))
    return 0


if __name__ == "__main__":
    sys.exit(main())
