"""What a run tells about itself: the live status line, the `health` events' figures and `summary.json`.
Kept apart from the supervisor's life cycle; it only reads the stages' reports (counters and latency rows)
and the graph, so each figure is derived one way."""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .graph import Graph, frame_accounting, sum_counters
from .metrics import LatencyBook, LatencyHistogram


@dataclass(frozen=True)
class Interval:
    """Throughput and end-to-end latency since a reader's last look: what a status line or a health
    event reports, each reader keeping its own pace."""

    seconds: float
    fps_in: float
    fps_out: float
    e2e: LatencyHistogram
    accounting: dict[str, Any]  # frame_accounting() of the stages' counters at this look

    @property
    def drops(self) -> dict[str, int]:
        return {name: boundary["dropped"] for name, boundary in self.accounting["boundaries"].items()}


class Telemetry:
    """The stages' reports, gathered: counters per process, latency rows, and the readers' marks."""

    def __init__(self, graph: Graph, skip: int) -> None:
        self.graph = graph
        self.book = LatencyBook(skip=skip, windows=("status", "health"))
        self.refined = LatencyBook(skip=0, windows=())  # frames scored late by lookback refinement
        self.counters: dict[str, dict[str, int]] = {}  # process (instance) -> its last reported counters
        self._earlier: dict[str, Counter[str]] = {}  # instance -> counters of its earlier (restarted) lives
        self.restarts: list[dict[str, Any]] = []  # one entry per restart, in order
        self.status: dict[str, dict[str, Any]] = {}  # process -> what else it last said (remote workers)
        self._marks: dict[str, tuple[float, int, int]] = {}  # reader -> (time, frames read, scored)
        self._status_open = False

    def report(self, instance: str, counters: dict[str, int], arrays: tuple[np.ndarray, ...],
               status: dict[str, Any] | None = None) -> None:
        """A stage's counters, and (postprocess) its latency rows: newest-path frames, then refined ones;
        `status`: what its counters cannot say (preprocess: its remote workers). A restarted stage counts
        from zero again; what its earlier lives counted is added."""
        earlier = self._earlier.get(instance)
        self.counters[instance] = counters if earlier is None else dict(earlier + Counter(counters))
        self.status[instance] = status or {}
        for book, rows in zip((self.book, self.refined), arrays, strict=False):
            book.add_rows(rows)

    def restarted(self, stage: str, instance: str, reason: str, at_s: float) -> dict[str, Any]:
        """A stage process is being replaced: keep what it counted, and note the restart."""
        self._earlier[instance] = Counter(self.counters.get(instance, {}))
        note = {"stage": stage, "instance": instance, "reason": reason, "at_s": round(at_s, 3),
                "restart": sum(r["instance"] == instance for r in self.restarts) + 1}
        self.restarts.append(note)
        return note

    def restart_counts(self) -> dict[str, int]:
        return dict(Counter(r["stage"] for r in self.restarts))
    def source(self) -> dict[str, Any]:
        """The source's link: `reconnecting` while a live stream or device is lost, reconnects so far,
        frames its newest-frame reader replaced, frames held back until the imaging sector was found."""
        counts = sum_counters(self.counters, self.graph).get("capture", {})
        reconnects = counts.get("reconnects", 0)
        return {"state": "reconnecting" if reconnects > counts.get("reconnected", 0) else "ok",
                "reconnects": reconnects, "overwritten": counts.get("source_overwritten", 0),
                "roi_withheld": counts.get("roi_withheld", 0)}

    def engine(self) -> dict[str, Any]:
        """The engines' link to a remote server (kserve): `unreachable` while one of them has lost its
        server, and its reconnect attempts so far (local engines: always ok, 0)."""
        counts = sum_counters(self.counters, self.graph)
        infer = [counts.get(spec.name, {}) for spec in self.graph.stages if spec.role == "infer"]
        return {"state": "unreachable" if any(c.get("engine_unreachable", 0) for c in infer) else "ok",
                "reconnects": sum(c.get("engine_reconnects", 0) for c in infer)}

    def accounting(self) -> dict[str, Any]:
        """Frame accounting from the stages' counters; with restarts, the frames that were inside a stage
        when it died are `lost_in_restarts` (counted nowhere else)."""
        accounting = frame_accounting(sum_counters(self.counters, self.graph), self.graph)
        if self.restarts:
            accounting["lost_in_restarts"] = max(
                0, accounting["read"] - accounting["scored"] - accounting["dropped"])
        return accounting

    def interval(self, reader: str, now: float, since: float) -> Interval:
        accounting = self.accounting()
        read, scored = accounting["read"], accounting["scored"]
        then, read_then, scored_then = self._marks.get(reader, (since, 0, 0))
        self._marks[reader] = (now, read, scored)
        span = max(now - then, 1e-9)
        return Interval(span, (read - read_then) / span, (scored - scored_then) / span,
                        self.book.take_window(reader), accounting)

    # -- the console -------------------------------------------------------------------------------------
    def print_status(self, now: float, t_start: float, t_go: float) -> None:
        interval = self.interval("status", now, t_go)
        drop_text = " ".join(f"{name} {count}" for name, count in interval.drops.items())
        line = (f"[{now - t_start:7.1f}s] in {interval.fps_in:6.1f} fps  "
                f"out {interval.fps_out:6.1f} fps  e2e p50 {interval.e2e.percentile(50):6.1f} ms  "
                f"p99 {interval.e2e.percentile(99):6.1f} ms  drops {drop_text}")
        if self.restarts:
            line += "  restarts " + " ".join(f"{k} {n}" for k, n in self.restart_counts().items())
        source = self.source()
        if source["state"] == "reconnecting":
            line += f"  source reconnecting ({source['reconnects']})"
        elif source["reconnects"]:
            line += f"  reconnects {source['reconnects']}"
        engine = self.engine()
        if engine["state"] != "ok" or engine["reconnects"]:
            line += f"  engine {engine['state']} (reconnects {engine['reconnects']})"
        if sys.stderr.isatty():
            print("\r" + line, end="", file=sys.stderr, flush=True)
            self._status_open = True
        else:
            print(line, file=sys.stderr, flush=True)

    def print_line(self, line: str) -> None:
        """An event line above the status line (which a terminal keeps rewriting in place)."""
        if self._status_open:
            print("\r\033[K", end="", file=sys.stderr)
            self._status_open = False
        print(line, file=sys.stderr, flush=True)

    def end_status(self) -> None:
        if self._status_open:
            print(file=sys.stderr)
            self._status_open = False

    # -- health events and the summary -------------------------------------------------------------------
    def health(self, now: float, t_go: float, states: dict[str, str]) -> dict[str, Any]:
        """The pipeline's vital signs since the last health event: the status line's figures, for
        subscribers without a terminal."""
        interval = self.interval("health", now, t_go)
        e2e = interval.e2e

        def ms(value: float) -> float | None:
            return round(value, 3) if e2e.count else None
        return {
            "uptime_s": round(now - t_go, 3),
            "interval_s": round(interval.seconds, 3),
            "fps_in": round(interval.fps_in, 2),
            "fps_out": round(interval.fps_out, 2),
            "e2e_ms": {"count": e2e.count, "p50": ms(e2e.percentile(50)), "p99": ms(e2e.percentile(99)),
                       "max": ms(e2e.max)},
            "frames": {k: interval.accounting[k] for k in ("read", "scored", "dropped")},
            "drops": interval.drops,
            "drop_causes": {cause: count for boundary in interval.accounting["boundaries"].values()
                            for cause, count in boundary["drops"].items() if count},
            "stages": states,
            "restarts": self.restart_counts(),
            **self.peers(),
            "source": self.source(),
            "engine": self.engine(),
        }

    def peers(self) -> dict[str, Any]:
        """Remote workers (each with its state and figures) and the peers refused a connection."""
        out: dict[str, Any] = {"refused_peers": sum(int(c.get("refused", 0)) for c in self.counters.values())}
        for status in self.status.values():
            out.update(status)
        return out

    def summary(self, *, run_id: str, outcome: str, error: str | None, signal: str | None, active_s: float,
                stages: dict[str, dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
        accounting = self.accounting()
        return {
            "run_id": run_id,
            "outcome": outcome,
            "error": error,
            "signal": signal,
            "duration_s": round(active_s, 3),
            "throughput_fps": round(accounting["scored"] / active_s, 2) if active_s > 0 else 0.0,
            "frames": accounting,
            "latency_ms": self.book.summary(),
            "latency_ms_refined": {name: stats for name, stats in self.refined.summary().items()
                                   if name in ("end_to_end", "infer")},
            "latency_skip_frames": self.book.skip,
            "stages": stages,
            "restarts": {"count": len(self.restarts), "by_stage": self.restart_counts(),
                         "events": self.restarts},
            **self.peers(),
            "graph": self.graph.describe(),
            "config": config,
        }


def write_summary(summary: dict[str, Any], out: Path) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def format_summary(summary: dict, out: Path) -> str:
    frames = summary["frames"]
    lines = [f"run {summary['run_id']} {summary['outcome']}: {frames['read']} frames read, "
             f"{frames['scored']} scored, {frames['dropped']} dropped, "
             f"{summary['throughput_fps']} fps over {summary['duration_s']} s"]
    lines.append(f"  {'latency ms':<20}" + "".join(f"{k:>9}" for k in ("p50", "p90", "p95", "p99", "max")))
    for name, stats in summary["latency_ms"].items():
        if stats.get("count"):
            values = "".join(f"{stats[k]:>9.2f}" for k in ("p50", "p90", "p95", "p99", "max"))
            lines.append(f"  {name:<20}{values}")
    for name, boundary in frames["boundaries"].items():
        lines.append(f"  {name:<20} sent {boundary['sent']}, dropped {boundary['dropped']}")
    lines.append(f"  written to {out}/summary.json and {out}/events.jsonl")
    return "\n".join(lines)
