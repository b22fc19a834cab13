"""Pacing of recorded sources: frames are released on their schedule, and each is read just before it is
due rather than straight after the previous release (where its decode or render would compete with the
previous frame's inference for a core)."""

from __future__ import annotations

import time

import numpy as np

from pipeline.capture import Pacer
from pipeline.sources import open_source

FPS = 10.0  # a 100 ms period, long next to a phantom frame's render (about 10 ms)


def test_paced_phantom_frames_are_read_just_before_they_are_due() -> None:
    source = open_source(f"phantom://5?frames=4&fps={FPS:g}", "gray")
    pacer = Pacer(source.fps)
    read_ends, releases = [], []
    for _ in range(8):
        frame = pacer.read(source)
        read_ends.append(time.monotonic())
        assert frame is not None
        pacer.wait(frame.pts)
        releases.append(time.monotonic())
    source.close()
    period = 1.0 / FPS
    intervals = np.diff(releases)
    # On schedule, and never a burst; one late release (a busy shared host) is tolerated, not required.
    assert abs(np.median(intervals) - period) < 0.15 * period, intervals
    assert np.all(intervals > 0.5 * period), intervals
    # Read straight after the previous release, a frame would wait most of the period to be released; read
    # just in time, it waits the margin and what the slowest recent read took beyond this one.
    held = np.array(releases) - np.array(read_ends)
    assert np.median(held[2:]) < 0.25 * period, held
