"""A witness member in its own process, for the tests to SIGKILL/SIGSTOP.

    python -m tests.coordination.holder URL MEMBER NAME TTL

It starts a LeaseKeeper that acquires NAME and prints one JSON line per
fact: {"state": ...} on every state change, {"valid_until": ...} whenever
the validity moves (a successful renewal sent at valid_until - ttl), and
answers stdin commands: "renew" ({"renew": bool, "state": ...}), "state",
"quit".
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from orchestrator.coordination import LeaseKeeper, LeaseState, open_witness


def say(**kw: object) -> None:
    kw["t"] = time.monotonic()
    print(json.dumps(kw), flush=True)


async def main(url: str, member: str, name: str, ttl: float) -> None:
    witness = await open_witness(url, member, ttl)

    def on_change(state: LeaseState, reason: str) -> None:
        say(state=state.value, reason=reason)

    keeper = LeaseKeeper(witness, name, ttl, on_change=on_change)
    keeper.start(acquire=True)

    async def watch_validity() -> None:
        last = None
        while True:
            if keeper.valid_until != last:
                last = keeper.valid_until
                say(valid_until=last)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch_validity())
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        cmd = line.strip()
        if cmd == "renew":
            ok = await witness.renew()
            say(renew=ok, state=keeper.state.value, reason=keeper.reason)
        elif cmd == "state":
            say(state=keeper.state.value, reason=keeper.reason, held=keeper.held())
        elif cmd in ("quit", ""):
            break
    watcher.cancel()
    await keeper.stop()
    await witness.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
