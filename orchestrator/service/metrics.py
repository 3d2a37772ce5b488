"""remusd's Prometheus metrics: one collector, read at scrape time, on a registry of its own.

prometheus_client renders them from a ``CollectorRegistry`` that belongs to one
:class:`Metrics` (never the process-wide ``REGISTRY``), so tests and a restarted
service never see another instance's series. A scrape reads each protection once
(:class:`Seen`: its record, its worker's typed ``ProtectionStatus`` and its lease
as this host holds it) and yields:

- gauges, the status's figures now, each in its metric's unit (a figure not
  measured has no series rather than a made-up 0);
- counters that go on across worker restarts: a worker counts from zero, and
  remusd adds what is new since it last looked at that worker (name and pid);
  and counters of the events that say so (fenced, lease-lost, taken-over);
- the checkpoint pause histogram, folded in from the workers' bucket counts the
  same way.

A deleted protection's series go with it (:meth:`Metrics.forget`).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..protection.rescue import LEASE_VALID
from ..protection.spec import Mode
from ..protection.status import (
    PAUSE_BUCKETS,
    ColoFigures,
    PauseHistogram,
    ProtectionStatus,
    Role,
    State,
)

log = logging.getLogger(__name__)

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST  # what generate_latest() writes


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1e3


def _colo(
    get: Callable[[ColoFigures], float | None],
) -> Callable[[ProtectionStatus], float | None]:
    return lambda st: None if st.colo is None else get(st.colo)


PEER: Final = ("domain", "peer")
LEASE: Final = ("domain", "peer", "role")

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

# remusd's counters: their help and labels
COUNTERS: Final[dict[str, tuple[str, tuple[str, ...]]]] = {
    "remus_checkpoints_total": ("Checkpoints acknowledged by the secondary", PEER),
    "remus_failovers_total": ("Failovers this host took over", ("domain",)),
    "remus_colo_checkpoints_total": (
        "COLO checkpoints by what asked for them (divergent output, output held too "
        "long, the timer)",
        (*PEER, "reason"),
    ),
    "remus_colo_compared_packets_total": (
        "COLO: primary output packets compared with the secondary's",
        PEER,
    ),
    "remus_colo_mismatches_total": ("COLO: comparisons that found the output different", PEER),
    "remus_colo_mirrored_packets_total": (
        "COLO: client packets mirrored to the secondary copy",
        PEER,
    ),
    "remus_witness_fenced_total": (
        "Times this host's copy was fenced: its guest paused (or destroyed by its fence "
        "guard) because the lease could not be confirmed, by its worker, its guard or "
        "remusd on a dead worker's behalf",
        ("domain",),
    ),
    "remus_witness_lease_lost_total": (
        "Times the lease under this host's copy was lost (another holder seen) or ran out",
        ("domain",),
    ),
    "remus_witness_taken_over_total": (
        "Times this host's copy was destroyed because another host took the guest over "
        "(its mark on the witness)",
        ("domain",),
    ),
    "remus_switchovers_total": (
        "Planned switchovers that handed this host's guest to its peer (which then "
        "protects it back here)",
        ("domain",),
    ),
    "remus_role_changes_total": (
        "Times this host's role in a protection changed: the secondary that took the "
        "guest over became the primary (protect back, switchover), or the old primary "
        "became the secondary",
        ("domain",),
    ),
}
# counted from the events that say so, whoever acted (worker, guard, remusd)
EVENT_COUNTERS: Final = {
    "fenced": "remus_witness_fenced_total",
    "lease-lost": "remus_witness_lease_lost_total",
    "taken-over": "remus_witness_taken_over_total",
    "switched-over": "remus_switchovers_total",
    "role-changed": "remus_role_changes_total",
}
# remus_colo_checkpoints_total's reason label, and the figure it counts
COLO_REASONS: Final[tuple[tuple[str, Callable[[ColoFigures], int | None]], ...]] = (
    ("divergence", lambda c: c.checkpoints_by_divergence),
    ("held", lambda c: c.checkpoints_by_held_output),
    ("timer", lambda c: c.checkpoints_by_timer),
)
COLO_COUNTS: Final[tuple[tuple[str, Callable[[ColoFigures], int | None]], ...]] = (
    ("remus_colo_compared_packets_total", lambda c: c.compared_packets),
    ("remus_colo_mismatches_total", lambda c: c.mismatches),
    ("remus_colo_mirrored_packets_total", lambda c: c.mirrored_packets),
)

Labels = tuple[str, ...]
Key = tuple[str, Labels]  # (metric, label values)


@dataclass(frozen=True)
class Seen:
    """One protection as a scrape sees it."""

    name: str
    peer: str
    role: str
    recorded_state: str  # the registry's, for remus_replication_state
    state: str  # as the API shows it: the worker's while one runs, else the record's
    status: ProtectionStatus | None  # its worker's; None before the first
    lease: Mapping[str, Any] | None  # Supervisor.lease_view(); None without a witness


def _utf8(text: str) -> str:
    # A str from os.fsdecode() can hold lone surrogates, which cannot be
    # encoded: one odd name must not make every scrape fail.
    return text.encode("utf-8", "replace").decode("utf-8")


def _gauge(
    name: str, help_text: str, labels: Labels, rows: Iterable[tuple[Labels, float | None]]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text, labels=labels)
    for values, value in rows:
        if value is not None:  # not measured: no series rather than a made-up 0
            family.add_metric([_utf8(v) for v in values], value)
    return family


class Metrics(Collector):
    """remusd's metrics: ``scrape()`` says what there is to see; :meth:`render` is the page."""

    def __init__(self, scrape: Callable[[], Iterable[Seen]]) -> None:
        self.scrape = scrape
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._totals: dict[Key, float] = {}
        self._pauses: dict[Labels, tuple[list[int], float]] = {}  # per-bucket counts, sum
        # per worker (name, pid): its figures as last folded in, so only what is new is added
        self._last: dict[tuple[str, int], dict[Key, Any]] = {}
        self.registry.register(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def count_event(self, kind: str, name: str) -> None:
        metric = EVENT_COUNTERS.get(kind)
        if metric is not None:
            with self._lock:
                key = (metric, (name,))
                self._totals[key] = self._totals.get(key, 0) + 1

    def forget(self, name: str) -> None:
        """Drop a protection's series (every label set starts with its domain)."""
        with self._lock:
            self._totals = {k: v for k, v in self._totals.items() if k[1][0] != name}
            self._pauses = {k: v for k, v in self._pauses.items() if k[0] != name}
            self._last = {k: v for k, v in self._last.items() if k[0] != name}

    # -- folding in what the workers counted -------------------------------------------

    def _follow(self, last: dict[Key, Any], metric: str, labels: Labels, value: int | None) -> None:
        if value is None:  # -n: nothing compared or mirrored, so no series either
            return
        key = (metric, labels)
        self._totals[key] = self._totals.get(key, 0) + max(0, value - int(last.get(key, 0)))
        last[key] = value

    def _follow_pauses(self, last: dict[Key, Any], labels: Labels, hist: PauseHistogram) -> None:
        # a worker with other bounds than ours would merge into the wrong buckets
        if tuple(hist.le) != PAUSE_BUCKETS or len(hist.counts) != len(PAUSE_BUCKETS) + 1:
            return
        old, old_sum = last.get(("pauses", labels), ([0] * len(hist.counts), 0.0))
        delta = [max(0, n - o) for n, o in zip(hist.counts, old, strict=True)]
        if any(delta):
            counts, total = self._pauses.get(labels, ([0] * len(delta), 0.0))
            self._pauses[labels] = (
                [a + d for a, d in zip(counts, delta, strict=True)],
                total + max(0.0, hist.sum - old_sum),
            )
        last[("pauses", labels)] = (list(hist.counts), hist.sum)

    def _fold(self, seen: list[Seen]) -> None:
        rows = [(p, p.status) for p in seen if p.status is not None]
        # only the running workers' last figures are kept: a restarted worker's or a
        # deleted protection's would otherwise stay for as long as remusd runs
        live = {(p.name, st.pid) for p, st in rows}
        self._last = {k: v for k, v in self._last.items() if k in live}
        for p, st in rows:
            last = self._last.setdefault((p.name, st.pid), {})
            peer = (p.name, p.peer)
            if st.role is Role.PRIMARY:
                self._follow(last, "remus_checkpoints_total", peer, st.checkpoints)
                self._follow_pauses(last, peer, st.pause_histogram)
                if st.mode is Mode.COLO and st.colo is not None:
                    for reason, get in COLO_REASONS:
                        self._follow(last, "remus_colo_checkpoints_total", (*peer, reason),
                                     get(st.colo))  # fmt: skip
                    for metric, get in COLO_COUNTS:
                        self._follow(last, metric, peer, get(st.colo))
            if st.state is State.FAILED_OVER:  # once per worker
                self._follow(last, "remus_failovers_total", (p.name,), 1)

    # -- the page ----------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        try:
            seen = list(self.scrape())
        except Exception:  # the counters are still worth serving
            log.exception("metrics: reading the protections failed")
            seen = []
        with self._lock:
            self._fold(seen)
            totals = sorted(self._totals.items())
            pauses = sorted(self._pauses.items())

        def counter(name: str) -> CounterMetricFamily:
            family = CounterMetricFamily(name, COUNTERS[name][0], labels=COUNTERS[name][1])
            for (metric, values), value in totals:
                if metric == name:
                    family.add_metric([_utf8(v) for v in values], value)
            return family

        yield counter("remus_checkpoints_total")
        hist = HistogramMetricFamily(
            "remus_checkpoint_pause_seconds", "Time the guest was suspended per checkpoint",
            labels=PEER,
        )  # fmt: skip
        bounds = [*map(str, PAUSE_BUCKETS), "+Inf"]  # as prometheus_client writes le
        for values, (counts, total) in pauses:
            cumulative = zip(bounds, itertools.accumulate(counts), strict=True)
            hist.add_metric([_utf8(v) for v in values], list(cumulative), total)
        yield hist
        yield counter("remus_failovers_total")
        for metric, help_text, mode, get in STATUS_GAUGES:
            yield _gauge(metric, help_text, PEER, (
                ((p.name, p.peer), get(p.status))
                for p in seen if p.status is not None and mode in (None, p.status.mode)
            ))  # fmt: skip
        yield _gauge(
            "remus_replication_state", "1 for the protection's current state",
            (*PEER, "role", "state"),
            (((p.name, p.peer, p.role, p.recorded_state), 1) for p in seen),
        )  # fmt: skip
        for metric in ("remus_colo_checkpoints_total", *(m for m, _ in COLO_COUNTS)):
            yield counter(metric)
        link = InfoMetricFamily(
            "remus_replication_link",
            "1 for each protection whose worker runs; the mode label is its link's: tls "
            "(mutual, pinned peers), plain (--insecure-link), stdio (-s), ssh, none (-b)",
            labels=PEER,
        )
        for p in seen:
            if p.status is not None and p.status.link:
                link.add_metric([_utf8(p.name), _utf8(p.peer)], {"mode": p.status.link})
        yield link
        yield from self._witness(seen)
        yield from (counter(metric) for metric in EVENT_COUNTERS.values())

    def _witness(self, seen: list[Seen]) -> Iterator[Metric]:
        """The lease (issue 22): who holds it here, for how long, and what it cost."""
        leases = [(p, (p.name, p.peer, p.role), p.lease) for p in seen if p.lease is not None]
        yield _gauge(
            "remus_witness_lease_held",
            "1 while this host holds the protection's lease on its witness (held, or "
            "uncertain: a renewal failed and the lease is still valid), by its worker or by "
            "remusd settling a dead worker's guest; else 0. No series without a witness",
            LEASE, ((labels, float(v["lease"] in LEASE_VALID)) for _, labels, v in leases),
        )  # fmt: skip
        yield _gauge(
            "remus_witness_lease_valid_seconds",
            "How long the lease held here stays valid, counted from its last renewal sent "
            "(+Inf: a file witness's lock, held until its holder dies); no series when it "
            "is not held",
            LEASE, ((labels, v["lease_valid_for_s"]) for _, labels, v in leases),
        )  # fmt: skip
        yield _gauge(
            "remus_witness_lease_state",
            "1 for the lease's state as this host sees it: held, uncertain (a renewal "
            "failed, still valid), expired, lost (another holder seen), not_held, or none "
            "(nobody here holds or seeks it: no worker runs)",
            (*LEASE, "state"), (((*labels, v["lease"] or "none"), 1) for _, labels, v in leases),
        )  # fmt: skip
        info = InfoMetricFamily(
            "remus_witness",
            "1 for each protection under a witness; the witness label is its URL (a "
            "password taken out)",
            labels=("domain", "role"),
        )
        for p, _, v in leases:
            info.add_metric([_utf8(p.name), _utf8(p.role)], {"witness": _utf8(str(v["url"]))})
        yield info
        yield _gauge(
            "remus_unprotected",
            "1 while a primary's guest runs here with nothing replicating it (its secondary "
            "was lost and it runs on holding the lease, or remusd resumed it under the lease "
            "after its worker died), else 0",
            PEER, (((p.name, p.peer), float(p.state == State.UNPROTECTED))
                   for p in seen if p.role == Role.PRIMARY),
        )  # fmt: skip
