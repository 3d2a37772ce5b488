"""remusd: the long-running service that owns this host's protections.

One per host. It serves the HTTP API (``/v1/...``, schema at
``/v1/openapi.json``) on a unix socket, and optionally on TCP with TLS and a
bearer token; the replication endpoint peers' primaries connect to; and
Prometheus metrics at ``/metrics`` (on the API and on a loopback port). The
protections themselves run in worker processes it supervises
(``supervisor.py``); their settings, last known state and an event log live
in a SQLite registry (``registry.py``) that survives restarts.

    remusd [--config /etc/remus/remusd.toml] [--set section.key=value ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from ..protection.host import host_facts, open_host
from ..protection.spec import Mode, ProtectionSpec, SpecError, api_schema
from ..protection.status import ProtectionStatus
from . import config as configmod
from .http import BODY, QUERY, ApiError, ApiServer, Route, event_stream, json_response
from .metrics import CONTENT_TYPE, Metrics, Seen
from .registry import NotFound, ProtectionRecord, Registry
from .supervisor import Supervisor, refusal_code

log = logging.getLogger("remusd")

VERSION: Final = "0.1.0"
EVENTS_KEEP: Final = 10_000

# POST /v1/protections: derived from the spec's table, so the API's names, bounds
# and defaults are the CLI's and the worker's
PROTECT_SCHEMA: Final = api_schema()
PREFLIGHT_SCHEMA: Final = {
    "type": "object",
    "properties": {
        "protectable": {"type": "boolean"},
        "code": {"type": ["string", "null"], "description": "what POST /v1/protections answers"},
        "reasons": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"check": {"type": "string"}, "message": {"type": "string"}},
                "required": ["check", "message"],
            },
        },
    },
    "required": ["protectable", "code", "reasons"],
}


def _figure(description: str, kind: str = "integer") -> dict[str, Any]:
    # null: not measured (the worker has not published it yet, or -n compares nothing)
    return {"type": [kind, "null"], "description": description}


# the COLO fields of a worker's status file that the API serves, per role
COLO_PRIMARY_FIELDS: Final = {
    "checkpoints": _figure("Checkpoints the secondary has loaded"),
    "checkpoints_by_divergence": _figure("Checkpoints because the copies' output differed"),
    "checkpoints_by_held_output": _figure(
        "Checkpoints because output waited past compare_timeout_ms for the secondary's"
    ),
    "checkpoints_by_timer": _figure("Checkpoints because checkpoint_max_interval_ms passed"),
    "memory_verified": _figure("Checkpoints whose memory digests matched (--verify-memory)"),
    "pause_ms_p50": _figure("Guest pause per checkpoint, median of the recent ones", "number"),
    "compared_packets": _figure("Primary output packets compared with the secondary's"),
    "matched_bytes": _figure("Output bytes both copies sent alike"),
    "mismatches": _figure("Comparisons that found the copies' output different"),
    "released_at_once": _figure("Output packets released as soon as they matched"),
    "released_at_checkpoint": _figure("Output packets released by a checkpoint"),
    "held_packets": _figure("Output packets held now"),
    "oldest_held_ms": _figure("Age of the oldest held output packet", "number"),
    "compare_wait_ms_p50": _figure(
        "How long output released on a match waited for the secondary's, median of the "
        "recent ones: what COLO adds to a reply's latency",
        "number",
    ),
    "compare_wait_ms_p99": _figure("The same wait, 99th percentile of the recent ones", "number"),
    "mirrored_packets": _figure("Client packets mirrored to the secondary copy"),
    "mirrored_bytes": _figure("Client bytes mirrored to the secondary copy"),
}
# the figures of these names are the status's own; the others are its ColoFigures'
STATUS_LEVEL: Final = frozenset({"checkpoints", "pause_ms_p50", "held_packets"})
COLO_SECONDARY_FIELDS: Final = {
    "checkpoints": _figure("Checkpoints loaded into the secondary copy"),
    "injected_packets": _figure("Mirrored client packets fed to the secondary copy"),
    "reported_bytes": _figure("Secondary output bytes sent to the primary for comparison"),
    "dropped_unknown": _figure("Mirrored packets of no connection the secondary copy knows"),
    "inject_errors": _figure("Mirrored packets that could not be fed to the secondary copy"),
    "output_filtered": _figure("The secondary copy's output is kept from the network", "boolean"),
}
# the lease (issue 22) as a protection's document shows it
WITNESS_SCHEMA: Final = {
    "type": ["object", "null"],
    "description": "The protection's witness and its lease as this host holds it; null "
    "without a witness (unsafe: a secondary takes over on heartbeats alone, and a "
    "partition or a dead worker can leave two copies running)",
    "properties": {
        "url": {"type": "string", "description": "The witness (a password taken out)"},
        "lease": {
            "type": ["string", "null"],
            "description": "held; uncertain (a renewal failed, the lease is still valid); "
            "expired (its validity ran out, nobody else seen); lost (another holder was "
            "seen); not_held; null: nobody here holds or seeks it (no worker runs)",
        },
        "lease_valid_for_s": {
            "type": ["number", "null"],
            "description": "How long the lease stays valid, counted from its last renewal "
            "sent; null when not held, or when it cannot expire while its holder lives (a "
            "file witness's lock)",
        },
        "lease_expires": {
            "type": "boolean",
            "description": "Whether the lease runs out unless renewed (etcd), or is held "
            "until its holder dies (a file witness)",
        },
        "holder": {
            "type": ["string", "null"],
            "enum": ["worker", "remusd", None],
            "description": "Who holds it here: the protection's worker, or remusd itself "
            "while it settles a dead worker's guest; null: nobody here",
        },
    },
    "additionalProperties": False,
}
PROTECTION_SCHEMA: Final = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "role": {"type": "string", "enum": ["primary", "secondary"]},
        "peer": {"type": "string"},
        "mode": {"type": "string", "enum": ["remus", "colo"]},
        "desired": {"type": "string"},
        "state": {
            "type": "string",
            "description": "starting, replicating, failing-over, failed-over, stopped, "
            "error; under a lease also fenced (the guest paused here: the lease could not "
            "be confirmed), unprotected (the guest runs here holding the lease, nothing "
            "replicates it) and taken-over (another host runs the guest: ours was "
            "destroyed); after a planned switchover switched-over on the old primary "
            "(the peer runs the guest, ours was destroyed, this host becomes its "
            "secondary); reason says why",
        },
        "checkpoints": {"type": "integer"},
        "reason": {"type": "string"},
        "witness": WITNESS_SCHEMA,
        "settings": {"type": "object"},
        "disk": {
            "type": ["string", "null"],
            "description": "replicated or not replicated (always not for COLO); null on "
            "a secondary",
        },
        "colo": {
            "type": ["object", "null"],
            "description": "COLO's figures (null for Remus): the primary's or the "
            "secondary's properties below, as the role has them",
            "properties": {**COLO_PRIMARY_FIELDS, **COLO_SECONDARY_FIELDS},
            "additionalProperties": False,
        },
        "live": {"type": "object", "description": "The worker's status file as it is"},
    },
}
FAILOVER_SCHEMA: Final = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"force": {"type": "boolean"}},
}


class Service:
    def __init__(self, cfg: configmod.Config) -> None:
        self.cfg = cfg
        Path(cfg.state.dir).mkdir(parents=True, exist_ok=True)
        self.registry = Registry(cfg.registry_path)
        # Xen where this is a dom0 ($REMUS_BACKEND overrides), else the simulation
        self.hv = open_host(None, Path(cfg.state.host) if cfg.state.host else None)
        # before the supervisor, whose events some counters count
        self.metrics = Metrics(self._scrape)
        self._new_event = asyncio.Condition()
        self.supervisor = Supervisor(cfg, self.registry, self.hv, self.emit)
        self.api = ApiServer(self._routes(), title="remusd", version=VERSION)
        self.servers: list[ApiServer] = []
        self.started = time.time()

    # -- events ----------------------------------------------------------------------

    def emit(self, kind: str, message: str, name: str | None, data: dict[str, Any] | None) -> None:
        ev = self.registry.append_event(kind, message, name, data)
        log.info("event %d %s %s: %s", ev.id, name or "-", kind, message)
        if name is not None:
            self.metrics.count_event(kind, name)
        if ev.id % 1000 == 0:
            self.registry.prune_events(EVENTS_KEEP)

        async def wake() -> None:
            async with self._new_event:
                self._new_event.notify_all()

        with contextlib.suppress(RuntimeError):  # no loop yet (start-up)
            asyncio.get_running_loop().create_task(wake())

    async def _wait_event(self, after: int, timeout: float) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation,
        # and an event stream is cancelled whenever its client goes away
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self._new_event:
                await self._new_event.wait_for(lambda: self.registry.latest_event_id() > after)

    # -- metrics -----------------------------------------------------------------------

    def _scrape(self) -> list[Seen]:
        """Each protection as a metrics scrape reads it: its worker's status read once."""
        out = []
        for rec in self.registry.list():
            st = self.supervisor.read_status(rec.name)
            state, _ = self._state_of(rec, st)
            view = self.supervisor.lease_view(rec, st)
            out.append(Seen(rec.name, rec.peer, rec.role, rec.last_state, state, st, view))
        return out

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    # -- handlers ----------------------------------------------------------------------

    def _protection(self, name: str) -> dict[str, Any]:
        try:
            rec = self.registry.get(name)
        except NotFound:
            raise ApiError(
                404, "PROTECTION_NOT_FOUND", f"no protection of {name!r} on this host"
            ) from None
        st = self.supervisor.read_status(name)
        colo = None
        if rec.mode == Mode.COLO.value:
            fields = COLO_PRIMARY_FIELDS if rec.role == "primary" else COLO_SECONDARY_FIELDS
            colo = {k: _colo_figure(st, k) for k in fields}
        disk = None
        if rec.role == "primary":  # the worker knows best (a domain may have no disk)
            disk = "not replicated" if rec.mode == Mode.COLO.value else st and st.disk
            if not disk and rec.spec is not None:
                disk = "replicated" if rec.spec.replicates_disk else "not replicated"
        live = {} if st is None else st.to_dict()
        live.pop("pause_histogram", None)  # the metrics' business, and long
        state, reason = self._state_of(rec, st)
        return {
            "name": rec.name,
            "role": rec.role,
            "peer": rec.peer,
            "mode": rec.mode,
            "desired": rec.desired,
            "state": state,
            "checkpoints": st.checkpoints if st is not None and st.checkpoints else rec.checkpoints,
            "reason": reason,
            "witness": self._witness_view(rec, st),
            "settings": _settings(rec.spec),
            "disk": disk,
            "colo": colo,
            "live": live,
        }

    def _state_of(self, rec: ProtectionRecord, st: ProtectionStatus | None) -> tuple[str, str]:
        """The protection's state and its reason: the worker's while one runs; the
        record's once it has gone (a paused protection's last status says "stopped", a
        dead worker's says what it did when it died, and remusd may be settling its
        lease)."""
        if rec.desired == "paused" or st is None:
            return rec.last_state, (st.reason if st is not None else "") or rec.reason
        if self.supervisor.worker_gone(rec.name):
            return rec.last_state, rec.reason or st.reason
        return st.state.value, st.reason or rec.reason

    def _witness_view(
        self, rec: ProtectionRecord, st: ProtectionStatus | None
    ) -> dict[str, Any] | None:
        view = self.supervisor.lease_view(rec, st)
        if view is None:
            return None
        valid = view["lease_valid_for_s"]
        return {
            **view,
            "lease_valid_for_s": None if valid is None or math.isinf(valid) else valid,
            "lease_expires": not str(view["url"]).startswith("file:"),
        }

    async def h_health(self, _req: web.Request) -> web.Response:
        return json_response(
            {
                "status": "ok",
                "version": VERSION,
                "uptime_s": round(time.time() - self.started, 3),
                "protections": len(self.registry.list()),
            }
        )

    async def h_host(self, _req: web.Request) -> web.Response:
        facts = host_facts(self.hv)
        return json_response(
            {
                **{k: v for k, v in facts.items() if k != "protocol_version"},
                "replication": {
                    "listen": self.cfg.replication.listen,
                    "port": self.supervisor.replication_port,
                    "protocol_version": facts["protocol_version"],
                    # tls (mutual, pinned peers) or plain (replication.insecure)
                    "link": self.supervisor.link_mode,
                },
            }
        )

    async def h_list(self, _req: web.Request) -> web.Response:
        return json_response([self._protection(r.name) for r in self.registry.list()])

    async def h_get(self, req: web.Request) -> web.Response:
        return json_response(self._protection(req.match_info["name"]))

    async def h_preflight(self, req: web.Request) -> web.Response:
        """What `POST /v1/protections` would find with this body, doing nothing: the
        same checks in the same order, answered as a result rather than an error."""

        def verdict(code: str | None, reasons: list[dict[str, str]]) -> web.Response:
            return json_response({"protectable": not reasons, "code": code, "reasons": reasons})

        try:
            spec = self._spec_of(req)
        except ApiError as exc:  # a setting the spec refuses (its reasons are in details)
            return verdict(exc.code, list((exc.details or {}).get("reasons", [])))
        taken = self.supervisor.registered(spec.name)
        if taken is not None:
            return verdict("ALREADY_PROTECTED", [{"check": "already_protected", "message": taken}])
        reasons = await self.supervisor.check(spec)
        return verdict(refusal_code(reasons) if reasons else None, reasons)

    def _spec_of(self, req: web.Request) -> ProtectionSpec:
        # the schema has checked types and bounds; the spec checks them again, as it does
        # for every form (the peer's address is the pre-flight's, with the other checks)
        try:
            return ProtectionSpec.from_api(req[BODY], self.cfg.spec_defaults())
        except SpecError as exc:
            # 422 as for a failed pre-flight: the body is well-formed, the request is not
            # one this host can carry out; the field is named as a schema error names it
            details = {
                "field": exc.field,
                "in": "body",
                "problem": str(exc).split(": ", 1)[-1],
                "reasons": [{"check": "settings", "message": str(exc)}],
            }
            raise ApiError(422, "NOT_PROTECTABLE", str(exc), details) from None

    async def h_protect(self, req: web.Request) -> web.Response:
        spec = self._spec_of(req)
        await self.supervisor.protect(spec)  # a failover's survivor may protect back
        return json_response(self._protection(spec.name), 201)

    async def h_delete(self, req: web.Request) -> web.Response:
        name = req.match_info["name"]
        self._protection(name)
        await self.supervisor.unprotect(name)
        self.metrics.forget(name)  # its series go with it
        return web.Response(status=204)

    async def h_pause(self, req: web.Request) -> web.Response:
        name = req.match_info["name"]
        self._protection(name)
        await self.supervisor.unprotect(name, keep_record=True)
        return json_response(self._protection(name))

    async def h_resume(self, req: web.Request) -> web.Response:
        name = req.match_info["name"]
        self._protection(name)
        await self.supervisor.resume(name)
        return json_response(self._protection(name))

    async def h_failover(self, req: web.Request) -> web.Response:
        name = req.match_info["name"]
        self._protection(name)
        self.supervisor.failover(name, bool((req[BODY] or {}).get("force", False)))
        return json_response({"name": name, "failover": "requested"}, 202)

    async def h_switchover(self, req: web.Request) -> web.Response:
        name = req.match_info["name"]
        self._protection(name)
        final = await self.supervisor.switchover(name)
        # the worker's last word: the file under its name may be the peer's protection
        # back by now (this host's new secondary worker)
        live = final.to_dict()
        live.pop("pause_histogram", None)
        view = self._protection(name)
        return json_response(
            {**view, "state": final.state.value, "reason": final.reason, "live": live}
        )

    async def h_events(self, req: web.Request) -> web.Response:
        query = req[QUERY]
        after, wait, limit = query.get("after", 0), query.get("wait", 0), query.get("limit", 100)
        name = query.get("name")
        if wait and self.registry.latest_event_id() <= after:
            await self._wait_event(after, wait)
        events = self.registry.events_since(after, limit, name)
        return json_response([asdict(e) for e in events])

    async def h_event_stream(self, req: web.Request) -> web.StreamResponse:
        query = req[QUERY]
        resume_from = req.headers.get("Last-Event-ID", "")  # a reconnecting client
        if "after" in query:
            after = int(query["after"])
        elif resume_from.isdigit():
            after = int(resume_from)
        else:
            after = self.registry.latest_event_id()
        name = query.get("name")

        async def gen() -> AsyncIterator[tuple[str, Any, str | None]]:
            cursor = after
            while True:
                for e in self.registry.events_since(cursor, 100, name):
                    cursor = e.id
                    yield e.kind, asdict(e), str(e.id)
                await self._wait_event(cursor, 15.0)

        return await event_stream(req, gen())

    async def h_metrics(self, _req: web.Request) -> web.Response:
        return web.Response(body=self.render_metrics(), headers={"Content-Type": CONTENT_TYPE})

    def _routes(self) -> list[Route]:
        name_404 = [(404, "PROTECTION_NOT_FOUND")]
        query_events = {
            "after": {"type": "integer", "minimum": 0},
            "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
            "wait": {"type": "number", "minimum": 0, "maximum": 60},
            "name": {"type": "string", "maxLength": 64},
        }
        return [
            Route("GET", "/v1/health", self.h_health, summary="Liveness", public=True),
            Route("GET", "/v1/host", self.h_host, summary="Backend, Xen, helper, buffering"),
            Route(
                "GET",
                "/v1/protections",
                self.h_list,
                summary="Protections on this host",
                response_schema={"type": "array", "items": PROTECTION_SCHEMA},
            ),
            Route(
                "POST",
                "/v1/protections",
                self.h_protect,
                summary="Protect a domain (pre-flight first)",
                request_schema=PROTECT_SCHEMA,
                response_schema=PROTECTION_SCHEMA,
                status=201,
                errors=[
                    (404, "DOMAIN_NOT_FOUND"),
                    (409, "ALREADY_PROTECTED"),
                    (502, "PEER_UNREACHABLE"),
                    (422, "NOT_PROTECTABLE"),
                ],
            ),
            Route(
                "POST",
                "/v1/preflight",
                self.h_preflight,
                summary="Whether POST /v1/protections with this body would protect, and the "
                "typed reasons why not (nothing is registered or started)",
                request_schema=PROTECT_SCHEMA,
                response_schema=PREFLIGHT_SCHEMA,
            ),
            Route(
                "GET",
                "/v1/protections/{name}",
                self.h_get,
                summary="One protection",
                response_schema=PROTECTION_SCHEMA,
                errors=name_404,
            ),
            Route(
                "DELETE",
                "/v1/protections/{name}",
                self.h_delete,
                summary="Unprotect (the domain runs on here)",
                status=204,
                errors=[*name_404, (409, "WRONG_ROLE")],
            ),
            Route(
                "POST",
                "/v1/protections/{name}/pause",
                self.h_pause,
                summary="Stop replicating, keep the protection",
                errors=[*name_404, (409, "WRONG_ROLE")],
            ),
            Route(
                "POST",
                "/v1/protections/{name}/resume",
                self.h_resume,
                summary="Replicate again (full resynchronisation)",
                errors=[*name_404, (409, "WRONG_ROLE"), (409, "ALREADY_PROTECTED")],
            ),
            Route(
                "POST",
                "/v1/protections/{name}/failover",
                self.h_failover,
                summary="On the secondary: take over now",
                request_schema=FAILOVER_SCHEMA,
                status=202,
                errors=[*name_404, (409, "NOT_SECONDARY"), (409, "PRIMARY_ALIVE")],
            ),
            Route(
                "POST",
                "/v1/protections/{name}/switchover",
                self.h_switchover,
                summary="On the primary: a planned swap of roles (a last checkpoint, its "
                "ACK, the secondary resumes, this host becomes the secondary); answers "
                "once the guest runs on the peer",
                response_schema=PROTECTION_SCHEMA,
                errors=[
                    *name_404,
                    (409, "WRONG_ROLE"),
                    (409, "LINK_UNHEALTHY"),
                    (409, "WITNESS_UNHEALTHY"),
                    (422, "NOT_PROTECTABLE"),
                    (502, "SWITCHOVER_FAILED"),
                ],
            ),
            Route(
                "GET",
                "/v1/events",
                self.h_events,
                summary="Event log after a cursor (long-poll with wait)",
                query=query_events,
            ),
            Route(
                "GET",
                "/v1/events/stream",
                self.h_event_stream,
                summary="Events as Server-Sent Events",
                content_type="text/event-stream",
                query={k: v for k, v in query_events.items() if k in ("after", "name")},
            ),
            Route(
                "GET",
                "/metrics",
                self.h_metrics,
                summary="Prometheus metrics",
                content_type=CONTENT_TYPE,
            ),
        ]

    # -- run -----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.supervisor.start()
        api = self.api
        Path(self.cfg.api.socket).parent.mkdir(parents=True, exist_ok=True)
        await api.start_unix(self.cfg.api.socket)
        self.servers.append(api)
        if self.cfg.api.tcp:
            addr = configmod.parse_hostport("api.tcp", self.cfg.api.tcp)
            assert addr is not None
            ctx = None
            if self.cfg.api.tls_cert:
                ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                ctx.load_cert_chain(self.cfg.api.tls_cert, self.cfg.api.tls_key)
            await api.start_tcp(addr[0], addr[1], ctx, _read_token(self.cfg.api.token_file))
        maddr = configmod.parse_hostport("metrics.listen", self.cfg.metrics.listen, True)
        if maddr is not None:
            metrics_server = ApiServer(
                [Route("GET", "/metrics", self.h_metrics, content_type=CONTENT_TYPE, public=True)],
                openapi_path=None,
            )
            self.metrics_port = await metrics_server.start_tcp(maddr[0], maddr[1])
            self.servers.append(metrics_server)
        self.emit("started", f"remusd {VERSION} started", None, {"pid": os.getpid()})

    async def close(self) -> None:
        for s in self.servers:
            await s.close()
        await self.supervisor.close()
        self.registry.close()


