"""What the page shows, kept from the events (pure logic): a viewer that connects late is sent this state,
then every change. Messages are slim JSON objects for the browser, not the events themselves."""

from __future__ import annotations

from collections import deque
from typing import Any

MAX_CURVE_POINTS = 4000  # a sweep of over two minutes at 30 fps
MAX_CARDS = 24  # finished sweeps kept on the page (four cases)
MAX_EXAMS = 8

_BIOMETRY_FIELDS = ("status", "ac_mm", "ac_px", "unit", "ga_weeks", "confidence", "flags", "method")
_EXAM_FIELDS = ("exam", "case", "reason", "sweeps", "used_sweeps", "rule", "ac_mm", "ga_weeks", "spread_mm",
                "disagreement", "disagreement_bound", "flags", "annotated_png")
_HEALTH_FIELDS = ("uptime_s", "fps_in", "fps_out", "e2e_ms", "frames", "drops", "stages", "restarts",
                  "source", "engine")


class ViewerState:
    """The current sweep and its score curve, the running best, the finished sweeps' cards, the exam
    summaries and the last health figures."""

    def __init__(self) -> None:
        self.sweep: dict[str, Any] | None = None
        self.curve: deque[tuple[int, float]] = deque(maxlen=MAX_CURVE_POINTS)
        self.best: dict[str, Any] | None = None
        self.cards: deque[dict[str, Any]] = deque(maxlen=MAX_CARDS)
        self.exams: deque[dict[str, Any]] = deque(maxlen=MAX_EXAMS)
        self.health: dict[str, Any] | None = None
        self._biometry: dict[int, dict[str, Any]] = {}  # sweep id -> its final biometry, until its card

    def snapshot(self) -> dict[str, Any]:
        return {"type": "state", "sweep": self.sweep, "curve": [list(p) for p in self.curve],
                "best": self.best, "cards": list(self.cards), "exams": list(self.exams),
                "health": self.health}

    def apply(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """Take one event; return the change to send to the pages (None: nothing they show changed)."""
        kind, sweep_id = event["type"], event.get("sweep_id")
        if kind == "frame":
            if self.sweep is None or sweep_id != self.sweep["sweep_id"]:
                return None
            point = (event["frame_id"], event["score"])
            self.curve.append(point)
            return {"type": "score", "sweep_id": sweep_id, "frame_id": point[0], "score": point[1]}
        if kind == "sweep_started":
            self.sweep = {"sweep_id": sweep_id, "state": "open", "reason": event.get("reason"),
                          "case": event.get("case"), "first_frame_id": event.get("frame_id")}
            self.curve.clear()
            self.best = None
            return {"type": "sweep", "sweep": self.sweep}
        if kind == "sweep_ended":
            if self.sweep is not None and self.sweep["sweep_id"] == sweep_id:
                self.sweep = {**self.sweep, "state": "ended", "reason": event.get("reason"),
                              "frame_count": event.get("frame_count")}
                return {"type": "sweep", "sweep": self.sweep}
            return None
        if kind == "best_frame":
            return self._best_frame(event)
        if kind == "biometry" and event.get("final"):
            self._biometry[sweep_id] = {k: event.get(k) for k in _BIOMETRY_FIELDS}
            card = next((c for c in self.cards if c["sweep_id"] == sweep_id), None)
            if card is None:
                return None
            card["biometry"] = self._biometry.pop(sweep_id)
            return {"type": "card", "card": card}
        if kind == "exam_summary":
            exam = {k: event.get(k) for k in _EXAM_FIELDS}
            self.exams.append(exam)
            return {"type": "exam", "exam": exam}
        if kind == "health":
            # A restart's own health event carries only `restart`: merged into the last figures.
            self.health = {**(self.health or {}), **{k: event[k] for k in _HEALTH_FIELDS if k in event}}
            return {"type": "health", "health": self.health}
        return None

    def _best_frame(self, event: dict[str, Any]) -> dict[str, Any] | None:
        sweep_id = event.get("sweep_id")
        if not event.get("final"):
            if self.sweep is None or sweep_id != self.sweep["sweep_id"]:
                return None
            self.best = {"sweep_id": sweep_id, "frame_id": event.get("frame_id"),
                         "score": event.get("raw_score")}
            return {"type": "best", "best": self.best}
        card = {"sweep_id": sweep_id, "frame_id": event.get("frame_id"), "score": event.get("raw_score"),
                "reason": event.get("reason"), "annotated_png": event.get("annotated_png"),
                "biometry": self._biometry.pop(sweep_id, None)}
        self.cards.append(card)
        return {"type": "card", "card": card}
