"""remusd's metrics on prometheus_client: what a scrape yields from its protections, the
counters across worker restarts, a registry of its own, and a strict parser round trip."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import prometheus_client
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.protection.spec import Mode
from orchestrator.protection.status import (
    PAUSE_BUCKETS,
    ColoFigures,
    PauseHistogram,
    ProtectionStatus,
    Role,
    State,
)
from orchestrator.service.metrics import CONTENT_TYPE, COUNTERS, STATUS_GAUGES, Metrics, Seen

# -- a small, strict parser of the text format ---------------------------------------------
#
# Strict on purpose: it accepts only what the 0.0.4 format allows and what a
# Prometheus server would read the same way, so a round trip through it shows
# the renderer's output is unambiguous.

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


class ParseError(Exception):
    pass


@dataclass
class Family:
    type: str
    help: str | None = None
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def unescape(text: str, quotes: bool) -> str:
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            nxt = text[i + 1 : i + 2]
            if nxt == "\\":
                out.append("\\")
            elif nxt == "n":
                out.append("\n")
            elif nxt == '"' and quotes:
                out.append('"')
            else:
                raise ParseError(f"bad escape \\{nxt!r}")
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def parse_value(text: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.lower().replace("+", ""))
    if not FLOAT.fullmatch(text):
        raise ParseError(f"bad value {text!r}")
    return float(text)


def parse_labels(text: str, pos: int) -> tuple[dict[str, str], int]:
    """Labels from just after '{'; returns them and the position after '}'."""
    labels: dict[str, str] = {}
    while True:
        m = LABEL.match(text, pos)
        if not m or text[m.end() : m.end() + 2] != '="':
            raise ParseError(f"bad label at {text[pos:]!r}")
        pos = m.end() + 2
        raw = []
        while True:
            if pos >= len(text):
                raise ParseError("unterminated label value")
            ch = text[pos]
            if ch == "\\":
                raw.append(text[pos : pos + 2])
                pos += 2
            elif ch == '"':
                pos += 1
                break
            else:
                raw.append(ch)
                pos += 1
        if m.group() in labels:
            raise ParseError(f"label {m.group()} twice")
        labels[m.group()] = unescape("".join(raw), quotes=True)
        if text[pos : pos + 1] == ",":
            pos += 1
        elif text[pos : pos + 1] == "}":
            return labels, pos + 1
        else:
            raise ParseError(f"expected , or }} at {text[pos:]!r}")


def sample_family(name: str, families: dict[str, Family], current: str | None) -> str:
    if current is None:
        raise ParseError(f"sample {name} before any TYPE")
    fam = families[current]
    allowed = {current}
    if fam.type == "histogram":
        allowed = {f"{current}_bucket", f"{current}_sum", f"{current}_count"}
    if name not in allowed:
        raise ParseError(f"sample {name} outside its family (current: {current})")
    return current


def parse(body: bytes) -> dict[str, Family]:
    text = body.decode("utf-8")
    if text and not text.endswith("\n"):
        raise ParseError("no final newline")
    families: dict[str, Family] = {}
    helps: dict[str, str] = {}
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    current: str | None = None
    # the format's only line separator is \n: str.splitlines() would also split
    # on \r, \x85, \u2028... which may appear raw inside label values
    for line in text.split("\n")[:-1]:
        if line.startswith("# HELP "):
            name, sep, rest = line[7:].partition(" ")
            if not NAME.fullmatch(name) or not sep or name in helps or name in families:
                raise ParseError(f"bad HELP line {line!r}")
            helps[name] = unescape(rest, quotes=False)
        elif line.startswith("# TYPE "):
            parts = line[7:].split(" ")
            if len(parts) != 2 or not NAME.fullmatch(parts[0]) or parts[1] not in TYPES:
                raise ParseError(f"bad TYPE line {line!r}")
            if parts[0] in families:
                raise ParseError(f"second TYPE for {parts[0]}")
            current = parts[0]
            families[current] = Family(parts[1], helps.get(current))
        elif line.startswith("#") or not line:
            raise ParseError(f"unexpected line {line!r}")
        else:
            m = NAME.match(line)
            if not m:
                raise ParseError(f"bad sample {line!r}")
            name, pos = m.group(), m.end()
            labels: dict[str, str] = {}
            if line[pos : pos + 1] == "{":
                labels, pos = parse_labels(line, pos + 1)
            if line[pos : pos + 1] != " ":
                raise ParseError(f"no space before the value in {line!r}")
            value = parse_value(line[pos + 1 :])  # no timestamps: we never write one
            key = (name, tuple(sorted(labels.items())))
            if key in seen:
                raise ParseError(f"duplicate series {key}")
            seen.add(key)
            families[sample_family(name, families, current)].samples.append((name, labels, value))
    if set(helps) - set(families):
        raise ParseError("HELP without TYPE")
    return families


def histogram_series(fam: Family) -> dict[tuple[tuple[str, str], ...], dict[str, object]]:
    """Per label set: buckets [(le, count)], sum and count; checks the histogram rules."""
    out: dict[tuple[tuple[str, str], ...], dict[str, object]] = {}
    for name, labels, value in fam.samples:
        le = labels.pop("le", None)
        series = out.setdefault(tuple(sorted(labels.items())), {"buckets": []})
        if name.endswith("_bucket"):
            assert le is not None
            series["buckets"].append((parse_value(le), value))  # type: ignore[attr-defined]
        else:
            assert le is None
            series[name.rsplit("_", 1)[1]] = value
    for series in out.values():
        buckets: list[tuple[float, float]] = series["buckets"]  # type: ignore[assignment]
        bounds = [b for b, _ in buckets]
        assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds)
        assert bounds[-1] == math.inf
        counts = [c for _, c in buckets]
        assert counts == sorted(counts), "buckets are cumulative"
        assert counts[-1] == series["count"]
    return out


# -- what a scrape yields -------------------------------------------------------------------

PEER = "hostb:8002"
LEASE = {"url": "file:///w", "lease": "held", "lease_valid_for_s": math.inf, "holder": "worker"}


def primary(pid: int = 11, **kw: Any) -> ProtectionStatus:
    return ProtectionStatus("vm1", Role.PRIMARY, pid=pid, state=State.REPLICATING, peer=PEER, **kw)


def seen(st: ProtectionStatus | None, lease: dict[str, Any] | None = None, **kw: Any) -> Seen:
    role = "primary" if st is None else st.role.value
    state = "starting" if st is None else st.state.value
    args: dict[str, Any] = {"name": "vm1", "peer": PEER, "role": role,
                            "recorded_state": state, "state": state}  # fmt: skip
    return Seen(**{**args, **kw}, status=st, lease=lease)


class Rows:
    """What the daemon's scrape would return, changed by the test between scrapes."""

    def __init__(self, *rows: Seen) -> None:
        self.rows = list(rows)

    def __call__(self) -> Iterable[Seen]:
        return self.rows


