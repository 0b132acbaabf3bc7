"""Prometheus metrics in the text exposition format, written by hand.

Three kinds are enough for the gateway (counter, gauge, histogram); a
dependency for them would cost more than these lines. Label values that come
from clients (model names) are only recorded once the model is known, so a
scanner cannot grow the series without bound.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

LabelKey = tuple[str, ...]
INF = 'le="+Inf"'


def escape_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: LabelKey, extra: str = "") -> str:
    parts = [f'{n}="{escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help, labels
        self.values: dict[LabelKey, float] = {}

    def inc(self, *labels: str, by: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + by

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for k, v in sorted(self.values.items()):
            out.append(f"{self.name}{_labels(self.label_names, k)} {_num(v)}")
        return out


class Gauge:
    """A gauge read from a function at scrape time (in-flight, worker count)."""

    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.name, self.help, self.read = name, help, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {_num(self.read())}"]


class Histogram:
    def __init__(
        self, name: str, help: str, labels: tuple[str, ...] = (), buckets: tuple[float, ...] = LATENCY_BUCKETS
    ) -> None:
        self.name, self.help, self.label_names, self.buckets = name, help, labels, buckets
        self.series: dict[LabelKey, list[float]] = {}  # per-bucket counts, then +Inf count, then sum

    def observe(self, value: float, *labels: str) -> None:
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = [0.0] * (len(self.buckets) + 2)
        s[bisect.bisect_left(self.buckets, value)] += 1
        s[-1] += value

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for k, s in sorted(self.series.items()):
            cum = 0.0
            for bound, n in zip(self.buckets, s, strict=False):
                cum += n
                le = 'le="' + repr(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, k, le)} {_num(cum)}")
            cum += s[len(self.buckets)]
            out.append(f"{self.name}_bucket{_labels(self.label_names, k, INF)} {_num(cum)}")
            out.append(f"{self.name}_sum{_labels(self.label_names, k)} {repr(s[-1])}")
            out.append(f"{self.name}_count{_labels(self.label_names, k)} {_num(cum)}")
        return out


class Registry:
    def __init__(self) -> None:
        self.metrics: list[Counter | Gauge | Histogram] = []

    def add(self, metric: Counter | Gauge | Histogram) -> Counter | Gauge | Histogram:
        self.metrics.append(metric)
        return metric

    def render(self) -> bytes:
        lines: list[str] = []
        for m in self.metrics:
            lines.extend(m.render())
        return ("\n".join(lines) + "\n").encode()
