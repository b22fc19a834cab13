"""Prometheus metrics of a run (`/metrics` on the viewer's server), from the same figures as summary.json.

The supervisor takes a :func:`snapshot` of its telemetry (frame accounting per boundary, each process's
counters, the run's latency histograms) on its own thread; :class:`RunCollector` renders the latest one at
scrape time on the server's thread, so a scrape never reads a structure the supervisor is changing, and the
counters at the end of a run are exactly those of summary.json (restarts per stage too). Reconnects are
the stage counters of that name, or a health event's `reconnects`, when a run has them; the sweeps, best
frames and exams come from the events the viewer follows.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .metrics import LatencyHistogram
from .telemetry import Telemetry

# Upper bounds of the latency buckets, in seconds (Prometheus's unit): 1 ms to 30 s.
BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
PREFIX = "sweepstream"


@dataclass(frozen=True)
class Histogram:
    """A latency histogram in Prometheus's form: cumulative counts at BUCKETS_S, then +Inf; sum in s."""

    cumulative: tuple[int, ...]
    count: int
    sum_s: float


def prometheus_buckets(hist: LatencyHistogram) -> Histogram:
    """Fold the 1 %-wide log buckets into BUCKETS_S (a bucket counts below a bound when its upper edge is)."""
    edges_ms = hist.MIN_MS * hist.GROWTH ** np.arange(1, hist.counts.size + 1)
    cumulative = np.cumsum(hist.counts)
    below = [int(cumulative[i - 1]) if i else 0
             for i in np.searchsorted(edges_ms, np.asarray(BUCKETS_S) * 1e3, side="right")]
    return Histogram(tuple(below), int(hist.count), hist.total / 1e3)


@dataclass(frozen=True)
class Snapshot:
    accounting: dict[str, Any]
    counters: dict[str, dict[str, int]]  # process -> counters
    latency: dict[str, Histogram]  # segment -> histogram (the run's: what summary.json's latency_ms says)
    restarts: dict[str, int]  # stage -> its restarts so far (every stage of the graph)


def snapshot(telemetry: Telemetry) -> Snapshot:
    """Copies of what the metrics need, taken on the supervisor's thread."""
    restarts = telemetry.restart_counts()
    return Snapshot(telemetry.accounting(), copy.deepcopy(telemetry.counters),
                    {name: prometheus_buckets(hist) for name, hist in telemetry.book.run.items()},
                    {spec.name: restarts.get(spec.name, 0) for spec in telemetry.graph.stages})


@dataclass
class EventCounts:
    """What the viewer saw on the events socket."""

    sweeps: int = 0
    best_frames: int = 0  # final best frames with a frame
    exams: int = 0
    health: dict[str, Any] = field(default_factory=dict)  # the last health event

    def observe(self, event: Mapping[str, Any]) -> None:
        kind = event["type"]
        if kind == "sweep_started":
            self.sweeps += 1
        elif kind == "best_frame" and event.get("final") and event.get("frame_id") is not None:
            self.best_frames += 1
        elif kind == "exam_summary":
            self.exams += 1
        elif kind == "health":  # a restart's own health event carries only `restart`: merged, not kept
            self.health.update(event)


def _total(value: Any) -> float:
    """A health figure that is a number or a per-stage mapping of numbers, summed."""
    if isinstance(value, Mapping):
        return float(sum(_total(v) for v in value.values()))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


class RunCollector(Collector):
    """Renders the latest snapshot and event counts at every scrape."""

    def __init__(self) -> None:
        self.latest: Snapshot | None = None
        self.events = EventCounts()

    def collect(self) -> Iterator[Metric]:
        shot = self.latest
        if shot is not None:
            yield from self._frames(shot)
            yield from self._latency(shot)
            yield from self._stage_counters(shot)
            restarts = CounterMetricFamily(f"{PREFIX}_restarts", "stage process restarts (summary.json "
                                           "restarts.by_stage)", labels=["stage"])
            for stage, count in shot.restarts.items():
                restarts.add_metric([stage], count)
            yield restarts
        health = self.events.health
        for name, counter, what in (("reconnects", "reconnects", "source"),
                                    ("engine_reconnects", "engine_reconnects", "engine")):
            counted = sum(c.get(counter, 0) for c in (shot.counters.values() if shot else ()))
            yield CounterMetricFamily(f"{PREFIX}_{name}", f"{what} reconnects (0 until one reports any)",
                                      value=counted or _total(health.get(what, {}).get("reconnects")))
        for name, value, what in (("sweeps", self.events.sweeps, "sweeps started"),
                                  ("best_frames", self.events.best_frames, "final best frames picked"),
                                  ("exams", self.events.exams, "exam summaries")):
            yield CounterMetricFamily(f"{PREFIX}_{name}", what, value=value)
        for name in ("fps_in", "fps_out"):
            if name in self.events.health:
                yield GaugeMetricFamily(f"{PREFIX}_{name}", f"{name} over the last health interval",
                                        value=self.events.health[name])

    @staticmethod
    def _frames(shot: Snapshot) -> Iterator[Metric]:
        accounting = shot.accounting
        for name in ("read", "scored", "dropped"):
            yield CounterMetricFamily(f"{PREFIX}_frames_{name}",
                                      f"frames {name} (summary.json frames.{name})", value=accounting[name])
        sent = CounterMetricFamily(f"{PREFIX}_boundary_sent_frames", "frames sent across a boundary",
                                   labels=["boundary"])
        dropped = CounterMetricFamily(f"{PREFIX}_boundary_dropped_frames", "frames dropped at a boundary",
                                      labels=["boundary"])
        for boundary, counts in accounting["boundaries"].items():
            sent.add_metric([boundary], counts["sent"])
            dropped.add_metric([boundary], counts["dropped"])
        yield sent
        yield dropped

    @staticmethod
    def _latency(shot: Snapshot) -> Iterator[Metric]:
        family = HistogramMetricFamily(f"{PREFIX}_latency_seconds", "per-frame latency of each stage, hop "
                                       "and end to end (first and last run.summary_skip frames skipped)",
                                       labels=["segment"])
        for segment, hist in shot.latency.items():
            buckets = [(str(bound), count) for bound, count in zip(BUCKETS_S, hist.cumulative, strict=True)]
            family.add_metric([segment], [*buckets, ("+Inf", hist.count)], sum_value=hist.sum_s)
        yield family

    @staticmethod
    def _stage_counters(shot: Snapshot) -> Iterator[Metric]:
        family = CounterMetricFamily(f"{PREFIX}_stage_events", "each stage process's own counters",
                                     labels=["process", "counter"])
        for process, counters in shot.counters.items():
            for name, value in counters.items():
                family.add_metric([process, name], value)
        yield family
