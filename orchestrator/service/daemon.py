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
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final

from ..protection.host import host_facts, open_host
from ..protection.spec import Mode, ProtectionSpec, SpecError, api_schema
from ..protection.status import PAUSE_BUCKETS, ColoFigures, ProtectionStatus, Role, State
from . import config as configmod
from .http import ApiError, EventStream, HttpServer, Request, Response, Route, Router
from .metrics import CONTENT_TYPE, Counter, MetricsRegistry
from .registry import NotFound, ProtectionRecord, Registry
from .supervisor import LEASE_VALID, UNPROTECTED, ProtectError, Supervisor

log = logging.getLogger("remusd")

VERSION: Final = "0.1.0"
EVENTS_KEEP: Final = 10_000

# the API's own error codes and their HTTP status
CODES: Final = {
    "DOMAIN_NOT_FOUND": 404,
    "PROTECTION_NOT_FOUND": 404,
    "ALREADY_PROTECTED": 409,
    "PEER_UNREACHABLE": 502,
    "NOT_PROTECTABLE": 422,
    "WRONG_ROLE": 409,
    "NOT_SECONDARY": 409,
    "PRIMARY_ALIVE": 409,
}

# POST /v1/protections: derived from the spec's table, so the API's names, bounds
# and defaults are the CLI's and the worker's
PROTECT_SCHEMA: Final = api_schema()


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1e3


def _colo(
    get: Callable[[ColoFigures], float | None],
) -> Callable[[ProtectionStatus], float | None]:
    return lambda st: None if st.colo is None else get(st.colo)


# The gauges read from the workers' status: (metric, help, the mode it is for (None:
# any), the value in the metric's unit). Each names its attribute and its scale.
STATUS_GAUGES: Final[
    tuple[tuple[str, str, Mode | None, Callable[[ProtectionStatus], float | None]], ...]
] = (
    ("remus_dirty_pages", "Pages sent per checkpoint (median)", None,
     lambda st: st.dirty_pages_p50),
    ("remus_dirty_bytes", "Bytes of pages per checkpoint (median)", None,
     lambda st: st.dirty_bytes_p50),
    ("remus_disk_blocks", "Disk blocks per checkpoint (median)", None,
     lambda st: st.disk_blocks_p50),
    ("remus_held_output_packets", "Output packets held now", None,
     lambda st: st.held_packets),
    ("remus_held_output_bytes", "Output bytes held now (proxy)", None,
     lambda st: st.held_bytes),
    ("remus_ack_lag_seconds", "CHECKPOINT_END to ACK (median)", None,
     lambda st: _seconds(st.ack_lag_ms_p50)),
    ("remus_last_checkpoint_age_seconds", "Age of the last consistent checkpoint", None,
     lambda st: st.last_checkpoint_age_s),
    ("remus_colo_compare_wait_seconds",
     "COLO: how long output released on a match waited for the secondary's (median)",
     Mode.COLO, _colo(lambda c: _seconds(c.compare_wait_ms_p50))),
    ("remus_colo_held_packets",
     "COLO: output packets held now for the secondary's or a checkpoint",
     Mode.COLO, lambda st: st.held_packets),
)  # fmt: skip

# remus_colo_checkpoints_total's reason label, and the figure it counts
COLO_REASONS: Final[tuple[tuple[str, Callable[[ColoFigures], int | None]], ...]] = (
    ("divergence", lambda c: c.checkpoints_by_divergence),
    ("held", lambda c: c.checkpoints_by_held_output),
    ("timer", lambda c: c.checkpoints_by_timer),
)


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
            "destroyed); reason says why",
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


def _api_error(exc: ProtectError) -> ApiError:
    details = {"reasons": exc.reasons} if exc.reasons else None
    return ApiError(CODES.get(exc.code, 409), exc.code, exc.message, details)


