"""Sweep analysis: sweep tracking, best frame and biometry over a stream of scored frames.

The postprocess stage hands every scored frame to :class:`SweepAnalyzer` with its model-resolution mask, the
letterbox geometry and a copy of the full-resolution frame; the analyzer answers with findings (event payloads
and the full-resolution images worth saving). It does no I/O, so it is tested with plain arrays. Measuring a
best frame (mask to full resolution, ellipse fits over the top-k, field of view) costs tens of ms, so a
best_frame finding carries it as a deferred step (`later`, see `resolve`) that the stage runs off the frame
path.

What it keeps: per open sweep, the model-resolution masks of the frames the best-frame selector still ranks
(the best, the top-k and the smoothing window, a few 224 x 224 bytes each), and full-resolution copies of
the frames that are or may still become the best (the best and the window), taken while their ring slots
still hold them. The field of view for
sector-edge handling is the convex hull of the pixels non-zero in any frame of the scanning session
(`acouslic.convex_fov_mask`), accumulated frame by frame and reset when the case or frame size changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import cv2
import numpy as np

from .acouslic import convex_fov_mask
from .biometry import Measurement, measure, robust_ac
from .letterbox import Geometry, to_frame
from .recovery import Recovered
from .refine import SweepScores, plan
from .sweep import BestFrameEvent, FrameInfo, SweepConfig, SweepEvent, SweepTracker


@dataclass(frozen=True)
class AnalyzedFrame:
    """A scored frame as the analyzer needs it."""

    info: FrameInfo
    t_capture_ns: int
    mask: np.ndarray | None  # model-resolution 0/1 abdomen mask, None when the bundle has no mask output
    geometry: Geometry  # how the model input maps back to the frame
    frame_shape: tuple[int, ...]  # full-resolution frame shape
    spacing_mm: tuple[float, float] | None  # (row, column) mm per pixel, None when uncalibrated


@dataclass
class Finding:
    """One event to publish: its type, ids, payload, and full-resolution images to save with it."""

    type: str
    sweep_id: int
    frame_id: int | None
    t_capture_ns: int | None
    fields: dict[str, Any]
    images: dict[str, np.ndarray] = field(default_factory=dict)
    # Set on a best_frame whose measuring is deferred: returns it completed, with its biometry finding.
    later: Callable[[], list[Finding]] | None = None
    # On a final best_frame held for refinement: when its sweep was seen to end (monotonic ns).
    ended_ns: int | None = None


@dataclass
class _Kept:
    frame: AnalyzedFrame
    image: np.ndarray | None = None  # full-resolution copy, kept for the best frame and the window only


def _gray_copy(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image.copy()


class SweepAnalyzer:
    """Feeds a :class:`SweepTracker` and turns its events into findings with biometry attached."""

    def __init__(self, config: SweepConfig | None = None, refine: bool = False, screened: bool = False
                 ) -> None:
        self.config = config or SweepConfig()
        self.tracker = SweepTracker(self.config, hold_finals=refine, screened=screened)
        self.scores: dict[int, SweepScores] = {}  # sweep id -> its scored frames, for refinement planning
        self._closing_since: dict[int, int] = {}  # sweep id -> when it was seen waiting for its final
        self._candidates: dict[int, np.ndarray] = {}  # frame id -> full-resolution copy, while planned
        self._kept: dict[int, dict[int, _Kept]] = {}  # sweep id -> frame id -> what is kept of it
        self._fov_sum: np.ndarray | None = None
        self._fov_key: tuple[Any, tuple[int, ...]] | None = None
        self.images_missed = 0  # final best frames whose ring slot was overwritten before they were copied

    def add(self, frame: AnalyzedFrame, image: np.ndarray | None, refined: bool = False,
            screened: bool = False) -> list[Finding]:
        """One scored frame with its full-resolution image (None when the ring slot was overwritten before
        it could be read). The image may be a borrowed view of the ring: the analyzer reads it now and
        copies only the frames it keeps (the best and the window); if the slot turns out to have been
        overwritten meanwhile, the caller says so with `discard_image`. A `refined` frame was scored late,
        out of capture order (see pipeline.refine); its image may come from `hold_candidate`. A `screened`
        frame was scored by a screening cascade's screen model: it moves the sweeps and tells refinement
        where to look, but only the main model's (refined) scores pick the best frame."""
        frame_id = frame.info.frame_id
        if refined:
            candidate = self._candidates.pop(frame_id, None)
            image = candidate if image is None else image
            events = self.tracker.add_refined(frame.info)
            sweep_id = self.tracker.sweep_of(frame_id)
        else:
            if image is not None:
                self._accumulate_fov(frame, image)
            events = self.tracker.update(frame.info)
            sweep_id = self.tracker.sweep_id
        if sweep_id is not None:
            scores = self.scores.setdefault(sweep_id, SweepScores(frame_id, frame_id))
            if screened:
                scores.add_screened(frame_id, frame.info.score, frame.t_capture_ns)
            else:
                scores.add(frame_id, frame.info.score, frame.t_capture_ns)
                self._keep(frame, image, sweep_id)
        return self._findings(events, frame)

    def resume(self, recovered: Recovered) -> list[Finding]:
        """A restarted postprocess: the tracker's state from the journal, and the open sweeps' published
        scores for refinement planning (see pipeline.recovery)."""
        findings = self._findings(self.tracker.resume(recovered), None)
        for open_sweep in recovered.open:
            scores = self.scores.setdefault(open_sweep.sweep_id, SweepScores(open_sweep.first.frame_id,
                                                                              open_sweep.first.frame_id))
            for frame_id, (score, captured_ns, refined) in open_sweep.scores.items():
                if self.tracker.screened and not refined:  # the screen model's, in a cascade
                    scores.add_screened(frame_id, score, captured_ns)
                else:
                    scores.add(frame_id, score, captured_ns)
        return findings

    # -- lookback refinement ------------------------------------------------------------------------------
    def refine_plan(self, held_since_ns: int, limit: int) -> list[int]:
        """Unscored frame ids to score next (pipeline.refine.plan): sweeps waiting for their final first."""
        order = [*sorted(self.tracker.closing), *([] if self.tracker.sweep_id is None
                                                  else [self.tracker.sweep_id])]
        planned = plan([self.scores[i] for i in order if i in self.scores], held_since_ns, limit)
        for frame_id in [i for i in self._candidates if i not in planned]:
            del self._candidates[frame_id]
        return planned

    def wants_image(self, frame_id: int) -> bool:
        return frame_id not in self._candidates

    def hold_candidate(self, frame_id: int, image: np.ndarray) -> None:
        """A planned frame's full-resolution image, copied while the ring still has it: it may become the
        best frame, whose PNG needs it."""
        self._candidates[frame_id] = image.copy()

    def discard_candidate(self, frame_id: int) -> None:
        """The candidate's slot was overwritten while it was copied."""
        self._candidates.pop(frame_id, None)

    def due_finals(self, now_ns: int, held_since_ns: int, timeout_ns: int) -> list[Finding]:
        """Finals of the sweeps waiting for refinement that is complete, or that waited `timeout_ns`."""
        findings: list[Finding] = []
        for sweep_id in sorted(self.tracker.closing):
            since = self._closing_since.setdefault(sweep_id, now_ns)
            scores = self.scores.get(sweep_id)
            if scores is None or scores.complete(held_since_ns) or now_ns - since >= timeout_ns:
                findings += self._close(sweep_id)
        return findings

    def _close(self, sweep_id: int) -> list[Finding]:
        since = self._closing_since.pop(sweep_id, None)
        findings = self._findings(self.tracker.close(sweep_id), None)
        for finding in findings:
            if finding.type == "best_frame":
                finding.ended_ns = since
        self.scores.pop(sweep_id, None)
        return findings

    def discard_image(self, frame_id: int) -> None:
        """The image given with this frame was overwritten while it was read: keep no copy of it."""
        for kept in self._kept.values():
            if frame_id in kept:
                kept[frame_id].image = None

    def command(self, name: str, t: float) -> list[Finding]:
        """Operator `start`/`stop` (see SweepTracker.command)."""
        return self._findings(self.tracker.command(name, t), None)

    def flush(self, t: float) -> list[Finding]:
        """End of stream: every sweep's final best frame, biometry and end (refinement is over)."""
        findings = self._findings(self.tracker.flush(t), None)
        for sweep_id in sorted(self.tracker.closing):
            findings += self._close(sweep_id)
        return findings

    # -- keeping what selection may still need ----------------------------------------------------------
    def _keep(self, frame: AnalyzedFrame, image: np.ndarray | None, sweep_id: int) -> None:
        """Near-empty frames the tracker holds back are not kept: they rank too low to matter. Full-resolution
        copies only where the best frame is or may yet be: itself and, with smoothing, the window (so with
        single-frame windows, the default, a frame is copied only when it becomes the best)."""
        selector = self.tracker.selector_of(sweep_id)
        if selector is None:
            return
        kept = self._kept.setdefault(sweep_id, {})
        # A later window may still choose any frame of the current one, unless windows are single frames.
        wanted = selector.window_ids if self.config.smoothing_frames > 1 else set()
        wanted |= {selector.best.frame_id} if selector.best is not None else set()
        frame_id = frame.info.frame_id
        if selector.keeps(frame_id):
            copy = image.copy() if image is not None and frame_id in wanted else None
            kept[frame_id] = _Kept(frame, copy)
        for old_id in [i for i in kept if not selector.keeps(i)]:
            del kept[old_id]
        for kept_id, entry in kept.items():
            if kept_id not in wanted:
                entry.image = None

    def _accumulate_fov(self, frame: AnalyzedFrame, image: np.ndarray) -> None:
        """Per-pixel maximum over the session's frames (colour frames per channel, turned grey only when a
        best frame is measured): one pass over the frame, no copy of it."""
        key = (frame.info.source.get("case"), frame.frame_shape[:2])
        if key != self._fov_key or self._fov_sum is None or self._fov_sum.shape != image.shape:
            self._fov_key, self._fov_sum = key, image.copy()
        else:
            cv2.max(self._fov_sum, image, dst=self._fov_sum)

    # -- events -> findings -------------------------------------------------------------------------------
    def _findings(self, events: list[SweepEvent | BestFrameEvent], trigger: AnalyzedFrame | None
                  ) -> list[Finding]:
        findings: list[Finding] = []
        for event in events:
            if isinstance(event, SweepEvent):
                first = event.type == "sweep_started"
                payload = event.to_dict()
                findings.append(Finding(event.type, event.sweep_id, payload["frame_id"],
                                        trigger.t_capture_ns if first and trigger else None,
                                        _fields(payload)))
                if not first:
                    self._kept.pop(event.sweep_id, None)
            else:
                findings += self._best_frame(event)
        return findings

    def _best_frame(self, event: BestFrameEvent) -> list[Finding]:
        kept = self._kept.get(event.sweep_id, {})
        payload = event.to_dict()
        fields = _fields(payload)
        best = None if event.best is None else kept.get(event.best.frame_id)
        fields["source"] = None if best is None else best.frame.info.source
        found = Finding("best_frame", event.sweep_id, payload["frame_id"],
                        None if best is None else best.frame.t_capture_ns, fields)
        if best is None:
            return [found]
        if event.final and best.image is None:
            self.images_missed += 1
        # Snapshots, so the measuring can run on another thread while this one goes on with the stream.
        ranked = {f.frame_id: kept[f.frame_id].frame for f in event.top_k if f.frame_id in kept}
        fov_sum = None if self._fov_sum is None else _gray_copy(self._fov_sum)
        found.later = partial(_measured, event, found, best.frame, best.image if event.final else None,
                              ranked, fov_sum, self.config.top_k)
        return [found]


