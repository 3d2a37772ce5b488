"""Prometheus text exposition 0.0.4: exact output, escaping, and a strict parser round trip."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.service.metrics import (
    CONTENT_TYPE,
    DEFAULT_BUCKETS,
    MetricsRegistry,
    format_value,
)

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


# -- exact output ---------------------------------------------------------------------------


def test_exact_text() -> None:
    reg = MetricsRegistry()
    c = reg.counter("remus_checkpoints_total", "Checkpoints committed.", ["protection"])
    g = reg.gauge("remusd_protections", "Protections owned by this remusd.")
    c.labels(protection="vm2").inc()
    c.labels(protection="vm1").inc(3)
    c.labels(protection="vm2").inc(0.5)
    g.set(2)
    assert reg.render() == (
        b"# HELP remus_checkpoints_total Checkpoints committed.\n"
        b"# TYPE remus_checkpoints_total counter\n"
        b'remus_checkpoints_total{protection="vm1"} 3\n'
        b'remus_checkpoints_total{protection="vm2"} 1.5\n'
        b"# HELP remusd_protections Protections owned by this remusd.\n"
        b"# TYPE remusd_protections gauge\n"
        b"remusd_protections 2\n"
    )
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_empty_registry_and_unlabelled_zero() -> None:
    reg = MetricsRegistry()
    assert reg.render() == b""
    reg.counter("restarts_total", "")  # no HELP line when there is no help
    reg.gauge("labelled", "L.", ["protection"])  # no child yet: no sample
    assert reg.render() == (
        b"# TYPE restarts_total counter\n"
        b"restarts_total 0\n"
        b"# HELP labelled L.\n"
        b"# TYPE labelled gauge\n"
    )


def test_histogram_exact_and_cumulative() -> None:
    reg = MetricsRegistry()
    h = reg.histogram("pause_seconds", "Pause.", ["protection"], buckets=[0.01, 0.1, 1])
    for v in (0.005, 0.01, 0.05, 0.5, 0.7, 30):
        h.labels(protection="vm1").observe(v)
    assert reg.render() == (
        b"# HELP pause_seconds Pause.\n"
        b"# TYPE pause_seconds histogram\n"
        b'pause_seconds_bucket{protection="vm1",le="0.01"} 2\n'  # le is inclusive
        b'pause_seconds_bucket{protection="vm1",le="0.1"} 3\n'
        b'pause_seconds_bucket{protection="vm1",le="1"} 5\n'
        b'pause_seconds_bucket{protection="vm1",le="+Inf"} 6\n'
        b'pause_seconds_sum{protection="vm1"} 31.265\n'
        b'pause_seconds_count{protection="vm1"} 6\n'
    )
    assert parse(reg.render())["pause_seconds"].type == "histogram"


def test_default_buckets() -> None:
    assert DEFAULT_BUCKETS[0] == 0.0005 and DEFAULT_BUCKETS[-1] == 5
    reg = MetricsRegistry()
    reg.histogram("h", "H.").observe(0.0005)
    fam = parse(reg.render())["h"]
    series = histogram_series(fam)[()]
    buckets = series["buckets"]
    assert [b for b, _ in buckets] == [*DEFAULT_BUCKETS, math.inf]  # type: ignore[attr-defined]
    assert all(c == 1 for _, c in buckets)  # type: ignore[attr-defined]
    assert b'h_bucket{le="0.0005"} 1\n' in reg.render()


def test_escaping() -> None:
    reg = MetricsRegistry()
    g = reg.gauge("g", 'Back\\slash, "quotes" and a\nnewline.', ["a", "b"])
    g.labels(a='say "hi"\n', b="C:\\dir").set(1)
    assert reg.render() == (
        b'# HELP g Back\\\\slash, "quotes" and a\\nnewline.\n'
        b"# TYPE g gauge\n"
        b'g{a="say \\"hi\\"\\n",b="C:\\\\dir"} 1\n'
    )
    fam = parse(reg.render())["g"]
    assert fam.help == 'Back\\slash, "quotes" and a\nnewline.'
    assert fam.samples == [("g", {"a": 'say "hi"\n', "b": "C:\\dir"}, 1.0)]


def test_unencodable_label_value_does_not_break_the_scrape() -> None:
    reg = MetricsRegistry()
    reg.gauge("g", "G.", ["protection"]).labels(protection="vm\udcff").set(1)
    assert parse(reg.render())["g"].samples == [("g", {"protection": "vm?"}, 1.0)]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (0.0, "0"),
        (-0.0, "0"),
        (1.0, "1"),
        (-3.0, "-3"),
        (42, "42"),
        (2**70, str(2**70)),
        (True, "1"),
        (2.5, "2.5"),
        (0.1, "0.1"),
        (0.0005, "0.0005"),
        (1e-05, "1e-05"),
        (123456789012345.0, "123456789012345"),
        (1e16, "1e+16"),
        (1.5e300, "1.5e+300"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_format_value(value: float, text: str) -> None:
    assert format_value(value) == text


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_format_value_reads_back(value: float) -> None:
    back = parse_value(format_value(value))
    assert back == value or (math.isnan(back) and math.isnan(value))


# -- the round trip ------------------------------------------------------------------------

label_values = st.text(max_size=12)  # every code point, \n " \\ \r \u2028 included


@settings(max_examples=200, deadline=None)
@given(
    help_text=st.text(max_size=20),
    series=st.dictionaries(
        st.tuples(label_values, label_values), st.floats() | st.integers(), max_size=5
    ),
    observations=st.dictionaries(
        label_values,
        st.lists(st.floats(min_value=-1e6, max_value=1e6), max_size=8),
        max_size=3,
    ),
)
def test_round_trip_through_a_strict_parser(
    help_text: str,
    series: dict[tuple[str, str], float],
    observations: dict[str, list[float]],
) -> None:
    reg = MetricsRegistry()
    g = reg.gauge("remus_value", help_text, ["protection", "peer"])
    for (protection, peer), value in series.items():
        g.labels(protection=protection, peer=peer).set(value)
    h = reg.histogram("remus_pause_seconds", help_text, ["protection"], buckets=[0, 0.5, 10])
    for protection, values in observations.items():
        child = h.labels(protection=protection)
        for v in values:
            child.observe(v)
    reg.callback_gauge(
        "remus_age", help_text, lambda: {k: v for k, v in series.items()}, ["protection", "peer"]
    )

    families = parse(reg.render())
    assert list(families) == ["remus_value", "remus_pause_seconds", "remus_age"]
    for name in ("remus_value", "remus_age"):
        fam = families[name]
        assert fam.type == "gauge"
        assert fam.help == (help_text or None)
        got = {(lab["protection"], lab["peer"]): v for _, lab, v in fam.samples}
        assert len(got) == len(fam.samples) == len(series)
        for key, value in series.items():
            # Prometheus reads every value as a float64, so an int beyond 2**53 rounds
            assert got[key] == float(value) or (math.isnan(got[key]) and math.isnan(value))

    hist = histogram_series(families["remus_pause_seconds"])
    assert set(hist) == {(("protection", p),) for p in observations}
    for protection, values in observations.items():
        s = hist[(("protection", protection),)]
        assert s["count"] == len(values)
        assert s["sum"] == pytest.approx(math.fsum(values), abs=1e-6)
        for bound, count in s["buckets"]:  # type: ignore[attr-defined]
            assert count == sum(1 for v in values if v <= bound)


def test_parser_is_strict() -> None:
    for bad in (
        b"x 1",  # no final newline
        b"x 1\n",  # no TYPE
        b'# TYPE x gauge\nx{a="\\t"} 1\n',  # unknown escape
        b'# TYPE x gauge\nx{a="1"b="2"} 1\n',
        b"# TYPE x gauge\nx 1e\n",
        b"# TYPE x gauge\nx 1\nx 2\n",
        b"# TYPE x gauge\ny 1\n",
    ):
        with pytest.raises(ParseError):
            parse(bad)


# -- names, labels, values --------------------------------------------------------------------


def test_duplicate_names_refused() -> None:
    reg = MetricsRegistry()
    reg.counter("a_total", "A.")
    with pytest.raises(ValueError, match="already registered"):
        reg.gauge("a_total", "Again.")
    reg.histogram("pause", "P.")
    for clash in ("pause", "pause_bucket", "pause_sum", "pause_count"):
        with pytest.raises(ValueError, match="already registered"):
            reg.counter(clash, "C.")
    reg.gauge("lag_count", "L.")
    with pytest.raises(ValueError, match="lag_count"):
        reg.histogram("lag", "L.")  # its _count would shadow the gauge
    reg.unregister("pause")
    reg.gauge("pause_sum", "free again")
    reg.histogram("lag2", "after a refused one, the registry is unchanged")
    assert list(parse(reg.render())) == ["a_total", "lag_count", "pause_sum", "lag2"]


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a b", "é", "a{b}", "a\n"])
def test_invalid_metric_names_refused(name: str) -> None:
    reg = MetricsRegistry()
    with pytest.raises(ValueError, match="invalid metric name"):
        reg.counter(name, "N.")
    assert reg.render() == b""


def test_valid_metric_names() -> None:
    reg = MetricsRegistry()
    for name in ("a", "_x", ":recording:rule", "remus_x9_total"):
        reg.gauge(name, "V.")
    assert len(parse(reg.render())) == 4


def test_invalid_label_names_refused() -> None:
    reg = MetricsRegistry()
    for labels in (["a-b"], ["1a"], ["__name"], ["a", "a"], [""]):
        with pytest.raises(ValueError, match="label name"):
            reg.gauge("g", "G.", labels)
    with pytest.raises(ValueError, match="reserved"):
        reg.histogram("h", "H.", ["le"])
    with pytest.raises(TypeError):
        reg.gauge("g", "G.", "protection")
    reg.gauge("g", "G.", ["le"])  # only a histogram owns le


def test_wrong_label_sets_and_values_refused() -> None:
    reg = MetricsRegistry()
    c = reg.counter("c_total", "C.", ["protection", "reason"])
    with pytest.raises(ValueError, match="expected labels"):
        c.labels(protection="vm1")
    with pytest.raises(ValueError, match="expected labels"):
        c.labels(protection="vm1", reason="x", extra="y")
    with pytest.raises(ValueError, match="expected labels"):
        c.inc()  # the shorthand is for unlabelled counters
    with pytest.raises(ValueError, match="only goes up"):
        c.labels(protection="vm1", reason="x").inc(-1)
    with pytest.raises(ValueError, match="only goes up"):
        c.labels(protection="vm1", reason="x").inc(math.nan)
    with pytest.raises(ValueError, match="NaN"):
        reg.histogram("h", "H.").observe(math.nan)
    with pytest.raises(ValueError, match="increasing"):
        reg.histogram("h2", "H.", buckets=[1, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        reg.histogram("h3", "H.", buckets=[math.nan])
    assert c.labels(protection="vm1", reason=7) is c.labels(reason="7", protection="vm1")


def test_gauge_inc_dec_and_get() -> None:
    reg = MetricsRegistry()
    g = reg.gauge("g", "G.")
    g.inc(5)
    g.dec(2)
    assert g.labels().get() == 3
    g.set(-1.5)
    assert b"g -1.5\n" in reg.render()


def test_remove_and_remove_matching() -> None:
    reg = MetricsRegistry()
    c = reg.counter("lag_total", "L.", ["protection", "reason"])
    h = reg.histogram("pause", "P.", ["protection"], buckets=[1])
    g = reg.gauge("hosts", "H.", ["peer"])
    for vm in ("vm1", "vm2"):
        c.labels(protection=vm, reason="slow").inc()
        c.labels(protection=vm, reason="lost").inc()
        h.labels(protection=vm).observe(0.5)
    g.labels(peer="hostB").set(1)

    assert c.remove(protection="vm1", reason="slow") is True
    assert c.remove(protection="vm1", reason="slow") is False
    with pytest.raises(ValueError):
        c.remove(protection="vm1")  # remove wants the full label set
    assert reg.remove_matching(protection="vm1") == 2  # one counter child, one histogram
    fams = parse(reg.render())
    assert {lab["protection"] for _, lab, _ in fams["lag_total"].samples} == {"vm2"}
    assert set(histogram_series(fams["pause"])) == {(("protection", "vm2"),)}
    assert len(fams["hosts"].samples) == 1  # no protection label: untouched
    h.labels(protection="vm1").observe(0.1)  # a new child starts from zero
    assert b'pause_count{protection="vm1"} 1\n' in reg.render()


def test_callback_gauge_is_evaluated_at_render_time() -> None:
    reg = MetricsRegistry()
    now = [100.0]
    reg.callback_gauge(
        "remus_last_checkpoint_age_seconds",
        "Age of the last consistent checkpoint.",
        lambda: {("vm1",): now[0] - 90, ("vm0",): 0.25},
        ["protection"],
    )
    first = reg.render()
    now[0] = 130.0
    second = reg.render()
    assert b'remus_last_checkpoint_age_seconds{protection="vm0"} 0.25\n' in first
    assert b'remus_last_checkpoint_age_seconds{protection="vm1"} 10\n' in first
    assert b'remus_last_checkpoint_age_seconds{protection="vm1"} 40\n' in second
    assert reg.remove_matching(protection="vm1") == 0  # the callback decides


def test_failing_callback_does_not_hide_other_metrics(caplog: pytest.LogCaptureFixture) -> None:
    reg = MetricsRegistry()

    def broken() -> dict[tuple[str, ...], float]:
        raise RuntimeError("status file vanished")

    reg.callback_gauge("broken", "B.", broken)
    reg.callback_gauge("odd", "O.", lambda: {("vm1",): 1, ("a", "b"): 2}, ["protection"])
    reg.gauge("fine", "F.").set(1)
    fams = parse(reg.render())
    assert fams["broken"].samples == []
    assert fams["odd"].samples == [("odd", {"protection": "vm1"}, 1.0)]
    assert fams["fine"].samples == [("fine", {}, 1.0)]
    assert "status file vanished" in caplog.text
