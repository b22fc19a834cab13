"""Exam summaries: when a case ends, one AC and GA for the exam combined from its sweeps.

An exam is the sweeps of one case. It ends when a sweep of another case starts (the source's `case`
metadata), when the operator says so (`{"command": "exam_end"}` on the control socket), or at the end of
the stream; its `exam_summary` event follows the last of its sweeps' `sweep_ended` (a sweep held for
refinement may end after the next case has begun).

The rule (:func:`combine`): the exam's AC is the confidence-weighted median of its sweeps' final ACs (each
sweep's own AC is already the median over its top-k frames, and its confidence says how well they agree);
sweeps with no valid measurement take no part, and when every confidence is 0 the sweeps count equally.
The uncertainty is `spread_mm`, the confidence-weighted mean absolute deviation of the sweeps' ACs from
the exam's (0 for a single sweep). Sweeps disagree (flag `sweeps_disagree`) when any taking part lies
more than EXAM_DISAGREEMENT (10 %) from the exam's AC: the bound, twice the usual inter-observer
variability of a manual AC, within which the combined AC of sweeps with optimal picks agrees with the
reference.
The GA is Hadlock's (1984) from the combined AC.

:class:`ExamTracker` is pure (events in, summaries out); :class:`ExamRecorder` wraps the event sink in
postprocess's writer thread, so it sees every event in publishing order, and saves the exam's picture.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from .annotate import ANNOTATED, ga_text, side_by_side, write_png
from .biometry import hadlock_ga_weeks
from .events import make_event

log = logging.getLogger("sweepstream")
EXAM_DISAGREEMENT = 0.10  # relative distance from the exam's AC beyond which a sweep disagrees
RULE = "confidence_weighted_median"


@dataclass(frozen=True)
class SweepAC:
    """One sweep's share of an exam: its final pick and final AC."""

    sweep_id: int
    frame_id: int | None
    score: float | None
    ac_mm: float | None
    ga_weeks: float | None
    confidence: float
    status: str
    annotated_png: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"sweep_id": self.sweep_id, "frame_id": self.frame_id, "score": self.score,
                "ac_mm": self.ac_mm, "ga_weeks": self.ga_weeks, "confidence": self.confidence,
                "status": self.status, "annotated_png": self.annotated_png}


def weighted_median(values: Sequence[float], weights: Sequence[float]) -> float:
    """The value where the cumulative weight reaches half the total (the mean of the two values around an
    exact half)."""
    order = np.argsort(values)
    ranked = np.asarray(values, dtype=np.float64)[order]
    cumulative = np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    half = cumulative[-1] / 2
    index = int(np.searchsorted(cumulative, half))
    if math.isclose(cumulative[index], half) and index + 1 < len(ranked):
        return float((ranked[index] + ranked[index + 1]) / 2)
    return float(ranked[index])


@dataclass(frozen=True)
class Combined:
    ac_mm: float | None
    ga_weeks: float | None
    spread_mm: float | None
    disagreement: float | None  # largest relative distance of a sweep's AC from the exam's
    used: tuple[int, ...]  # sweep ids taking part
    flags: tuple[str, ...]


def combine(sweeps: Sequence[SweepAC]) -> Combined:
    """The exam's AC and GA from its sweeps (the rule is in the module docstring)."""
    measured = [s for s in sweeps if s.status == "ok" and s.ac_mm is not None]
    if not measured:
        return Combined(None, None, None, None, (), ("no_measurement",))
    values = [s.ac_mm for s in measured]
    weights = [max(0.0, s.confidence) for s in measured]
    if sum(weights) <= 0:
        weights = [1.0] * len(measured)
    ac = weighted_median(values, weights)
    deviations = [abs(v - ac) for v in values]
    spread = float(np.average(deviations, weights=weights))
    disagreement = max(deviations) / ac if ac > 0 else math.inf
    flags = []
    if len(measured) == 1:
        flags.append("single_sweep")
    if disagreement > EXAM_DISAGREEMENT:
        flags.append("sweeps_disagree")
    ga, ga_flag = hadlock_ga_weeks(ac)
    if ga_flag is not None:
        flags.append(ga_flag)
    return Combined(round(ac, 3), None if ga is None else round(ga, 3), round(spread, 3),
                    round(disagreement, 4), tuple(s.sweep_id for s in measured), tuple(flags))


@dataclass
class _Exam:
    number: int
    case: Any
    sweeps: dict[int, dict[str, Any]] = field(default_factory=dict)  # sweep id -> its final events' fields
    open: set[int] = field(default_factory=set)
    ended: str | None = None  # why it ended, once it has


def _sweep_ac(sweep_id: int, final: dict[str, Any]) -> SweepAC:
    best, biometry = final.get("best_frame") or {}, final.get("biometry") or {}
    calibrated = biometry.get("unit") == "mm"
    return SweepAC(sweep_id, best.get("frame_id"), best.get("raw_score"),
                   biometry.get("ac_mm") if calibrated else None, biometry.get("ga_weeks"),
                   float(biometry.get("confidence") or 0.0),
                   biometry.get("status", "not_measured") if biometry else "not_measured",
                   best.get(f"{ANNOTATED}_png"))


