"""Lookback refinement, the pure part: which unscored frames to score next when the engine is slower than
the video (a CPU cart scoring 1 frame in 5-8 with ViT-L), so that the plane crossing, which a blind sweep
passes in a few frames, is scored after all.

The newest frame keeps priority (live events stay fresh); spare engine time goes to the frames around
each sweep's highest-scoring frames: first the direct neighbours of the running top frames, then theirs.
As refined frames come back the top frames change, so the search climbs to the peak and narrows on it. A
sweep's refinement is complete when every frame within `REACH` of its best frame is scored (or no longer
held by preprocess); its final best_frame waits for that, bounded by `infer.refine_timeout_s`. While the
sweep is open and the engine has time, the search looks further (`SEARCH`), past a lesser local peak.

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
SEARCH = 8  # how far either side of a top frame refinement looks while there is engine time (a noisy
# score has local peaks: on the phantom a sweep's best can sit 4 frames from a lesser peak)
PEAKS = 3  # running top frames of a sweep whose neighbours are refined
MAX_SCORED = 2000  # scored frames a sweep keeps for planning before the oldest are forgotten
CANDIDATES = 4  # a screen's top frames per sweep that the main model scores (a smaller model ranks the
# main model's best among its first few; the search around the main model's peaks covers the rest)


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

    def peaks(self) -> list[int]:
        """The top scored frames, best first (earliest on ties)."""
        return sorted(self.scores, key=lambda i: (-self.scores[i], i))[:PEAKS]

    def wanted(self, peaks: list[int], held_since_ns: int, reach: int = SEARCH) -> list[int]:
        """Unscored frames within `reach` of `peaks` that preprocess still holds, nearest first, then by
        peak rank."""
        out: list[int] = []
        for distance in range(1, reach + 1):
            for peak in peaks:
                for frame_id in (peak - distance, peak + distance):
                    if (self.first <= frame_id <= self.last and frame_id not in self.scores
                            and frame_id not in out and self._held(frame_id, held_since_ns)):
                        out.append(frame_id)
        return out

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
        peaks = self.peaks()
        return not self.candidates(held_since_ns) and (not peaks or not self.wanted(peaks[:1], held_since_ns,
                                                                                     REACH))


def plan(sweeps: list[SweepScores], held_since_ns: int, limit: int) -> list[int]:
    """Frame ids to score next, most wanted first: the sweeps in the order given (those waiting for their
    final first), each one's screen candidates first (a cascade: a few frames, and while the main model's
    best keeps moving its REACH would otherwise starve them), then its best frame's REACH (what its final
    waits for), then the search around its top frames."""
    out: list[int] = []
    for sweep in sweeps:
        sweep.forget_before(held_since_ns)
        peaks = sweep.peaks()
        wanted = (sweep.candidates(held_since_ns) + sweep.wanted(peaks[:1], held_since_ns, REACH)
                  + sweep.wanted(peaks, held_since_ns))
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