def resolve(findings: list[Finding]) -> list[Finding]:
    """Findings with their deferred measurements done, in order (what gets published)."""
    out: list[Finding] = []
    for finding in findings:
        out += finding.later() if finding.later is not None else [finding]
    return out


def _measured(event: BestFrameEvent, found: Finding, best: AnalyzedFrame, image: np.ndarray | None,
              ranked: dict[int, AnalyzedFrame], fov_sum: np.ndarray | None, top_k: int) -> list[Finding]:
    """The expensive part of a best_frame: masks to full resolution, biometry, the images to save."""
    found.later = None
    fov = None
    if fov_sum is not None and fov_sum.shape == tuple(best.frame_shape[:2]):
        derived = convex_fov_mask(fov_sum)
        fov = derived if derived.any() else None
    mask = _full_mask(best)
    measured = None if mask is None else measure(mask, best.spacing_mm, fov)
    if event.final:
        if image is not None:
            found.images["frame"] = image
        if mask is not None:
            found.images["mask"] = mask * np.uint8(255)
    if measured is None:
        return [found]
    return [found, _biometry(event, best, measured, ranked, fov, top_k)]


def _full_mask(frame: AnalyzedFrame) -> np.ndarray | None:
    return None if frame.mask is None else to_frame(frame.mask, frame.geometry, frame.frame_shape)


