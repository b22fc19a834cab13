"""The console's one-line event view."""

from __future__ import annotations

from pipeline.console import format_event
from pipeline.events import make_event


def test_best_frame_and_biometry_lines_carry_sweep_frame_score_ac_ga_and_latency():
    best = make_event("best_frame", "r", sweep_id=2, frame_id=417, latency_ms=12.4, final=True, score=0.934,
                      frame_png="best/sweep-0002-frame-000417-frame.png", reason=None)
    line = format_event(best)
    assert line.startswith("sweep 2 final best frame 417") and "score 0.934" in line and "(12 ms)" in line
    assert line.endswith("best/sweep-0002-frame-000417-frame.png")
    bio = make_event("biometry", "r", sweep_id=2, frame_id=417, latency_ms=20.0, final=True, status="ok",
                     unit="mm", ac_mm=281.24, ac_px=1004.4, ga_weeks=31.62, confidence=0.87,
                     flags=["truncated"])
    line = format_event(bio)
    assert "281.2 mm" in line and "GA 31.6 weeks" in line and "frame 417" in line and "[truncated]" in line
    uncalibrated = dict(bio, unit="px", ac_mm=None, ga_weeks=None)
    assert "1004.4 px (uncalibrated)" in format_event(uncalibrated) and "GA -" in format_event(uncalibrated)


def test_sweeps_without_a_good_frame_and_frame_events():
    none = make_event("best_frame", "r", sweep_id=0, final=True, reason="no good frame")
    assert format_event(none) == "sweep 0 final best frame: none (no good frame)"
    assert format_event(make_event("frame", "r", frame_id=1)) is None
    ended = make_event("sweep_ended", "r", sweep_id=0, frame_id=139, reason="source", frame_count=140)
    assert format_event(ended) == "sweep 0 ended at frame 139: 140 frames (source)"
