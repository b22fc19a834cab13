"""Sweep tracking and best-frame selection (pure logic, no I/O): fed one frame at a time, returns events.

Sweep boundaries, in order of authority:

1. Operator: once :meth:`SweepTracker.command` has been called, sweeps are exactly ``start`` .. ``stop``;
   frames outside are ignored and neither source metadata nor the automatic rules split a sweep, because a
   person who presses buttons means them.
2. Source: a frame whose ``source`` carries ``sweep`` (ACOUSLIC stacks and phantom sweeps: ``case``,
   ``sweep``, 140 frames each) belongs to the sweep ``(case, sweep)``; a change of that pair, or a
   ``sweep_frame`` that does not increase (a looped recording replaying the same sweep), starts a new one.
   The source knows better than any heuristic, so empty frames and timestamp gaps do not split it.
3. Automatic: a sweep starts on the first frame with content; it ends when frames stay near-empty (probe
   lifted) for ``empty_seconds`` or when timestamps jump by more than ``gap_seconds``.  Near-empty frames
   inside a sweep are held back until content returns (then they belong to the sweep) or the timeout ends
   it (then they do not), so a sweep ends at its last frame with content.

At the end of a sweep the tracker emits the final ``best_frame`` and then ``sweep_ended``, so that nothing
about a sweep arrives after its ``sweep_ended``.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .options import option

if TYPE_CHECKING:
    from .recovery import Recovered

NO_GOOD_FRAME = "no good frame"
DEFAULT_MIN_SCORE = 0.5  # for a probability-like score whose bundle declares no operating point
OPERATOR_COMMANDS = ("start", "stop")
EXAM_END = "exam_end"  # the operator's command that ends the exam (pipeline.exam), not a sweep


@dataclass
class SweepConfig:
    """Sweep tracking and best-frame selection settings (the run configuration's ``[sweep]`` section).

    Scores and content are taken to lie in [0, 1] (a probability-like best-frame score; the fraction of
    non-dark pixels of the frame's content).
    """

    empty_content_threshold: float = option(
        0.05, "a frame with less content than this (fraction of non-dark pixels) counts as near-empty "
        "(probe lifted off the skin)", min=0, max=1)
    empty_seconds: float = option(
        0.5, "near-empty frames for this long end an automatic sweep; shorter dips (poor contact) do not",
        min=0, max=3600)
    gap_seconds: float = option(
        1.0, "a jump in frame timestamps longer than this ends an automatic sweep (source paused or "
        "reconnected)", min=0.001, max=3600)
    smoothing_frames: int = option(
        1, "causal moving-average window of the best-frame score, in frames (damps single-frame spikes of "
        "a noisy scorer; 1, no smoothing, by default: a blind sweep crosses the optimal plane in 1-3 "
        "frames, so a wider window ranks a long fair stretch above the short true crossing)",
        min=1, max=1000)
    hysteresis_margin: float = option(
        0.02, "a live best_frame update needs a smoothed score above the last one reported by this much",
        min=0, max=1)
    min_update_interval_frames: int = option(
        5, "frames between two live best_frame updates of a sweep, at least", min=1, max=100000)
    min_score: float | None = option(
        None, "smoothed score below which a frame is not worth measuring on; none: the bundle's own "
        f"operating point (best_frame.min_score in bundle.json), else {DEFAULT_MIN_SCORE}", min=0, max=1)
    top_k: int = option(5, "best frames (by smoothed score) per sweep whose median AC is reported",
                        min=1, max=100)

    def __post_init__(self) -> None:
        if self.empty_seconds < 0 or self.gap_seconds <= 0:
            raise ValueError("empty_seconds must be >= 0 and gap_seconds > 0")
        if self.smoothing_frames < 1 or self.min_update_interval_frames < 1 or self.top_k < 1:
            raise ValueError("smoothing_frames, min_update_interval_frames and top_k must be >= 1")
        if self.hysteresis_margin < 0:
            raise ValueError("hysteresis_margin must be >= 0")

    @property
    def threshold(self) -> float:
        """min_score, or the default when neither the run nor the bundle sets one."""
        return DEFAULT_MIN_SCORE if self.min_score is None else self.min_score

    def for_bundle(self, bundle_min_score: float | None) -> SweepConfig:
        """These settings with the bundle's operating point where the run leaves min_score unset."""
        if self.min_score is not None or bundle_min_score is None:
            return self
        return dataclasses.replace(self, min_score=bundle_min_score)


@dataclass(frozen=True)
class FrameInfo:
    """What sweep tracking needs of one frame: id, time (s), best-frame score, content, source metadata."""

    frame_id: int
    t: float
    score: float
    content: float = 1.0
    source: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScoredFrame:
    """A frame of a sweep with its smoothed score (what selection uses) and its raw score."""

    sweep_id: int
    frame_id: int
    t: float
    score: float
    raw_score: float


@dataclass(frozen=True)
class SweepEvent:
    """``sweep_started`` (at the sweep's first frame) or ``sweep_ended`` (``t``: when the end was decided)."""

    type: str
    sweep_id: int
    reason: str
    first_frame_id: int
    last_frame_id: int
    frame_count: int
    t: float
    case: Any = None

    def to_dict(self) -> dict[str, Any]:
        frame_id = self.first_frame_id if self.type == "sweep_started" else self.last_frame_id
        return {**dataclasses.asdict(self), "frame_id": frame_id}


@dataclass(frozen=True)
class BestFrameEvent:
    """A live (``final`` false) or final best frame of a sweep; ``best`` is None only in a final event."""

    sweep_id: int
    best: ScoredFrame | None
    final: bool
    reason: str | None = None
    top_k: tuple[ScoredFrame, ...] = ()
    session_best: ScoredFrame | None = None

    type = "best_frame"

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {"type": self.type, "sweep_id": self.sweep_id,
                "frame_id": None if best is None else best.frame_id,
                "score": None if best is None else best.score,
                "raw_score": None if best is None else best.raw_score,
                "t": None if best is None else best.t,
                "final": self.final, "reason": self.reason,
                "top_k": [dataclasses.asdict(f) for f in self.top_k],
                "session_best": None if self.session_best is None else dataclasses.asdict(self.session_best)}


Event = SweepEvent | BestFrameEvent


class BestFrameSelector:
    """Best frame of one sweep: the best window of frames, and in it the frame with the best own score.

    Windows, because the pipeline is live: the smoothed score at frame i is the mean of the raw scores of
    frames i-w+1 .. i (fewer at the start of the sweep), known as soon as frame i arrives, and it damps
    single-frame spikes. The frame reported for a window is its highest raw score (earliest on ties), not
    its last frame, so a causal window adds no lag to the pick: a short run of good frames (a blind sweep
    crosses the standard plane in a few frames) inside a merely fair stretch is still the one picked.
    Windows are ranked by smoothed score; ties keep the earliest window. For the top-k (robust biometry)
    a frame ranks by the best smoothed score of the windows it ended or was chosen by, so the best frame
    comes first and the others are its good neighbours, each once.

    Live updates report the best frame so far, only when it beats the last reported one by the hysteresis
    margin and at least ``min_update_interval_frames`` frames after it; a best found in between is reported
    once the interval has passed, so the last live update can lag, but :meth:`finish` never does.
    """

    def __init__(self, sweep_id: int, config: SweepConfig | None = None) -> None:
        self.sweep_id = sweep_id
        self.config = config or SweepConfig()
        self._window: deque[FrameInfo] = deque(maxlen=self.config.smoothing_frames)
        self._count = 0
        self._best: ScoredFrame | None = None
        self._top: dict[int, tuple[float, int, ScoredFrame]] = {}  # frame id -> (score, -order, frame)
        self._live: ScoredFrame | None = None
        self._live_index = 0
        self._finished = False

    def update(self, frame: FrameInfo) -> BestFrameEvent | None:
        """The next frame of the sweep in capture order."""
        self._check_open()
        self._window.append(frame)
        smoothed = sum(float(f.score) for f in self._window) / len(self._window)
        chosen = max(self._window, key=lambda f: float(f.score))  # max keeps the earliest of equals
        scored = ScoredFrame(self.sweep_id, chosen.frame_id, chosen.t, smoothed, float(chosen.score))
        arrived = ScoredFrame(self.sweep_id, frame.frame_id, frame.t, smoothed, float(frame.score))
        return self._consider(scored, (scored, arrived))

    def add_refined(self, frame: FrameInfo) -> BestFrameEvent | None:
        """A frame of the sweep scored late (lookback refinement), out of capture order: it ranks by its
        own score (smoothing applies to the stream in capture order) and, on ties, after what came first."""
        self._check_open()
        scored = ScoredFrame(self.sweep_id, frame.frame_id, frame.t, float(frame.score), float(frame.score))
        return self._consider(scored, (scored,))

    def restore(self, best: ScoredFrame) -> None:
        """A selector taken back from the journal (pipeline.recovery): its best so far, already reported."""
        self._best = self._live = best
        self._top[best.frame_id] = (best.score, 0, best)

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError(f"sweep {self.sweep_id} is finished")

    def _consider(self, scored: ScoredFrame, ranked: tuple[ScoredFrame, ...]) -> BestFrameEvent | None:
        cfg = self.config
        index = self._count
        self._count += 1
        if self._best is None or scored.score > self._best.score:
            self._best = scored
        if scored.score >= cfg.threshold:
            for entry in ranked:
                self._rank(entry, index)
        best = self._best
        if best.score < cfg.threshold:
            return None
        if self._live is not None and (best.score <= self._live.score + cfg.hysteresis_margin
                                       or index - self._live_index < cfg.min_update_interval_frames):
            return None
        self._live, self._live_index = best, index
        return BestFrameEvent(self.sweep_id, best, final=False)

    def _rank(self, scored: ScoredFrame, index: int) -> None:
        """Top-k distinct frames by their best window score; among equals the earliest window stays."""
        known = self._top.get(scored.frame_id)
        if known is not None and known[0] >= scored.score:
            return
        self._top[scored.frame_id] = (scored.score, -index, scored)
        if len(self._top) > self.config.top_k:
            weakest = min(self._top.values(), key=lambda entry: entry[:2])
            del self._top[weakest[2].frame_id]

    @property
    def best(self) -> ScoredFrame | None:
        """The highest smoothed score so far (earliest on ties), whatever min_score says."""
        return self._best

    @property
    def window_ids(self) -> set[int]:
        """Frames of the current smoothing window: a later window may still choose any of them."""
        return {f.frame_id for f in self._window}

    def keeps(self, frame_id: int) -> bool:
        """True while the frame is the best, among the top-k, or in the current window (a later window may
        still choose it): what a caller must keep the data of."""
        return ((self._best is not None and self._best.frame_id == frame_id) or frame_id in self._top
                or any(f.frame_id == frame_id for f in self._window))

    def finish(self) -> BestFrameEvent:
        """The one final event: the sweep's highest smoothed score (earliest on ties) and its top-k frames."""
        if self._finished:
            raise RuntimeError(f"sweep {self.sweep_id} is already finished")
        self._finished = True
        if self._best is None or self._best.score < self.config.threshold:
            return BestFrameEvent(self.sweep_id, None, final=True, reason=NO_GOOD_FRAME)
        top = tuple(entry[2] for entry in sorted(self._top.values(), key=lambda e: e[:2], reverse=True))
        return BestFrameEvent(self.sweep_id, self._best, final=True, top_k=top)


class SessionBest:
    """Best final frame over the sweeps of one case (a scanning session); earlier sweeps win ties."""

    def __init__(self, case: Any = None) -> None:
        self.case = case
        self.best: ScoredFrame | None = None

    def add(self, final: BestFrameEvent) -> ScoredFrame | None:
        if not final.final:
            raise ValueError("SessionBest aggregates final best_frame events only")
        if final.best is not None and (self.best is None or final.best.score > self.best.score):
            self.best = final.best
        return self.best


@dataclass
class _Sweep:
    sweep_id: int
    key: tuple[Any, Any]
    selector: BestFrameSelector
    first: FrameInfo
    last: FrameInfo
    count: int = 0


def _source_key(frame: FrameInfo) -> tuple[Any, Any]:
    return frame.source.get("case"), frame.source.get("sweep")


def _replayed(sweep: _Sweep, frame: FrameInfo) -> bool:
    """True when the source's frame index within the sweep went back: the same sweep is being replayed."""
    before, now = sweep.last.source.get("sweep_frame"), frame.source.get("sweep_frame")
    return before is not None and now is not None and now <= before


@dataclass
class _Closing:
    sweep: _Sweep
    t: float
    reason: str
    session: SessionBest  # the case the sweep belongs to (the next sweep may already be another case's)


class SweepTracker:
    """Splits a frame stream into sweeps and runs a :class:`BestFrameSelector` per sweep and a
    :class:`SessionBest` per case; every method returns the events it caused, in order.

    With `hold_finals` (lookback refinement), a sweep that ends is not finished at once: it waits in
    `closing` while frames scored late are still added to it (`add_refined`), until the caller `close`s it;
    then its final best_frame and sweep_ended follow, together as always, and possibly after the next
    sweep's sweep_started.

    With `screened` (a screening cascade), frames in capture order come scored by the screen model: they
    delimit the sweeps but are not ranked; only frames added with `add_refined` (the main model's) are."""

    def __init__(self, config: SweepConfig | None = None, hold_finals: bool = False,
                 screened: bool = False) -> None:
        self.config = config or SweepConfig()
        self.hold_finals = hold_finals
        self.screened = screened
        self.closing: dict[int, _Closing] = {}  # sweep id -> an ended sweep waiting for its final
        self._next_id = 0
        self._sweep: _Sweep | None = None
        self._held_empty: list[FrameInfo] = []
        self._last_t: float | None = None
        self._operator = False
        self._armed = False
        self.session: SessionBest | None = None

    @property
    def sweep_id(self) -> int | None:
        """The open sweep, if any."""
        return None if self._sweep is None else self._sweep.sweep_id

    @property
    def selector(self) -> BestFrameSelector | None:
        """The open sweep's best-frame selector, if a sweep is open."""
        return None if self._sweep is None else self._sweep.selector

    def update(self, frame: FrameInfo) -> list[Event]:
        cfg = self.config
        gap = self._last_t is not None and frame.t - self._last_t > cfg.gap_seconds
        self._last_t = frame.t
        if self._operator:
            return self._start_or_add(frame, "operator") if self._armed else []
        events: list[Event] = []
        key = _source_key(frame)
        if self._sweep is not None and (self._sweep.key != key or _replayed(self._sweep, frame)):
            events += self._end(frame.t, "source")
        if key[1] is not None:
            return events + self._start_or_add(frame, "source")
        if self._sweep is not None and gap:
            events += self._end(frame.t, "gap")
        if frame.content < cfg.empty_content_threshold:
            if self._sweep is not None:
                self._held_empty.append(frame)
                if frame.t - self._held_empty[0].t >= cfg.empty_seconds:
                    events += self._end(frame.t, "probe_lifted")
            return events
        for held in self._held_empty:
            events += self._start_or_add(held, "content")
        self._held_empty.clear()
        return events + self._start_or_add(frame, "content")

    def command(self, name: str, t: float) -> list[Event]:
        """Operator ``start``/``stop`` at time t; from the first command on, only commands delimit sweeps.

        ``start`` ends any open sweep and opens the next one at the following frame (so its
        ``sweep_started`` carries a real first frame); ``stop`` ends the open sweep, if any.
        """
        if name not in OPERATOR_COMMANDS:
            raise ValueError(f"unknown command {name!r}, expected one of {OPERATOR_COMMANDS}")
        self._operator = True
        self._armed = name == "start"
        return self._end(t, "operator") if self._sweep is not None else []

    def flush(self, t: float) -> list[Event]:
        """End of stream: close the open sweep (final best_frame, then sweep_ended)."""
        self._last_t = None
        return self._end(t, "end_of_stream") if self._sweep is not None else []

    def _start_or_add(self, frame: FrameInfo, reason: str) -> list[Event]:
        events: list[Event] = []
        sweep = self._sweep
        if sweep is None:
            sweep = self._sweep = _Sweep(self._next_id, _source_key(frame),
                                         BestFrameSelector(self._next_id, self.config), frame, frame)
            self._next_id += 1
            case = frame.source.get("case")
            if self.session is None or self.session.case != case:
                self.session = SessionBest(case)
            events.append(SweepEvent("sweep_started", sweep.sweep_id, reason, frame.frame_id, frame.frame_id,
                                     1, frame.t, case))
        sweep.last = frame
        sweep.count += 1
        live = None if self.screened else sweep.selector.update(frame)
        if live is not None:
            events.append(live)
        return events

    def resume(self, recovered: Recovered) -> list[Event]:
        """Take back a lost tracker's state from the journal: the sweep numbering, the case's best, and its
        open sweeps. The newest goes on as the open sweep; older ones (waiting for their finals when the
        last process died) are finished now, as they would have been."""
        self._next_id = max(self._next_id, recovered.next_sweep_id)
        if recovered.session_best is not None or recovered.session_case is not None:
            self.session = SessionBest(recovered.session_case)
            self.session.best = recovered.session_best
        events: list[Event] = []
        for open_sweep in recovered.open:
            if self._sweep is not None:
                events += self._end(self._sweep.last.t, "restart")
            case = open_sweep.first.source.get("case")
            if self.session is None or self.session.case != case:
                self.session = SessionBest(case)
            selector = BestFrameSelector(open_sweep.sweep_id, self.config)
            if open_sweep.best is not None:
                selector.restore(open_sweep.best)
            self._sweep = _Sweep(open_sweep.sweep_id, _source_key(open_sweep.last), selector,
                                 open_sweep.first, open_sweep.last, open_sweep.count)
            self._last_t = open_sweep.last.t
        return events

    def selector_of(self, sweep_id: int) -> BestFrameSelector | None:
        """The selector of an open or closing sweep."""
        if self._sweep is not None and self._sweep.sweep_id == sweep_id:
            return self._sweep.selector
        held = self.closing.get(sweep_id)
        return None if held is None else held.sweep.selector

    def sweep_of(self, frame_id: int) -> int | None:
        """The open or closing sweep a frame id falls in (between its first and last frame), if any."""
        if self._sweep is not None and frame_id >= self._sweep.first.frame_id:
            return self._sweep.sweep_id
        return next((sweep_id for sweep_id, held in self.closing.items()
                     if held.sweep.first.frame_id <= frame_id <= held.sweep.last.frame_id), None)

    def add_refined(self, frame: FrameInfo) -> list[Event]:
        """A frame scored late, out of capture order: it joins the sweep it falls in, if one is still open
        or closing (see BestFrameSelector.add_refined), and does not move any sweep boundary."""
        sweep_id = self.sweep_of(frame.frame_id)
        selector = None if sweep_id is None else self.selector_of(sweep_id)
        live = None if selector is None else selector.add_refined(frame)
        return [] if live is None else [live]

    def close(self, sweep_id: int) -> list[Event]:
        """Finish a sweep held in `closing`: its final best_frame, then its sweep_ended."""
        held = self.closing.pop(sweep_id)
        return self._finish(held.sweep, held.t, held.reason, held.session)

    def _end(self, t: float, reason: str) -> list[Event]:
        sweep = self._sweep
        assert sweep is not None and self.session is not None
        self._sweep = None
        self._held_empty.clear()
        if self.hold_finals:
            self.closing[sweep.sweep_id] = _Closing(sweep, t, reason, self.session)
            return []
        return self._finish(sweep, t, reason, self.session)

    def _finish(self, sweep: _Sweep, t: float, reason: str, session: SessionBest) -> list[Event]:
        final = sweep.selector.finish()
        final = dataclasses.replace(final, session_best=session.add(final))
        ended = SweepEvent("sweep_ended", sweep.sweep_id, reason, sweep.first.frame_id, sweep.last.frame_id,
                           sweep.count, t, session.case)
        return [final, ended]