def _read_token(path: str) -> str | None:
    return Path(path).read_text().strip() or None if path else None


def _colo_figure(st: ProtectionStatus | None, key: str) -> Any:
    """One of the API's COLO figures: the status's own, or from its ColoFigures."""
    if st is None:
        return None
    if key in STATUS_LEVEL:
        return getattr(st, key)
    return None if st.colo is None else getattr(st.colo, key)


def _settings(spec: ProtectionSpec | None) -> dict[str, Any]:
    """What the API shows of a protection's settings: the fields a POST may set, so
    that a GET's settings are a valid body to protect the same way again."""
    if spec is None:
        return {}
    api = PROTECT_SCHEMA["properties"]
    return {k: v for k, v in spec.to_dict().items() if k in api}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="remusd", description=__doc__)
    ap.add_argument("--config", type=Path, default=configmod.DEFAULT_PATH)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one configuration key (repeatable)",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"remusd: --set {item!r}: expected SECTION.KEY=VALUE", file=sys.stderr)
            return 2
        overrides[key] = value
    try:
        cfg = configmod.load(args.config, overrides)
    except configmod.ConfigError as exc:
        print(f"remusd: configuration: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(cfg))


async def _serve(cfg: configmod.Config) -> int:
    service = Service(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
        print(f"remusd: listening on {cfg.api.socket}", file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        # protections carry on in their workers; the next remusd re-attaches
        await service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
