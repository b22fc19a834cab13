"""Latency histograms: pure logic shared by the supervisor and the benchmarks."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping

import numpy as np

# Timestamps every frame header carries (monotonic ns), in data-path order. "cap" is when the frame became
# available from the source; the others are when each stage took the frame in and handed it on.
STAMPS = ("cap", "cap_out", "pre_in", "pre_out", "inf_in", "inf_out", "post_in", "post_out")

# Latency segments reported per frame: each stage's own time, each transport hop, and end to end.
SEGMENTS: dict[str, tuple[str, str]] = {
    "end_to_end": ("cap", "post_out"),
    "capture": ("cap", "cap_out"),
    "capture>preprocess": ("cap_out", "pre_in"),
    "preprocess": ("pre_in", "pre_out"),
    "preprocess>infer": ("pre_out", "inf_in"),
    "infer": ("inf_in", "inf_out"),
    "infer>postprocess": ("inf_out", "post_in"),
    "postprocess": ("post_in", "post_out"),
}
PERCENTILES = (50, 90, 95, 99)


def segment_row(stamps: Mapping[str, int]) -> list[float]:
    """One frame's latencies in ms, in SEGMENTS order."""
    return [(stamps[end] - stamps[start]) / 1e6 for start, end in SEGMENTS.values()]


class LatencyHistogram:
    """Log-spaced buckets (1% wide, 1 us to 1000 s): bounded memory for runs of any length."""

    MIN_MS = 1e-3
    MAX_MS = 1e6
    GROWTH = 1.01

    def __init__(self) -> None:
        self._log_growth = math.log(self.GROWTH)
        buckets = math.ceil(math.log(self.MAX_MS / self.MIN_MS) / self._log_growth) + 1
        self.counts = np.zeros(buckets, dtype=np.int64)
        self.count = 0
        self.total = 0.0
        self.total_sq = 0.0
        self.max = 0.0

    def add(self, values_ms: np.ndarray) -> None:
        values = np.asarray(values_ms, dtype=np.float64).ravel()
        if values.size == 0:
            return
        clipped = np.clip(values, self.MIN_MS, self.MAX_MS)
        index = np.floor(np.log(clipped / self.MIN_MS) / self._log_growth).astype(np.int64)
        np.add.at(self.counts, np.minimum(index, self.counts.size - 1), 1)
        self.count += values.size
        self.total += float(values.sum())
        self.total_sq += float(np.square(values).sum())
        self.max = max(self.max, float(values.max()))

    def percentile(self, q: float) -> float:
        """Value at percentile q (bucket centre, never above the exact maximum); NaN when empty."""
        if self.count == 0:
            return math.nan
        rank = max(1, math.ceil(q / 100 * self.count))
        bucket = int(np.searchsorted(np.cumsum(self.counts), rank))
        centre = self.MIN_MS * self.GROWTH ** (bucket + 0.5)
        return min(centre, self.max)

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {"count": self.count}
        if self.count:
            mean = self.total / self.count
            out["mean"] = round(mean, 4)
            out["std"] = round(math.sqrt(max(0.0, self.total_sq / self.count - mean * mean)), 4)
            out.update({f"p{q}": round(self.percentile(q), 4) for q in PERCENTILES})
            out["max"] = round(self.max, 4)
        return out


class LatencyBook:
    """Histograms for every segment over the run, skipping the first and last `skip` frames (warm-up and
    shutdown are not the steady state), plus named end-to-end windows that a reader (the live status line,
    the health events) takes and resets at its own pace. A run too short to leave anything after the skips
    (a slow model on a CPU may score 20 frames in a minute) reports all its frames instead of none."""

    def __init__(self, skip: int = 10, windows: tuple[str, ...] = ("status",)) -> None:
        self.skip = skip
        self.seen = 0
        self._first: list[np.ndarray] = []  # the skipped warm-up rows, for a run too short to skip them
        self._held: deque[np.ndarray] = deque()
        self.run = {name: LatencyHistogram() for name in SEGMENTS}
        self.windows = {name: LatencyHistogram() for name in windows}

    def add_rows(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, len(SEGMENTS))
        if rows.size == 0:
            return
        for window in self.windows.values():
            window.add(rows[:, 0])
        first = max(0, self.skip - self.seen)
        self.seen += len(rows)
        self._first += list(rows[:first])
        for row in rows[first:]:
            self._held.append(row)
        released = len(self._held) - self.skip
        if released > 0:
            block = np.stack([self._held.popleft() for _ in range(released)])
            for column, hist in enumerate(self.run.values()):
                hist.add(block[:, column])

    def take_window(self, name: str = "status") -> LatencyHistogram:
        window, self.windows[name] = self.windows[name], LatencyHistogram()
        return window

    def summary(self) -> dict[str, dict[str, float]]:
        if next(iter(self.run.values())).count or not self.seen:
            return {name: hist.summary() for name, hist in self.run.items()}
        rows = np.stack([*self._first, *self._held])
        short = {name: LatencyHistogram() for name in SEGMENTS}
        for column, hist in enumerate(short.values()):
            hist.add(rows[:, column])
        return {name: hist.summary() for name, hist in short.items()}
