"""Lookback refinement, the pure part: which unscored frames to score next when the engine is slower than
the video (a CPU cart scoring 1 frame in 5-8 with ViT-L), so that the plane crossing, which a blind sweep
passes in a few frames, is scored after all.

The newest frame keeps priority (live events stay fresh); spare engine time goes first to the unscored
frames within `REACH` of each sweep's best frame (what its final waits for: complete when all are scored
or no longer held by preprocess, bounded by `infer.refine_timeout_s`), then to the frames that could still
beat that best: between two scored frames, an unscored one may score the line between them plus a spread
that grows with its distance from the nearer (`SPREAD`). Next to a high frame the score's own noise may
hide a better one; halfway between two newest frames a narrow peak may hide; next to a low frame, little.
The most promising are scored first, so the search explores the wide gaps and narrows on the high ground.

In a screening cascade a fast screen model scores the newest frames and the main model only what this
plan asks for: each sweep's top `CANDIDATES` screened frames come first, before its best frame's REACH, so
the main model starts where the screen saw the plane, and the search then climbs from the main model's
own scores. The pick is the main model's; the screen only says where to look.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field

from .messages import PreparedInput

REACH = 3  # frames either side of a sweep's best frame that must be scored before its pick is final
SPREAD = 0.2  # how far an unscored frame's score may stray from the line between its scored neighbours,
# per square root of frames to the nearer: on the demo bundle, adjacent frames of a sweep's high ground differ
# by 0.12 (median) to 0.35 (p90), and a peak 2-5 frames wide can sit between two newest frames 15 apart
MAX_SCORED = 2000  # scored frames a sweep keeps for planning before the oldest are forgotten
CANDIDATES = 4  # a screen's top frames per sweep that the main model scores (a smaller model ranks the
# main model's best among its first few; the search on the main model's own scores covers the rest)


@dataclass
class SweepScores:
    """What the planner knows of one sweep: the frame ids it spans so far, the scored ones, and in a
    screening cascade the screen's scores."""

    first: int
    last: int
    scores: dict[int, float] = field(default_factory=dict)  # frame id -> best-frame score
    captured_ns: dict[int, int] = field(default_factory=dict)  # frame id -> capture time (monotonic ns)
    screened: dict[int, float] = field(default_factory=dict)  # frame id -> the screen model's score

    def add(self, frame_id: int, score: float, captured_ns: int) -> None:
        self.scores[frame_id] = score
        self._saw(frame_id, captured_ns)

    def add_screened(self, frame_id: int, score: float, captured_ns: int) -> None:
        self.screened[frame_id] = score
        self._saw(frame_id, captured_ns)

    def _saw(self, frame_id: int, captured_ns: int) -> None:
        self.captured_ns[frame_id] = captured_ns
        self.first, self.last = min(self.first, frame_id), max(self.last, frame_id)

    def forget_before(self, held_since_ns: int) -> None:
        """Past MAX_SCORED frames (a sweep of hours: a probe that never lifts), drop those older than
        preprocess's history, which can no longer lead to a frame worth asking for. A sweep of ordinary
        length keeps them all, so its best frame stays the peak whose neighbourhood the final waits for."""
        if len(self.captured_ns) <= MAX_SCORED:
            return
        for frame_id in [i for i, t in self.captured_ns.items() if t < held_since_ns]:
            del self.captured_ns[frame_id]
            self.scores.pop(frame_id, None)
            self.screened.pop(frame_id, None)

    def best(self) -> int | None:
        """The top scored frame (earliest on ties)."""
        return min(self.scores, key=lambda i: (-self.scores[i], i), default=None)

    def reach(self, held_since_ns: int) -> list[int]:
        """Unscored frames within REACH of the best frame that preprocess still holds, nearest first."""
        best = self.best()
        if best is None:
            return []
        return [i for d in range(1, REACH + 1) for i in (best - d, best + d)
                if self.first <= i <= self.last and i not in self.scores and self._held(i, held_since_ns)]

    def promising(self, held_since_ns: int) -> list[int]:
        """Unscored frames between scored ones, still held, whose optimistic score (see SPREAD) beats the
        best frame's, most promising first."""
        best = self.best()
        if best is None:
            return []
        ids = sorted(self.scores)
        bound: dict[int, float] = {}
        for a, b in zip(ids, ids[1:], strict=False):
            # Held, as _held judges it: the frames whose nearer scored neighbour (a on ties) is still held.
            middle = (a + b) // 2
            first = a + 1 if self.captured_ns[a] >= held_since_ns else middle + 1
            last = b - 1 if self.captured_ns[b] >= held_since_ns else middle
            for i in range(first, last + 1):
                line = self.scores[a] + (self.scores[b] - self.scores[a]) * (i - a) / (b - a)
                optimistic = line + SPREAD * min(i - a, b - i) ** 0.5
                if optimistic > self.scores[best]:
                    bound[i] = optimistic
        return sorted(bound, key=lambda i: (-bound[i], i))

    def candidates(self, held_since_ns: int) -> list[int]:
        """The screen's top frames (best first, earliest on ties) that the main model has not scored and
        preprocess still holds; none without a screen."""
        top = sorted(self.screened, key=lambda i: (-self.screened[i], i))[:CANDIDATES]
        return [i for i in top if i not in self.scores and self._held(i, held_since_ns)]

    def _held(self, frame_id: int, held_since_ns: int) -> bool:
        """Whether preprocess still holds the frame: its capture time is taken as the nearest scored
        frame's (frames a few ids apart are a few frame periods apart)."""
        nearest = min(self.captured_ns, key=lambda i: abs(i - frame_id), default=None)
        return nearest is not None and self.captured_ns[nearest] >= held_since_ns

    def complete(self, held_since_ns: int) -> bool:
        """Every frame within REACH of the best frame and every screen candidate is scored, or gone from
        preprocess's history."""
        return not self.candidates(held_since_ns) and not self.reach(held_since_ns)


