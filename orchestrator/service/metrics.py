"""Prometheus metrics for remusd, rendered in the text exposition format 0.0.4.

Written here rather than taken from ``prometheus_client`` because remusd needs
a few dozen series, one renderer and no process-global registry: each
:class:`MetricsRegistry` is independent, so tests and a restarted service
never see another instance's series.

    reg = MetricsRegistry()
    pauses = reg.histogram("remus_checkpoint_pause_seconds", "Guest pause per checkpoint.",
                           ["protection"])
    pauses.labels(protection="vm1").observe(0.012)
    reg.callback_gauge("remus_last_checkpoint_age_seconds", "Age of the last consistent "
                       "checkpoint.", lambda: {("vm1",): time.time() - last}, ["protection"])
    body = reg.render()   # serve with Content-Type: CONTENT_TYPE

Series of a protection that went away must be dropped explicitly
(``family.remove(protection=...)`` or ``reg.remove_matching(protection=...)``);
otherwise they are exported, frozen, for the life of the process.

Values are updated under a per-family lock, so a scrape served from another
thread sees each histogram whole (its ``_count`` equals its ``+Inf`` bucket).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Final, Generic, TypeVar

log = logging.getLogger(__name__)

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

# Checkpoint pauses: a small guest with few dirty pages pauses for well under a
# millisecond, a large dirty set or a slow link for seconds; past 5 s the
# checkpoint is a failure to look at, not a latency to resolve.
DEFAULT_BUCKETS: Final[tuple[float, ...]] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

_METRIC_NAME: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

LabelKey = tuple[str, ...]


def format_value(value: float) -> str:
    """A sample value as Prometheus parses it (Go's ``strconv.ParseFloat``)."""
    if isinstance(value, int):  # exact, however large: no float round trip
        return str(int(value))  # int(): a bool would print as "True"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    # repr is the shortest string that reads back as the same float; it only
    # adds a ".0" to whole numbers below 1e16, which we drop (and "-0" with it)
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    # HELP has no quotes to close, so a double quote is left as it is
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _utf8(text: str) -> str:
    # A str from os.fsdecode() can hold lone surrogates, which cannot be
    # encoded: one odd domain name must not make every scrape fail.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def _check_metric_name(name: str) -> None:
    if not isinstance(name, str) or not _METRIC_NAME.fullmatch(name):
        raise ValueError(f"invalid metric name {name!r}")


def _check_label_names(labelnames: Sequence[str], reserved: tuple[str, ...] = ()) -> LabelKey:
    if isinstance(labelnames, str):  # "protection" would become 10 one-letter labels
        raise TypeError("labelnames must be a sequence of names, not a string")
    names = tuple(labelnames)
    for label in names:
        if not isinstance(label, str) or not _LABEL_NAME.fullmatch(label):
            raise ValueError(f"invalid label name {label!r}")
        if label.startswith("__"):
            raise ValueError(f"label name {label!r}: names starting with __ are reserved")
        if label in reserved:
            raise ValueError(f"label name {label!r} is reserved for this metric type")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate label names in {names}")
    return names


def _labels_text(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{escape_label_value(v)}"' for k, v in pairs) + "}"


# -- children: one series (or one histogram) per combination of label values ----------


class CounterChild:
    __slots__ = ("_lock", "_value")

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._value: float = 0

    def inc(self, n: float = 1) -> None:
        if not n >= 0:  # also refuses NaN, which would poison the counter for good
            raise ValueError(f"a counter only goes up: inc({n!r})")
        with self._lock:
            self._value += n

    def get(self) -> float:
        return self._value


class GaugeChild:
    __slots__ = ("_lock", "_value")

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._value: float = 0

    def set(self, value: float) -> None:
        with self._lock:
            self._value = value

    def inc(self, n: float = 1) -> None:
        with self._lock:
            self._value += n

    def dec(self, n: float = 1) -> None:
        with self._lock:
            self._value -= n

    def get(self) -> float:
        return self._value


class HistogramChild:
    __slots__ = ("_bounds", "_count", "_counts", "_lock", "_sum")

    def __init__(self, lock: threading.Lock, bounds: tuple[float, ...]) -> None:
        self._lock = lock
        self._bounds = bounds  # ends with +Inf, so every observation has a bucket
        self._counts = [0] * len(bounds)  # per bucket, not cumulative: O(1) observe
        self._sum: float = 0
        self._count = 0

    def observe(self, value: float) -> None:
        if math.isnan(value):  # a NaN would make _sum NaN forever
            raise ValueError("cannot observe NaN")
        # le is inclusive: the first bound >= value
        i = bisect.bisect_left(self._bounds, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value
            self._count += 1

    def merge(self, counts: Sequence[int], total: float) -> None:
        """Add observations someone else bucketed with the same bounds (per bucket,
        not cumulative): how remusd folds in what a worker process measured."""
        if len(counts) != len(self._bounds) or any(n < 0 for n in counts):
            raise ValueError(f"merge needs {len(self._bounds)} non-negative bucket counts")
        with self._lock:
            for i, n in enumerate(counts):
                self._counts[i] += n
            self._sum += total
            self._count += sum(counts)

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """(cumulative (upper bound, count) per bucket, sum, count), taken atomically."""
        with self._lock:
            counts, total, count = list(self._counts), self._sum, self._count
        cumulative, running = [], 0
        for bound, n in zip(self._bounds, counts, strict=True):
            running += n
            cumulative.append((bound, running))
        return cumulative, total, count


# -- families ----------------------------------------------------------------------------


class _Family:
    type_name: str = ""

    def __init__(self, name: str, help: str, labelnames: LabelKey) -> None:
        self.name = name
        self.help = _utf8(help)
        self.labelnames = labelnames
        self._lock = threading.Lock()

    def sample_names(self) -> tuple[str, ...]:
        """Every name this family's samples use: no other family may use them."""
        return (self.name,)

    def _samples(self) -> Iterator[tuple[str, Sequence[tuple[str, str]], float]]:
        raise NotImplementedError

    def _has_labels(self, labels: Mapping[str, object]) -> bool:
        return all(k in self.labelnames for k in labels)

    def remove_matching(self, **labels: object) -> int:
        return 0

    def render_into(self, out: list[str]) -> None:
        if self.help:
            out.append(f"# HELP {self.name} {escape_help(self.help)}\n")
        out.append(f"# TYPE {self.name} {self.type_name}\n")
        for name, pairs, value in self._samples():
            out.append(f"{name}{_labels_text(pairs)} {format_value(value)}\n")


C = TypeVar("C", CounterChild, GaugeChild, HistogramChild)


class _LabelledFamily(_Family, Generic[C]):
    def __init__(self, name: str, help: str, labelnames: LabelKey) -> None:
        super().__init__(name, help, labelnames)
        self._children: dict[LabelKey, C] = {}
        if not labelnames:
            # an unlabelled series exists from the start, so a scrape shows 0
            # rather than nothing before the first event
            self._children[()] = self._new_child()

    def _new_child(self) -> C:
        raise NotImplementedError

    def _key(self, values: Mapping[str, object]) -> LabelKey:
        if values.keys() != set(self.labelnames):
            raise ValueError(
                f"{self.name}: expected labels {sorted(self.labelnames)}, got {sorted(values)}"
            )
        return tuple(_utf8(str(values[k])) for k in self.labelnames)

    def labels(self, **values: object) -> C:
        """The child for these label values (created on first use); values go through str()."""
        key = self._key(values)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new_child()
            return child

    def remove(self, **values: object) -> bool:
        """Drop the child with exactly these label values; False if there was none."""
        key = self._key(values)
        with self._lock:
            return self._children.pop(key, None) is not None

    def remove_matching(self, **labels: object) -> int:
        """Drop every child whose labels include these; 0 if a label is not this family's."""
        if not labels or not self._has_labels(labels):
            return 0
        want = [(self.labelnames.index(k), _utf8(str(v))) for k, v in labels.items()]
        with self._lock:
            doomed = [key for key in self._children if all(key[i] == v for i, v in want)]
            for key in doomed:
                del self._children[key]
        return len(doomed)

    def clear(self) -> None:
        with self._lock:
            self._children.clear()

    def _sorted_children(self) -> list[tuple[LabelKey, C]]:
        with self._lock:
            items = list(self._children.items())
        items.sort(key=lambda kv: kv[0])  # stable output: diffable, testable
        return items

    def _pairs(self, key: LabelKey) -> list[tuple[str, str]]:
        return list(zip(self.labelnames, key, strict=True))


class Counter(_LabelledFamily[CounterChild]):
    type_name = "counter"

    def _new_child(self) -> CounterChild:
        return CounterChild(self._lock)

    def inc(self, n: float = 1) -> None:
        """Shorthand for an unlabelled counter's ``labels().inc(n)``."""
        self.labels().inc(n)

    def _samples(self) -> Iterator[tuple[str, Sequence[tuple[str, str]], float]]:
        for key, child in self._sorted_children():
            yield self.name, self._pairs(key), child.get()


class Gauge(_LabelledFamily[GaugeChild]):
    type_name = "gauge"

    def _new_child(self) -> GaugeChild:
        return GaugeChild(self._lock)

    def set(self, value: float) -> None:
        self.labels().set(value)

    def inc(self, n: float = 1) -> None:
        self.labels().inc(n)

    def dec(self, n: float = 1) -> None:
        self.labels().dec(n)

    def _samples(self) -> Iterator[tuple[str, Sequence[tuple[str, str]], float]]:
        for key, child in self._sorted_children():
            yield self.name, self._pairs(key), child.get()


class Histogram(_LabelledFamily[HistogramChild]):
    type_name = "histogram"

    def __init__(
        self, name: str, help: str, labelnames: LabelKey, buckets: Sequence[float]
    ) -> None:
        bounds = [float(b) for b in buckets]
        if any(math.isnan(b) for b in bounds):
            raise ValueError(f"{name}: a bucket bound cannot be NaN")
        if any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"{name}: bucket bounds must be strictly increasing: {bounds}")
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        # before super().__init__, which creates an unlabelled histogram's child
        self.bounds: tuple[float, ...] = tuple(bounds)
        super().__init__(name, help, labelnames)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self._lock, self.bounds)

    def observe(self, value: float) -> None:
        self.labels().observe(value)

    def sample_names(self) -> tuple[str, ...]:
        return (self.name, f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")

    def _samples(self) -> Iterator[tuple[str, Sequence[tuple[str, str]], float]]:
        for key, child in self._sorted_children():
            pairs = self._pairs(key)
            cumulative, total, count = child.snapshot()
            for bound, n in cumulative:
                yield f"{self.name}_bucket", [*pairs, ("le", format_value(bound))], n
            yield f"{self.name}_sum", pairs, total
            yield f"{self.name}_count", pairs, count


GaugeCallback = Callable[[], Mapping[LabelKey, float]]


class CallbackGauge(_Family):
    """A gauge whose series are whatever ``fn()`` returns at render time.

    For values that change with time rather than with events, such as the age
    of the last consistent checkpoint: storing them would export a stale age.
    ``fn`` returns ``{label values in labelnames order: value}``; ``{(): v}``
    when there are no labels.
    """

    type_name = "gauge"

    def __init__(self, name: str, help: str, labelnames: LabelKey, fn: GaugeCallback) -> None:
        super().__init__(name, help, labelnames)
        self.fn = fn

    def _samples(self) -> Iterator[tuple[str, Sequence[tuple[str, str]], float]]:
        try:
            values = dict(self.fn())
        except Exception:
            # one broken callback must not take every other metric down with it
            log.exception("metric %s: callback failed", self.name)
            return
        rows: list[tuple[LabelKey, float]] = []
        for key, value in values.items():
            if not isinstance(key, tuple) or len(key) != len(self.labelnames):
                log.error(
                    "metric %s: callback gave labels %r for %s", self.name, key, self.labelnames
                )
                continue
            rows.append((tuple(_utf8(str(v)) for v in key), value))
        rows.sort(key=lambda kv: kv[0])
        for key, value in rows:
            yield self.name, list(zip(self.labelnames, key, strict=True)), value


class MetricsRegistry:
    """A set of metric families with unique names, rendered together."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}
        self._taken: dict[str, str] = {}  # sample name -> family that uses it
        self._lock = threading.Lock()

    def _register(self, family: _Family) -> None:
        with self._lock:
            for sample in family.sample_names():
                if sample in self._taken:
                    owner = self._taken[sample]
                    clash = "" if owner == sample else f" (used by {owner!r})"
                    raise ValueError(f"metric name {sample!r} is already registered{clash}")
            for sample in family.sample_names():
                self._taken[sample] = family.name
            self._families[family.name] = family

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        _check_metric_name(name)
        family = Counter(name, help, _check_label_names(labelnames))
        self._register(family)
        return family

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        _check_metric_name(name)
        family = Gauge(name, help, _check_label_names(labelnames))
        self._register(family)
        return family

    def histogram(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        _check_metric_name(name)
        family = Histogram(name, help, _check_label_names(labelnames, ("le",)), buckets)
        self._register(family)
        return family

    def callback_gauge(
        self, name: str, help: str, fn: GaugeCallback, labelnames: Sequence[str] = ()
    ) -> CallbackGauge:
        _check_metric_name(name)
        family = CallbackGauge(name, help, _check_label_names(labelnames), fn)
        self._register(family)
        return family

    def unregister(self, name: str) -> None:
        """Forget a family; KeyError if there is none of that name."""
        with self._lock:
            family = self._families.pop(name)
            for sample in family.sample_names():
                del self._taken[sample]

    def remove_matching(self, **labels: object) -> int:
        """Drop, in every family that has all these labels, the children that match them.

        ``remove_matching(protection="vm1")`` when a protection goes away.
        Callback gauges are left alone: their callback decides what exists.
        """
        with self._lock:
            families = list(self._families.values())
        return sum(f.remove_matching(**labels) for f in families)

    def render(self) -> bytes:
        with self._lock:
            families = list(self._families.values())
        out: list[str] = []
        for family in families:
            family.render_into(out)
        return "".join(out).encode("utf-8")