def sample(page: bytes, metric: str, **labels: str) -> float | None:
    families = parse(page)
    name = metric
    for cut in ("_bucket", "_sum", "_count"):
        if metric.endswith(cut) and metric[: -len(cut)] in families:
            name = metric[: -len(cut)]
    found = [v for n, lab, v in families[name].samples if n == metric and lab == labels]
    assert len(found) <= 1
    return found[0] if found else None


def test_every_family_named_typed_and_helped_in_order() -> None:
    page = Metrics(Rows()).render()
    families = parse(page)
    gauges = [g[0] for g in STATUS_GAUGES]
    assert list(families) == [
        "remus_checkpoints_total", "remus_checkpoint_pause_seconds", "remus_failovers_total",
        *gauges, "remus_replication_state", "remus_colo_checkpoints_total",
        "remus_colo_compared_packets_total", "remus_colo_mismatches_total",
        "remus_colo_mirrored_packets_total", "remus_replication_link_info",
        "remus_witness_lease_held",
        "remus_witness_lease_valid_seconds", "remus_witness_lease_state", "remus_witness_info",
        "remus_unprotected", "remus_witness_fenced_total", "remus_witness_lease_lost_total",
        "remus_witness_taken_over_total", "remus_switchovers_total", "remus_role_changes_total",
    ]  # fmt: skip
    for name, fam in families.items():
        want = "counter" if name in COUNTERS else "gauge"
        assert fam.type == ("histogram" if name.endswith("_pause_seconds") else want), name
        assert fam.help and fam.samples == [], name  # nothing to see: no series
    # the custom collector passes no created time: no _created series for Prometheus
    # to read as one more gauge per counter
    assert b"_created" not in page
    assert CONTENT_TYPE == prometheus_client.CONTENT_TYPE_LATEST