def _biometry(event: BestFrameEvent, best: AnalyzedFrame, measured: Measurement,
              ranked: dict[int, AnalyzedFrame], fov: np.ndarray | None, top_k: int) -> Finding:
    """Live: the best frame's own AC. Final: the median over the sweep's top-k frames, with their
    spread as the confidence; the best frame's ellipse is given either way."""
    fields: dict[str, Any] = {"final": event.final, "measurement": measured.as_dict()}
    if event.final and event.top_k:
        pairs = []
        for scored in event.top_k:
            frame = ranked.get(scored.frame_id)
            if frame is not None:
                m = measured if frame is best else measure(_full_mask(frame), frame.spacing_mm, fov)
                pairs.append((frame.info.frame_id, m, scored.score))
        robust = robust_ac([(m, score) for _, m, score in pairs], k=top_k)
        fields.update(method="median_top_k", frames=[pairs[i][0] for i in robust.used],
                      **_summary(robust.ac if robust.unit == "mm" else None,
                                 robust.ac if robust.unit == "px" else None, robust.ga_weeks,
                                 robust.confidence, robust.flags, robust.status),
                      spread=robust.iqr, unit=robust.unit)
    else:
        fields.update(method="single_frame", frames=[best.info.frame_id],
                      **_summary(measured.ac_mm, measured.ac_px, measured.ga_weeks,
                                 1.0 if measured.valid else 0.0, measured.flags, measured.status),
                      spread=None, unit=None if not measured.valid else "mm" if measured.ac_mm else "px")
    fields["pixel_spacing_mm"] = None if best.spacing_mm is None else list(best.spacing_mm)
    fields["uncalibrated"] = best.spacing_mm is None
    fields["ellipse"] = None if measured.fit is None else measured.fit.ellipse.as_dict()
    return Finding("biometry", event.sweep_id, best.info.frame_id, best.t_capture_ns, fields)


def _fields(payload: dict[str, Any]) -> dict[str, Any]:
    """An event's own fields: type, sweep and frame ids are common fields of every event."""
    return {k: v for k, v in payload.items() if k not in ("type", "sweep_id", "frame_id")}


def _summary(ac_mm: float | None, ac_px: float | None, ga: float | None, confidence: float,
             flags: tuple[str, ...], status: str) -> dict[str, Any]:
    return {"status": status, "ac_mm": ac_mm, "ac_px": ac_px, "ga_weeks": ga,
            "confidence": round(float(confidence), 4), "flags": list(flags)}