def plan(sweeps: list[SweepScores], held_since_ns: int, limit: int) -> list[int]:
    """Frame ids to score next, most wanted first: the sweeps in the order given (those waiting for their
    final first), each one's screen candidates first (a cascade: a few frames, and while the main model's
    best keeps moving its REACH would otherwise starve them), then its best frame's REACH (what its final
    waits for), then the frames that could beat its best."""
    out: list[int] = []
    for sweep in sweeps:
        sweep.forget_before(held_since_ns)
        wanted = sweep.candidates(held_since_ns) + sweep.reach(held_since_ns) + sweep.promising(held_since_ns)
        for frame_id in wanted:
            if frame_id not in out:
                out.append(frame_id)
    return out[:limit]


class History:
    """Preprocess's side of refinement: the prepared inputs of the last `window_ns` of video, and the
    frames postprocess asked for, served most wanted first. Postprocess's latest request replaces the last
    one and says how many refined frames it has scored, so the frames still in flight are known."""

    def __init__(self, window_ns: int) -> None:
        self.window_ns = window_ns
        self._held: OrderedDict[int, PreparedInput] = OrderedDict()  # by frame id, in capture order
        self._requested: list[int] = []
        self._sent: set[int] = set()
        self.dispatched = 0  # refined frames sent to infer
        self.scored = 0  # ... and scored, by postprocess's last word
        self.nbytes = 0

    def add(self, prepared: PreparedInput) -> None:
        self._held[prepared.frame.id] = prepared
        self.nbytes += prepared.pixels.nbytes
        horizon = prepared.frame.stamps["cap"] - self.window_ns
        while self._held:
            oldest = next(iter(self._held.values()))
            if oldest.frame.stamps["cap"] >= horizon:
                break
            self._forget(oldest.frame.id)

    def _forget(self, frame_id: int) -> None:
        self.nbytes -= self._held.pop(frame_id).pixels.nbytes
        self._sent.discard(frame_id)

    def sent_newest(self, frame_id: int) -> None:
        """The frame went to infer as the newest: a request made before its score came back skips it."""
        if frame_id in self._held:
            self._sent.add(frame_id)

    def request(self, frame_ids: tuple[int, ...], scored: int) -> None:
        self._requested = [i for i in frame_ids if i not in self._sent]
        self.scored = scored

    @property
    def pending(self) -> bool:
        return bool(self._requested)

    @property
    def in_flight(self) -> int:
        return self.dispatched - self.scored

    def next(self) -> tuple[PreparedInput | None, int]:
        """The most wanted requested frame still held (as a refined input), and how many requested ones
        were gone from the window first."""
        gone = 0
        while self._requested:
            frame_id = self._requested.pop(0)
            prepared = self._held.get(frame_id)
            if prepared is None:
                gone += 1
                continue
            self._sent.add(frame_id)
            self.dispatched += 1
            return dataclasses.replace(prepared, refined=True), gone
        return None, gone
