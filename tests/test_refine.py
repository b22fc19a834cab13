"""Lookback refinement: the planner climbs to a sweep's peak, the history serves what is still held, the
tracker holds a sweep's final for it, and through the real pipeline a slow engine still scores the plane
crossing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import run_pipeline

from pipeline.letterbox import Geometry
from pipeline.messages import FrameRef, PreparedInput
from pipeline.refine import REACH, History, SweepScores, plan
from pipeline.sweep import FrameInfo, SweepConfig, SweepTracker

MS = 1_000_000


def _hill(frame_id: int) -> float:
    """A sweep whose best frame is 50, falling off by 0.1 a frame."""
    return max(0.0, 1.0 - 0.1 * abs(frame_id - 50))


def test_the_plan_climbs_to_the_peak_and_completes_around_it() -> None:
    sweep = SweepScores(0, 0)
    for frame_id in range(0, 100, 8):  # the newest-frame path: 1 frame in 8
        sweep.add(frame_id, _hill(frame_id), frame_id * 33 * MS)
    steps = 0
    while not sweep.complete(held_since_ns=0):
        wanted = plan([sweep], held_since_ns=0, limit=1)
        assert wanted, "incomplete but nothing to ask for"
        sweep.add(wanted[0], _hill(wanted[0]), wanted[0] * 33 * MS)
        steps += 1
    assert sweep.best() == 50
    assert all(i in sweep.scores for i in range(50 - REACH, 50 + REACH + 1))
    assert steps <= 4 * REACH + 4  # a search that narrows, not a sweep over every skipped frame


def test_the_search_finds_a_narrow_peak_between_two_low_newest_frames() -> None:
    """A peak 3 frames wide (frames 37-39) between two newest frames that read nearly nothing, while the
    best scored frame (the first of a lesser hill, 72-78) has its REACH scored, so its final could go: the
    search looks halfway across the wide gaps, where a narrow peak can hide, and finds it within 16
    refinements (the neighbours-of-the-top-frames search it replaced never left the hill)."""
    def score(frame_id: int) -> float:
        return {37: 0.6, 38: 0.9, 39: 0.6}.get(frame_id, 0.4 if 72 <= frame_id <= 78 else 0.02)

    sweep = SweepScores(0, 0)
    for frame_id in [*range(0, 106, 15), *range(69, 82)]:  # newest frames 15 apart, the hill's REACH
        sweep.add(frame_id, score(frame_id), frame_id * 33 * MS)
    assert sweep.complete(held_since_ns=0)  # the final could go now, with a lesser pick
    for _ in range(16):
        wanted = plan([sweep], held_since_ns=0, limit=1)
        if not wanted:
            break
        sweep.add(wanted[0], score(wanted[0]), wanted[0] * 33 * MS)
    assert sweep.best() == 38


def test_frames_gone_from_the_history_are_not_asked_for() -> None:
    sweep = SweepScores(0, 0)
    for frame_id in (40, 48):
        sweep.add(frame_id, _hill(frame_id), frame_id * 33 * MS)
    assert sweep.reach(held_since_ns=0) and sweep.promising(held_since_ns=0)
    gone = 48 * 33 * MS + 1  # older than what preprocess holds
    assert sweep.reach(gone) == [] and sweep.promising(gone) == []
    assert sweep.complete(gone)


def _prepared(frame_id: int, captured_ns: int) -> PreparedInput:
    ref = FrameRef(frame_id, 0, 2, (8, 8), {"index": frame_id, "pts": None}, {"cap": captured_ns})
    return PreparedInput(ref, Geometry((0, 0, 8, 8), (0, 0), (8, 8), (1, 1)), 1.0,
                         np.zeros((224, 224), np.uint8))


def test_the_history_serves_what_it_still_holds_once_and_counts_what_is_in_flight() -> None:
    history = History(window_ns=10 * 33 * MS)
    for frame_id in range(30):
        history.add(_prepared(frame_id, frame_id * 33 * MS))
    assert history.nbytes == 11 * 224 * 224  # frames 19..29: the window
    history.sent_newest(29)
    history.request((29, 5, 25, 24), scored=0)
    served, gone = history.next()
    assert served is not None and served.frame.id == 25 and served.refined and gone == 1  # 29 sent, 5 gone
    served, _ = history.next()
    assert served is not None and served.frame.id == 24 and history.in_flight == 2
    history.request((25, 24, 23), scored=1)  # already sent ones are not sent twice
    assert history.next()[0].frame.id == 23
    assert history.next() == (None, 0) and not history.pending and history.in_flight == 2


def _frame(frame_id: int, score: float, sweep: int = 0) -> FrameInfo:
    return FrameInfo(frame_id, frame_id / 30, score, 1.0, {"case": "c", "sweep": sweep})


def test_a_held_sweep_takes_late_frames_until_closed() -> None:
    tracker = SweepTracker(SweepConfig(min_score=0.2, min_update_interval_frames=1), hold_finals=True)
    for frame_id in range(0, 20, 5):
        tracker.update(_frame(frame_id, 0.3))
    events = tracker.update(_frame(20, 0.1, sweep=1))  # the source's next sweep: sweep 0 ends
    assert [e.type for e in events] == ["sweep_started"] and list(tracker.closing) == [0]
    assert tracker.sweep_of(7) == 0 and tracker.sweep_of(21) == 1 and tracker.sweep_of(25) == 1
    live = tracker.add_refined(_frame(7, 0.9))
    assert live and live[0].best.frame_id == 7
    final, ended = tracker.close(0)
    assert final.final and final.best.frame_id == 7 and ended.type == "sweep_ended"
    assert final.top_k[0].frame_id == 7
    assert tracker.add_refined(_frame(8, 0.95)) == []  # closed: a late frame changes nothing


def test_a_slow_engine_still_scores_around_each_sweep_peak(tmp_path: Path) -> None:
    """The demo bundle capped at 4 frames a second on a live phantom case (1 frame in 7.5): refinement
    scores every frame within REACH of each sweep's highest-scoring frame, the finals wait for it and say
    how long, and the newest-frame path is reported apart."""
    out = tmp_path / "run"
    # A sweep of 3 s has 12 inferences at 4 fps, half of them for refinement: here the finals may wait
    # longer and the history reaches further back than by default, so that coverage, not this emulated
    # cart's budget, is what the test checks (bench_latency measures the budget). On issue 14's phantom a
    # sweep's peak can move late (the search finds a higher frame in its last seconds): 4 s of waiting
    # missed one frame of such a peak's REACH, reproducibly, in a sweep with no good frame.
    result = run_pipeline("--source", "phantom://11?cases=1&frames=90", "--out", str(out), "--quiet",
                          "--set", "infer.rate_limit_fps=4", "--set", "infer.refine_timeout_s=8",
                          "--set", "infer.refine_window_s=12", timeout=180)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    frames = [e for e in events if e["type"] == "frame"]
    refined = [e for e in frames if e["refined"]]
    assert refined and len(refined) < len(frames)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"]["balanced"] and summary["frames"]["scored"] == len(frames) - len(refined)
    assert summary["latency_ms_refined"]["end_to_end"]["count"] == len(refined)
    finals = [e for e in events if e["type"] == "best_frame" and e["final"]]
    assert len(finals) == 6 and all(e["decision_ms"] >= 0 for e in finals)
    for sweep in range(6):
        scored = {e["frame_id"]: e["score"] for e in frames if e["source"]["sweep"] == sweep}
        peak = max(scored, key=lambda i: (scored[i], -i))
        first, last = min(scored), max(scored)
        around = [i for i in range(peak - REACH, peak + REACH + 1) if first <= i <= last]
        assert all(i in scored for i in around), f"sweep {sweep}: {sorted(set(around) - set(scored))}"
    order = [e["type"] for e in events if e["type"] in ("best_frame", "sweep_ended") and e.get("final", True)]
    assert order == ["best_frame", "sweep_ended"] * 6  # each final still comes before its sweep_ended