def test_a_remus_primary_under_a_lease() -> None:
    st = primary(
        checkpoints=3, ack_lag_ms_p50=1.5, held_packets=4, dirty_pages_p50=12.0, link="tls"
    )
    st.pause_histogram.counts[2], st.pause_histogram.sum = 3, 0.0045  # per bucket
    metrics = Metrics(Rows(seen(st, LEASE)))
    page = metrics.render()
    peer = {"domain": "vm1", "peer": PEER}
    lease = {**peer, "role": "primary"}
    assert sample(page, "remus_checkpoints_total", **peer) == 3
    assert sample(page, "remus_ack_lag_seconds", **peer) == 0.0015  # ms, scaled by name
    assert sample(page, "remus_held_output_packets", **peer) == 4
    assert sample(page, "remus_dirty_pages", **peer) == 12
    assert sample(page, "remus_dirty_bytes", **peer) is None  # not measured: no series
    assert sample(page, "remus_colo_held_packets", **peer) is None  # COLO's only
    assert sample(page, "remus_replication_state", **lease, state="replicating") == 1
    assert sample(page, "remus_witness_lease_held", **lease) == 1
    assert sample(page, "remus_witness_lease_valid_seconds", **lease) == math.inf
    assert sample(page, "remus_witness_lease_state", **lease, state="held") == 1
    info = {"domain": "vm1", "role": "primary", "witness": "file:///w"}
    assert sample(page, "remus_witness_info", **info) == 1
    assert sample(page, "remus_unprotected", **peer) == 0
    assert sample(page, "remus_replication_link_info", **peer, mode="tls") == 1
    hist = histogram_series(parse(page)["remus_checkpoint_pause_seconds"])
    (series,) = hist.values()
    assert series["buckets"] == [(b, 0 if b < 0.002 else 3) for b in (*PAUSE_BUCKETS, math.inf)]
    assert (series["count"], series["sum"]) == (3, 0.0045)
    # exactly as prometheus_client writes them: labels sorted by name, le among them
    assert (
        b'remus_checkpoint_pause_seconds_bucket{domain="vm1",le="1.0",peer="hostb:8002"} 3.0\n'
        in page
    )
    assert b'remus_witness_info{domain="vm1",role="primary",witness="file:///w"} 1.0\n' in page


def test_counters_go_on_across_worker_restarts_and_the_histogram_merges() -> None:
    st = primary(pid=11, checkpoints=5)
    st.pause_histogram = PauseHistogram(counts=[1, 2] + [0] * (len(PAUSE_BUCKETS) - 1), sum=0.002)
    rows = Rows(seen(st))
    metrics = Metrics(rows)
    metrics.render()
    st.checkpoints = 7
    st.pause_histogram.counts[0], st.pause_histogram.sum = 2, 0.0025
    page = metrics.render()
    peer = {"domain": "vm1", "peer": PEER}
    assert sample(page, "remus_checkpoints_total", **peer) == 7
    assert sample(page, "remus_checkpoint_pause_seconds_count", **peer) == 4
    # the worker restarted (a new pid): it counts from zero, remusd counts on
    again = primary(pid=12, checkpoints=2)
    again.pause_histogram.counts[5], again.pause_histogram.sum = 1, 0.02
    rows.rows = [seen(again)]
    page = metrics.render()
    assert sample(page, "remus_checkpoints_total", **peer) == 9
    assert sample(page, "remus_checkpoint_pause_seconds_count", **peer) == 5
    assert sample(page, "remus_checkpoint_pause_seconds_sum", **peer) == pytest.approx(0.0225)
    assert sample(page, "remus_checkpoint_pause_seconds_bucket", **peer, le="0.02") == 5
    # a worker whose bounds are not ours is not merged into the wrong buckets
    other = primary(pid=13, checkpoints=2)
    other.pause_histogram = PauseHistogram(le=(1.0,), counts=[9, 9], sum=9.0)
    rows.rows = [seen(other)]
    page = metrics.render()
    assert sample(page, "remus_checkpoint_pause_seconds_count", **peer) == 5
    assert sample(page, "remus_checkpoints_total", **peer) == 11