class Service:
    def __init__(self, cfg: configmod.Config) -> None:
        self.cfg = cfg
        Path(cfg.state.dir).mkdir(parents=True, exist_ok=True)
        self.registry = Registry(cfg.registry_path)
        # Xen where this is a dom0 ($REMUS_BACKEND overrides), else the simulation
        self.hv = open_host(None, Path(cfg.state.host) if cfg.state.host else None)
        self.metrics = MetricsRegistry()
        self._new_event = asyncio.Condition()
        self._seen: dict[tuple[str, int], dict[str, Any]] = {}
        # before the supervisor, whose events some counters count
        self._build_metrics()
        self.supervisor = Supervisor(cfg, self.registry, self.hv, self.emit)
        self.router = Router(self._routes(), title="remusd", version=VERSION)
        self.servers: list[HttpServer] = []
        self.started = time.time()

    # -- events ----------------------------------------------------------------------

    def emit(self, kind: str, message: str, name: str | None, data: dict[str, Any] | None) -> None:
        ev = self.registry.append_event(kind, message, name, data)
        log.info("event %d %s %s: %s", ev.id, name or "-", kind, message)
        counter = self._event_counters.get(kind)
        if counter is not None and name is not None:
            counter.labels(domain=name).inc()
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

    def _build_metrics(self) -> None:
        m, labels = self.metrics, ("domain", "peer")
        self.m_checkpoints = m.counter(
            "remus_checkpoints_total", "Checkpoints acknowledged by the secondary", labels
        )
        self.m_pause = m.histogram(
            "remus_checkpoint_pause_seconds",
            "Time the guest was suspended per checkpoint",
            labels,
            buckets=PAUSE_BUCKETS,
        )
        self.m_failovers = m.counter(
            "remus_failovers_total", "Failovers this host took over", ("domain",)
        )
        for metric, help_text, mode, get in STATUS_GAUGES:
            m.callback_gauge(metric, help_text, self._status_values(get, mode), labels)
        m.callback_gauge(
            "remus_replication_state",
            "1 for the protection's current state",
            self._states,
            ("domain", "peer", "role", "state"),
        )
        self.m_colo_checkpoints = m.counter(
            "remus_colo_checkpoints_total",
            "COLO checkpoints by what asked for them (divergent output, output held too "
            "long, the timer)",
            (*labels, "reason"),
        )
        self.m_colo_compared = m.counter(
            "remus_colo_compared_packets_total",
            "COLO: primary output packets compared with the secondary's",
            labels,
        )
        self.m_colo_mismatches = m.counter(
            "remus_colo_mismatches_total",
            "COLO: comparisons that found the output different",
            labels,
        )
        self.m_colo_mirrored = m.counter(
            "remus_colo_mirrored_packets_total",
            "COLO: client packets mirrored to the secondary copy",
            labels,
        )
        self._build_witness_metrics()

    def _build_witness_metrics(self) -> None:
        """The lease (issue 22): who holds it here, for how long, and what it cost."""
        m, labels = self.metrics, ("domain", "peer", "role")
        m.callback_gauge(
            "remus_witness_lease_held",
            "1 while this host holds the protection's lease on its witness (held, or "
            "uncertain: a renewal failed and the lease is still valid), by its worker or by "
            "remusd settling a dead worker's guest; else 0. No series without a witness",
            self._lease_values(lambda v: float(v["lease"] in LEASE_VALID)),
            labels,
        )
        m.callback_gauge(
            "remus_witness_lease_valid_seconds",
            "How long the lease held here stays valid, counted from its last renewal sent "
            "(+Inf: a file witness's lock, held until its holder dies); no series when it "
            "is not held",
            self._lease_values(lambda v: v["lease_valid_for_s"]),
            labels,
        )
        m.callback_gauge(
            "remus_witness_lease_state",
            "1 for the lease's state as this host sees it: held, uncertain (a renewal "
            "failed, still valid), expired, lost (another holder seen), not_held, or none "
            "(nobody here holds or seeks it: no worker runs)",
            self._lease_states,
            (*labels, "state"),
        )
        m.callback_gauge(
            "remus_witness_info",
            "1 for each protection under a witness; the witness label is its URL (a "
            "password taken out)",
            self._witness_info,
            ("domain", "role", "witness"),
        )
        m.callback_gauge(
            "remus_unprotected",
            "1 while a primary's guest runs here with nothing replicating it (its secondary "
            "was lost and it runs on holding the lease, or remusd resumed it under the lease "
            "after its worker died), else 0",
            self._unprotected,
            ("domain", "peer"),
        )
        # counted from the events that say so, whoever acted (worker, guard, remusd)
        self._event_counters = {
            "fenced": m.counter(
                "remus_witness_fenced_total",
                "Times this host's copy was fenced: its guest paused (or destroyed by its "
                "fence guard) because the lease could not be confirmed, by its worker, its "
                "guard or remusd on a dead worker's behalf",
                ("domain",),
            ),
            "lease-lost": m.counter(
                "remus_witness_lease_lost_total",
                "Times the lease under this host's copy was lost (another holder seen) or ran out",
                ("domain",),
            ),
            "taken-over": m.counter(
                "remus_witness_taken_over_total",
                "Times this host's copy was destroyed because another host took the guest "
                "over (its mark on the witness)",
                ("domain",),
            ),
        }

    def _leases(self) -> list[tuple[ProtectionRecord, dict[str, Any]]]:
        out = []
        for rec in self.registry.list():
            view = self.supervisor.lease_view(rec, self.supervisor.read_status(rec.name))
            if view is not None:
                out.append((rec, view))
        return out

    def _lease_values(
        self, get: Callable[[dict[str, Any]], float | None]
    ) -> Callable[[], dict[tuple[str, ...], float]]:
        def values() -> dict[tuple[str, ...], float]:
            out: dict[tuple[str, ...], float] = {}
            for rec, view in self._leases():
                value = get(view)
                if value is not None:
                    out[(rec.name, rec.peer, rec.role)] = float(value)
            return out

        return values

    def _lease_states(self) -> dict[tuple[str, ...], float]:
        return {
            (rec.name, rec.peer, rec.role, view["lease"] or "none"): 1.0
            for rec, view in self._leases()
        }

    def _witness_info(self) -> dict[tuple[str, ...], float]:
        return {(rec.name, rec.role, str(view["url"])): 1.0 for rec, view in self._leases()}

    def _unprotected(self) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for rec in self.registry.list():
            if rec.role == "primary":
                state, _ = self._state_of(rec, self.supervisor.read_status(rec.name))
                out[(rec.name, rec.peer)] = float(state == UNPROTECTED)
        return out

    def _statuses(self) -> list[tuple[ProtectionRecord, ProtectionStatus]]:
        out = []
        for rec in self.registry.list():
            st = self.supervisor.read_status(rec.name)
            if st is not None:
                out.append((rec, st))
        return out

    def _status_values(
        self, get: Callable[[ProtectionStatus], float | None], mode: Mode | None
    ) -> Callable[[], dict[tuple[str, ...], float]]:
        def values() -> dict[tuple[str, ...], float]:
            out: dict[tuple[str, ...], float] = {}
            for rec, st in self._statuses():
                value = get(st) if mode in (None, st.mode) else None
                if value is not None:  # not measured: no series rather than a made-up 0
                    out[(rec.name, rec.peer)] = float(value)
            return out

        return values

    def _states(self) -> dict[tuple[str, ...], float]:
        return {(rec.name, rec.peer, rec.role, rec.last_state): 1.0 for rec in self.registry.list()}

    def _fold_counters(self) -> None:
        """Workers count from zero; remusd's counters go on across worker restarts."""
        statuses = self._statuses()
        # only the running workers' last figures are kept: a restarted worker's or a
        # deleted protection's would otherwise stay for as long as remusd runs
        live = {(rec.name, st.pid) for rec, st in statuses}
        self._seen = {k: v for k, v in self._seen.items() if k in live}
        for rec, st in statuses:
            key = (rec.name, st.pid)
            before = self._seen.get(key, {})
            seen = dict(before)
            done = st.checkpoints
            if st.role is Role.PRIMARY:
                self.m_checkpoints.labels(domain=rec.name, peer=rec.peer).inc(
                    max(0, done - int(before.get("checkpoints", 0)))
                )
                hist = st.pause_histogram
                # a worker with other bounds than ours would merge into the wrong buckets
                if tuple(hist.le) == PAUSE_BUCKETS:
                    old = before.get("counts") or [0] * len(hist.counts)
                    delta = [max(0, n - o) for n, o in zip(hist.counts, old, strict=True)]
                    if any(delta):
                        self.m_pause.labels(domain=rec.name, peer=rec.peer).merge(
                            delta, max(0.0, hist.sum - float(before.get("sum", 0.0)))
                        )
                    seen.update(counts=list(hist.counts), sum=hist.sum)
                if st.mode is Mode.COLO and st.colo is not None:
                    self._fold_colo(rec, st.colo, before, seen)
            if st.state is State.FAILED_OVER and not before.get("failed_over"):
                self.m_failovers.labels(domain=rec.name).inc()
                seen["failed_over"] = True
            self._seen[key] = {**seen, "checkpoints": done}

    def _fold_colo(
        self,
        rec: ProtectionRecord,
        colo: ColoFigures,
        before: dict[str, Any],
        seen: dict[str, Any],
    ) -> None:
        labels = {"domain": rec.name, "peer": rec.peer}
        counters: list[tuple[Counter, dict[str, str], str, int | None]] = [
            (self.m_colo_checkpoints, {**labels, "reason": reason}, reason, get(colo))
            for reason, get in COLO_REASONS
        ]
        counters += [
            (self.m_colo_compared, labels, "compared", colo.compared_packets),
            (self.m_colo_mismatches, labels, "mismatches", colo.mismatches),
            (self.m_colo_mirrored, labels, "mirrored", colo.mirrored_packets),
        ]
        for family, values, seen_key, value in counters:
            if value is None:  # -n: nothing compared or mirrored, so no series either
                continue
            family.labels(**values).inc(max(0, value - int(before.get(seen_key, 0))))
            seen[seen_key] = value

    def render_metrics(self) -> bytes:
        self._fold_counters()
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

    async def h_health(self, _req: Request) -> Response:
        return Response(
            body={
                "status": "ok",
                "version": VERSION,
                "uptime_s": round(time.time() - self.started, 3),
                "protections": len(self.registry.list()),
            }
        )

    async def h_host(self, _req: Request) -> Response:
        facts = host_facts(self.hv)
        return Response(
            body={
                **{k: v for k, v in facts.items() if k != "protocol_version"},
                "replication": {
                    "listen": self.cfg.replication.listen,
                    "port": self.supervisor.replication_port,
                    "protocol_version": facts["protocol_version"],
                },
            }
        )

    async def h_list(self, _req: Request) -> Response:
        return Response(body=[self._protection(r.name) for r in self.registry.list()])

    async def h_get(self, req: Request) -> Response:
        return Response(body=self._protection(req.params["name"]))

    async def h_protect(self, req: Request) -> Response:
        # the schema has checked types and bounds; the spec checks them again, as it does
        # for every form (the peer's address is the pre-flight's, with the other checks)
        try:
            spec = ProtectionSpec.from_api(req.body, self.cfg.spec_defaults())
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
        with contextlib.suppress(NotFound):
            rec = self.registry.get(spec.name)
            raise ApiError(
                409,
                "ALREADY_PROTECTED",
                f"{spec.name} is already registered here as {rec.role} ({rec.desired})",
            )
        try:
            await self.supervisor.protect(spec)
        except ProtectError as exc:
            raise _api_error(exc) from None
        return Response(201, self._protection(spec.name))

    async def h_delete(self, req: Request) -> Response:
        name = req.params["name"]
        self._protection(name)
        try:
            await self.supervisor.unprotect(name)
        except ProtectError as exc:
            raise _api_error(exc) from None
        self.metrics.remove_matching(domain=name)  # its series go with it
        return Response(204)

    async def h_pause(self, req: Request) -> Response:
        name = req.params["name"]
        self._protection(name)
        try:
            await self.supervisor.unprotect(name, keep_record=True)
        except ProtectError as exc:
            raise _api_error(exc) from None
        return Response(body=self._protection(name))

    async def h_resume(self, req: Request) -> Response:
        name = req.params["name"]
        self._protection(name)
        try:
            await self.supervisor.resume(name)
        except ProtectError as exc:
            raise _api_error(exc) from None
        return Response(body=self._protection(name))

    async def h_failover(self, req: Request) -> Response:
        name = req.params["name"]
        self._protection(name)
        try:
            self.supervisor.failover(name, bool((req.body or {}).get("force", False)))
        except ProtectError as exc:
            raise _api_error(exc) from None
        return Response(202, {"name": name, "failover": "requested"})

    async def h_events(self, req: Request) -> Response:
        after = int(req.query.get("after", 0))
        wait = float(req.query.get("wait", 0))
        limit = int(req.query.get("limit", 100))
        name = req.query.get("name")
        if wait and self.registry.latest_event_id() <= after:
            await self._wait_event(after, wait)
        events = self.registry.events_since(after, limit, name)
        return Response(body=[_event_json(e) for e in events])

    async def h_event_stream(self, req: Request) -> EventStream:
        resume_from = req.headers.get("last-event-id", "")  # a reconnecting client
        if "after" in req.query:
            after = int(req.query["after"])
        elif resume_from.isdigit():
            after = int(resume_from)
        else:
            after = self.registry.latest_event_id()
        name = req.query.get("name")

        async def gen() -> AsyncIterator[tuple[str, Any, str | None]]:
            cursor = after
            while True:
                for e in self.registry.events_since(cursor, 100, name):
                    cursor = e.id
                    yield e.kind, _event_json(e), str(e.id)
                await self._wait_event(cursor, 15.0)

        return EventStream(gen())

    async def h_metrics(self, _req: Request) -> Response:
        return Response(raw=self.render_metrics(), content_type=CONTENT_TYPE)

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
        api = HttpServer(self.router, token=_read_token(self.cfg.api.token_file))
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
            await api.start_tcp(addr[0], addr[1], ctx)
        maddr = configmod.parse_hostport("metrics.listen", self.cfg.metrics.listen, True)
        if maddr is not None:
            only_metrics = Router(
                [Route("GET", "/metrics", self.h_metrics, content_type=CONTENT_TYPE, public=True)],
                openapi_path=None,
            )
            metrics_server = HttpServer(only_metrics)
            self.metrics_port = await metrics_server.start_tcp(maddr[0], maddr[1])
            self.servers.append(metrics_server)
        self.emit("started", f"remusd {VERSION} started", None, {"pid": os.getpid()})

    async def close(self) -> None:
        for s in self.servers:
            await s.close()
        await self.supervisor.close()
        self.registry.close()


def _event_json(e: Any) -> dict[str, Any]:
    return {"id": e.id, "ts": e.ts, "name": e.name, "kind": e.kind, "message": e.message,
            "data": e.data}  # fmt: skip


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