class ExamTracker:
    """Follows published events; returns each ended exam's summary fields once its sweeps have all ended."""

    def __init__(self) -> None:
        self._exams: list[_Exam] = []
        self._count = 0

    def observe(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind, sweep_id = event["type"], event.get("sweep_id")
        if kind == "sweep_started":
            current = self._exams[-1] if self._exams else None
            if current is None or current.ended or current.case != event.get("case"):
                if current is not None and not current.ended:
                    current.ended = "case_changed"
                self._count += 1
                current = _Exam(self._count, event.get("case"))
                self._exams.append(current)
            current.open.add(sweep_id)
            current.sweeps[sweep_id] = {}
        elif kind in ("best_frame", "biometry") and event.get("final"):
            exam = self._holding(sweep_id)
            if exam is not None:
                exam.sweeps[sweep_id][kind] = event
        elif kind == "sweep_ended":
            exam = self._holding(sweep_id)
            if exam is not None:
                exam.open.discard(sweep_id)
        return self._due()

    def end(self, reason: str) -> list[dict[str, Any]]:
        """The operator ends the exam (`operator`) or the stream ends (`end_of_stream`: every exam)."""
        for exam in self._exams:
            if exam.ended is None:
                exam.ended = reason
        if reason == "end_of_stream":
            for exam in self._exams:
                exam.open.clear()  # nothing more can come
        return self._due()

    def _holding(self, sweep_id: int | None) -> _Exam | None:
        return next((e for e in reversed(self._exams) if sweep_id in e.sweeps), None)

    def _due(self) -> list[dict[str, Any]]:
        done = [e for e in self._exams if e.ended is not None and not e.open]
        self._exams = [e for e in self._exams if e not in done]
        return [summary_fields(e.number, e.case, e.ended, [_sweep_ac(i, f) for i, f in e.sweeps.items()])
                for e in done]


def summary_fields(number: int, case: Any, reason: str, sweeps: Sequence[SweepAC]) -> dict[str, Any]:
    combined = combine(sweeps)
    return {"exam": number, "case": case, "reason": reason, "sweeps": [s.as_dict() for s in sweeps],
            "rule": RULE, "ac_mm": combined.ac_mm, "ga_weeks": combined.ga_weeks,
            "spread_mm": combined.spread_mm, "disagreement": combined.disagreement,
            "disagreement_bound": EXAM_DISAGREEMENT, "used_sweeps": list(combined.used),
            "flags": list(combined.flags)}


class _Sink(Protocol):
    bound: str
    not_recording: str | None

    def emit(self, event: dict) -> None: ...
    def close(self) -> None: ...


class ExamRecorder:
    """The event sink with exam summaries: passes every event on, then any exam summary it completed, with
    the exam's picture (its sweeps' annotated best frames side by side) saved in the run's best/ folder."""

    def __init__(self, sink: _Sink, run_id: str, out: Path, best_dir: Path | None) -> None:
        self.sink, self.run_id, self.out, self.best_dir = sink, run_id, out, best_dir
        self.tracker = ExamTracker()
        self.bound = sink.bound

    def emit(self, event: dict) -> None:
        self.sink.emit(event)
        self._publish(self.tracker.observe(event))

    @property
    def not_recording(self) -> str | None:
        return self.sink.not_recording

    def replay(self, journal: Iterable[dict[str, Any]]) -> None:
        """A restarted postprocess: the exams its last life left open are taken back from the journal, and
        a summary that life completed but did not get to publish is published now."""
        pending: dict[int, dict[str, Any]] = {}
        for event in journal:
            if event.get("type") == "exam_summary":
                pending.pop(event.get("exam"), None)
            elif event.get("type") in ("sweep_started", "best_frame", "biometry", "sweep_ended"):
                pending.update((s["exam"], s) for s in self.tracker.observe(event))
        self._publish(list(pending.values()))

    def end_exam(self) -> None:
        """The operator's `exam_end`: the exam's summary follows its open sweeps' ends."""
        self._publish(self.tracker.end("operator"))

    def finish(self) -> None:
        """End of stream, after the last sweep's events."""
        self._publish(self.tracker.end("end_of_stream"))

    def _publish(self, summaries: list[dict[str, Any]]) -> None:
        for fields in summaries:
            fields["annotated_png"] = self._picture(fields)
            self.sink.emit(make_event("exam_summary", self.run_id, **fields))

    def _picture(self, fields: dict[str, Any]) -> str | None:
        pictures = [s["annotated_png"] for s in fields["sweeps"] if s["annotated_png"]]
        cards = [card for card in (cv2.imread(str(self.out / p)) for p in pictures) if card is not None]
        if self.best_dir is None or not cards:
            return None
        ac = ("AC -" if fields["ac_mm"] is None
              else f"AC {fields['ac_mm']:.1f} mm +- {fields['spread_mm']:.1f}")
        flags = f"  [{', '.join(fields['flags'])}]" if fields["flags"] else ""
        header = [f"exam {fields['exam']}: {ac}  {ga_text(fields['ga_weeks'])}{flags}",
                  f"{RULE.replace('_', ' ')} of {len(fields['used_sweeps'])} of {len(fields['sweeps'])} "
                  f"sweeps; case {fields['case']}"]
        path = self.best_dir / f"exam-{fields['exam']:04d}-{ANNOTATED}.png"
        self.best_dir.mkdir(exist_ok=True)
        try:
            write_png(path, side_by_side(cards, header))
        except OSError as exc:
            log.warning("postprocess: could not write %s: %s", path, exc)
            return None
        return f"{self.best_dir.name}/{path.name}"

    def close(self) -> None:
        self.sink.close()