def test_colo_counters_by_reason_and_a_failover_counted_once() -> None:
    colo = ColoFigures(checkpoints_by_divergence=1, checkpoints_by_timer=2, compared_packets=5)
    st = primary(mode=Mode.COLO, colo=colo, checkpoints=3)
    rows = Rows(seen(st))
    metrics = Metrics(rows)
    metrics.render()
    colo.checkpoints_by_timer = 4
    page = metrics.render()
    peer = {"domain": "vm1", "peer": PEER}
    assert sample(page, "remus_colo_checkpoints_total", **peer, reason="timer") == 4
    assert sample(page, "remus_colo_checkpoints_total", **peer, reason="divergence") == 1
    assert sample(page, "remus_colo_checkpoints_total", **peer, reason="held") is None
    assert sample(page, "remus_colo_compared_packets_total", **peer) == 5
    assert sample(page, "remus_colo_mirrored_packets_total", **peer) is None  # -n
    sec = ProtectionStatus("vm2", Role.SECONDARY, pid=20, state=State.FAILED_OVER, peer="a")
    rows.rows = [seen(sec, name="vm2", peer="a")]
    for _ in range(3):
        page = metrics.render()
    assert sample(page, "remus_failovers_total", domain="vm2") == 1


def test_events_are_counted_and_a_forgotten_protection_takes_its_series() -> None:
    rows = Rows(seen(primary(checkpoints=3), LEASE))
    metrics = Metrics(rows)
    metrics.count_event("fenced", "vm1")
    metrics.count_event("fenced", "vm1")
    metrics.count_event("taken-over", "vm1")
    metrics.count_event("started", "vm1")  # not one the metrics count
    page = metrics.render()
    assert sample(page, "remus_witness_fenced_total", domain="vm1") == 2
    assert sample(page, "remus_witness_taken_over_total", domain="vm1") == 1
    assert sample(page, "remus_witness_lease_lost_total", domain="vm1") is None
    rows.rows = []
    metrics.forget("vm1")
    assert all(not f.samples for f in parse(metrics.render()).values())


def test_each_metrics_has_a_registry_of_its_own() -> None:
    one, two = Metrics(Rows(seen(primary(checkpoints=3)))), Metrics(Rows())
    one.count_event("fenced", "vm1")
    assert b"vm1" in one.render() and b"vm1" not in two.render()
    names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not any(n.startswith("remus_") for n in names)  # the process-wide one is untouched


def test_a_failing_scrape_still_serves_the_counters(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> list[Seen]:
        raise RuntimeError("registry locked")

    metrics = Metrics(broken)
    metrics.count_event("lease-lost", "vm1")
    page = metrics.render()
    assert sample(page, "remus_witness_lease_lost_total", domain="vm1") == 1
    assert "registry locked" in caplog.text


def test_unencodable_label_value_does_not_break_the_scrape() -> None:
    page = Metrics(Rows(seen(primary(checkpoints=1), name="vm\udcff"))).render()
    assert sample(page, "remus_checkpoints_total", domain="vm?", peer=PEER) == 1


label_values = st.text(max_size=12)  # every code point, \n " \\ \r \u2028 included


@settings(max_examples=100, deadline=None)
@given(name=label_values, peer=label_values, url=label_values, lag=st.floats(0, 1e6))
def test_round_trip_through_a_strict_parser(name: str, peer: str, url: str, lag: float) -> None:
    st_ = ProtectionStatus(name, Role.PRIMARY, peer=peer, checkpoints=2, ack_lag_ms_p50=lag)
    lease = {**LEASE, "url": url}
    row = Seen(name, peer, "primary", "replicating", "unprotected", st_, lease)
    fams = parse(Metrics(Rows(row)).render())
    clean = [v.encode("utf-8", "replace").decode() for v in (name, peer, url)]
    assert fams["remus_ack_lag_seconds"].samples == [
        ("remus_ack_lag_seconds", {"domain": clean[0], "peer": clean[1]}, lag / 1e3)
    ]
    assert fams["remus_unprotected"].samples[0][2] == 1
    (info,) = fams["remus_witness_info"].samples
    assert info[1] == {"domain": clean[0], "role": "primary", "witness": clean[2]}
