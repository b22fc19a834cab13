"""Sweep tracking and best-frame selection on synthetic score streams."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.events import make_event
from pipeline.sweep import (
    NO_GOOD_FRAME,
    BestFrameEvent,
    BestFrameSelector,
    FrameInfo,
    SessionBest,
    SweepConfig,
    SweepEvent,
    SweepTracker,
)

FPS = 30.0


def frames(scores, *, start_id: int = 0, t0: float = 0.0, content: float = 1.0, source: dict | None = None):
    return [FrameInfo(start_id + i, t0 + i / FPS, float(s), content, dict(source or {}))
            for i, s in enumerate(scores)]


def feed(tracker: SweepTracker, stream) -> list:
    return [event for frame in stream for event in tracker.update(frame)]


def of_type(events, kind: str) -> list:
    return [e for e in events if e.type == kind]


def finals(events) -> list[BestFrameEvent]:
    return [e for e in of_type(events, "best_frame") if e.final]


def lives(events) -> list[BestFrameEvent]:
    return [e for e in of_type(events, "best_frame") if not e.final]


def select(scores, config: SweepConfig) -> tuple[list[BestFrameEvent], BestFrameEvent]:
    live, _, final = select_indexed(scores, config)
    return live, final


def select_indexed(scores, config: SweepConfig) -> tuple[list[BestFrameEvent], list[int], BestFrameEvent]:
    """Live events, the index of the frame at which each was emitted, and the final event."""
    selector = BestFrameSelector(0, config)
    emitted = [(i, e) for i, f in enumerate(frames(scores)) if (e := selector.update(f)) is not None]
    return [e for _, e in emitted], [i for i, _ in emitted], selector.finish()


def causal_mean(scores, w: int) -> np.ndarray:
    return np.array([np.mean(scores[max(0, i - w + 1):i + 1]) for i in range(len(scores))])


def peak(n: int, centre: int, height: float, width: float, base: float = 0.2) -> np.ndarray:
    x = np.arange(n)
    return base + (height - base) * np.clip(1 - np.abs(x - centre) / width, 0, 1)


def test_noise_does_not_flood_updates():
    cfg = SweepConfig(hysteresis_margin=0.02, min_update_interval_frames=5)
    scores = np.random.default_rng(0).uniform(0.5, 0.7, 900)
    live, at, final = select_indexed(scores, cfg)
    assert all(b - a >= cfg.min_update_interval_frames for a, b in zip(at, at[1:], strict=False))
    # Each update beats the previous one by the margin, so at most 1 + range / margin of them.
    assert len(live) <= 1 + 0.2 / cfg.hysteresis_margin
    margin = cfg.hysteresis_margin
    assert all(b.best.score > a.best.score + margin for a, b in zip(live, live[1:], strict=False))
    assert final.best.score == pytest.approx(causal_mean(scores, cfg.smoothing_frames).max())


def test_plateau_picks_first_full_window_inside_it():
    cfg = SweepConfig(smoothing_frames=5)
    scores = [0.2] * 20 + [0.9] * 15 + [0.2] * 20
    _, final = select(scores, cfg)
    # The first window wholly inside the plateau wins; on a flat plateau it reports its earliest frame.
    assert final.best.frame_id == 20
    assert final.best.score == pytest.approx(0.9) and final.best.raw_score == pytest.approx(0.9)


def test_short_run_of_good_frames_inside_a_fair_stretch_is_picked_without_lag():
    # A blind sweep crosses the standard plane in two frames; around it the abdomen is merely visible.
    cfg = SweepConfig(smoothing_frames=5)
    scores = [0.1] * 20 + [0.6] * 10 + [0.97, 0.95] + [0.6] * 10 + [0.1] * 20
    live, final = select(scores, cfg)
    assert final.best.frame_id == 30 and final.best.raw_score == pytest.approx(0.97)
    assert live[-1].best.frame_id == 30
    # Each window ranks a frame once: the top-k frames are distinct.
    ids = [f.frame_id for f in final.top_k]
    assert len(ids) == len(set(ids)) and ids[0] == 30


def test_two_peaks_higher_first_wins_and_live_updates_stop():
    cfg = SweepConfig(smoothing_frames=3, hysteresis_margin=0.02, min_update_interval_frames=2)
    scores = np.maximum(peak(100, 25, 0.95, 15), peak(100, 70, 0.8, 15))
    live, final = select(scores, cfg)
    assert 24 <= final.best.frame_id <= 27
    assert len(live) >= 3  # the rise is visible live
    assert [e.best.score for e in live] == sorted(e.best.score for e in live)
    assert all(e.best.frame_id <= 27 for e in live)  # nothing from the lower second peak


def test_higher_second_peak_replaces_first():
    cfg = SweepConfig(smoothing_frames=3)
    scores = np.maximum(peak(100, 25, 0.8, 15), peak(100, 70, 0.95, 15))
    live, final = select(scores, cfg)
    assert 69 <= final.best.frame_id <= 72
    assert live[-1].best.frame_id >= 60


def test_no_good_frame_reports_none_with_reason():
    live, final = select([0.2, 0.3, 0.45, 0.3] * 10, SweepConfig(min_score=0.5))
    assert live == []
    assert final.final and final.best is None and final.reason == NO_GOOD_FRAME and final.top_k == ()
    assert final.to_dict()["frame_id"] is None


def test_top_k_sorted_and_only_good_frames():
    cfg = SweepConfig(top_k=3, smoothing_frames=1, min_score=0.5)
    _, final = select([0.1, 0.6, 0.9, 0.4, 0.7, 0.8, 0.55], cfg)
    assert [f.frame_id for f in final.top_k] == [2, 5, 4]
    assert final.top_k[0] == final.best
    _, final = select([0.1, 0.6, 0.2], cfg)
    assert [f.frame_id for f in final.top_k] == [1]


def test_source_metadata_boundaries():
    tracker = SweepTracker(SweepConfig())
    stream = (frames([0.6] * 10, source={"case": "a", "sweep": 0})
              + frames([0.6] * 10, start_id=10, t0=5.0, source={"case": "a", "sweep": 1})  # gap: ignored
              + frames([0.6] * 10, start_id=20, t0=5.4, content=0.0, source={"case": "b", "sweep": 0}))
    events = feed(tracker, stream) + tracker.flush(10.0)
    started, ended = of_type(events, "sweep_started"), of_type(events, "sweep_ended")
    assert [(e.sweep_id, e.case, e.first_frame_id) for e in started] == [(0, "a", 0), (1, "a", 10),
                                                                          (2, "b", 20)]
    assert [e.reason for e in started] == ["source"] * 3
    assert [e.reason for e in ended] == ["source", "source", "end_of_stream"]
    assert [(e.first_frame_id, e.last_frame_id, e.frame_count) for e in ended] == [(0, 9, 10), (10, 19, 10),
                                                                                 (20, 29, 10)]
    assert len(finals(events)) == 3


def test_source_replaying_same_sweep_starts_a_new_one():
    tracker = SweepTracker()
    loop = [FrameInfo(i, i / FPS, 0.6, 1.0, {"case": "a", "sweep": 0, "sweep_frame": i % 140})
            for i in range(280)]
    ended = of_type(feed(tracker, loop) + tracker.flush(10.0), "sweep_ended")
    assert [(e.first_frame_id, e.frame_count) for e in ended] == [(0, 140), (140, 140)]


def test_empty_frames_end_sweep_after_configured_time():
    cfg = SweepConfig(empty_content_threshold=0.05, empty_seconds=0.5)
    stream = (frames([0.6] * 30)
              + frames([0.0] * 9, start_id=30, t0=1.0, content=0.01)  # 0.27 s dip: poor contact, same sweep
              + frames([0.6] * 30, start_id=39, t0=1.3)
              + frames([0.0] * 30, start_id=69, t0=2.3, content=0.0)  # 1 s: probe lifted
              + frames([0.6] * 10, start_id=99, t0=3.3))
    events = feed(SweepTracker(cfg), stream)
    ended = of_type(events, "sweep_ended")
    assert len(ended) == 1 and ended[0].reason == "probe_lifted"
    assert (ended[0].first_frame_id, ended[0].last_frame_id, ended[0].frame_count) == (0, 68, 69)
    assert ended[0].t == pytest.approx(2.3 + 15 / FPS)  # decided once the empty run lasted 0.5 s
    assert of_type(events, "sweep_started")[1].first_frame_id == 99
    # A shorter timeout makes the dip a boundary too.
    short = of_type(feed(SweepTracker(SweepConfig(empty_seconds=0.2)), stream), "sweep_ended")
    assert [e.last_frame_id for e in short] == [29, 68]


def test_timestamp_gap_ends_sweep():
    stream = frames([0.6] * 30) + frames([0.6] * 30, start_id=30, t0=3.0)
    events = feed(SweepTracker(SweepConfig(gap_seconds=1.0)), stream)
    ended = of_type(events, "sweep_ended")
    assert len(ended) == 1 and ended[0].reason == "gap" and ended[0].last_frame_id == 29
    assert of_type(events, "sweep_started")[1].first_frame_id == 30
    assert of_type(feed(SweepTracker(SweepConfig(gap_seconds=5.0)), stream), "sweep_ended") == []


def test_operator_start_stop():
    tracker = SweepTracker()
    events = feed(tracker, frames([0.6] * 10))  # an automatic sweep, until the operator takes over
    events += tracker.command("start", 0.4)
    events += feed(tracker, frames([0.6] * 20, start_id=10, t0=0.5))
    events += feed(tracker, frames([0.6] * 30, start_id=30, t0=1.2, content=0.0))  # no automatic split
    events += tracker.command("stop", 2.5)
    events += feed(tracker, frames([0.9] * 10, start_id=60, t0=2.6))  # ignored: no sweep running
    events += tracker.command("stop", 3.0)  # nothing to stop
    ended = of_type(events, "sweep_ended")
    assert [(e.reason, e.first_frame_id, e.last_frame_id, e.frame_count) for e in ended] == [
        ("operator", 0, 9, 10), ("operator", 10, 59, 50)]
    assert of_type(events, "sweep_started")[1].reason == "operator"
    assert tracker.flush(4.0) == []
    with pytest.raises(ValueError):
        tracker.command("pause", 4.0)


def test_flush_emits_final_then_sweep_ended_once():
    tracker = SweepTracker()
    events = feed(tracker, frames(peak(60, 30, 0.9, 10)))
    assert finals(events) == [] and tracker.sweep_id == 0
    tail = tracker.flush(2.0)
    assert [e.type for e in tail] == ["best_frame", "sweep_ended"]
    assert tail[0].final and tail[0].best is not None and tail[1].reason == "end_of_stream"
    assert tracker.sweep_id is None and tracker.flush(3.0) == []


def test_session_best_across_sweeps_and_reset_per_case():
    tracker = SweepTracker(SweepConfig(smoothing_frames=1))
    events = []
    for i, (case, height) in enumerate([("a", 0.7), ("a", 0.9), ("a", 0.8), ("b", 0.6)]):
        events += feed(tracker, frames(peak(30, 15, height, 5), start_id=30 * i, t0=i,
                                       source={"case": case, "sweep": i}))
    events += tracker.flush(5.0)
    sessions = [e.session_best for e in finals(events)]
    assert [(s.sweep_id, s.frame_id, s.score) for s in sessions] == [
        (0, 15, pytest.approx(0.7)), (1, 45, pytest.approx(0.9)), (1, 45, pytest.approx(0.9)),
        (3, 105, pytest.approx(0.6))]
    assert tracker.session.case == "b"


def test_session_best_rejects_live_events():
    selector = BestFrameSelector(0)
    live = selector.update(FrameInfo(0, 0.0, 0.9))
    with pytest.raises(ValueError):
        SessionBest().add(live)
    assert SessionBest().add(selector.finish()).frame_id == 0
    with pytest.raises(RuntimeError):
        selector.finish()


def test_events_fit_the_event_schema():
    tracker = SweepTracker()
    events = feed(tracker, frames([0.6] * 5)) + tracker.flush(1.0)
    for event in events:
        fields = event.to_dict()
        message = make_event(fields.pop("type"), "run", **fields)
        assert message["sweep_id"] == 0 and isinstance(message["frame_id"], int)
    assert isinstance(events[0], SweepEvent) and events[0].to_dict()["frame_id"] == 0
    assert events[-1].to_dict()["frame_id"] == 4


@pytest.mark.parametrize("bad", [dict(smoothing_frames=0), dict(top_k=0), dict(gap_seconds=0),
                                 dict(hysteresis_margin=-0.1), dict(min_update_interval_frames=0)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        SweepConfig(**bad)


sweep_scores = st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(st.lists(sweep_scores, min_size=1, max_size=5), st.integers(1, 7), st.floats(0.0, 1.0))
def test_one_final_per_sweep_with_max_smoothed_score(sweeps, window, min_score):
    cfg = SweepConfig(smoothing_frames=window, min_score=min_score)
    tracker = SweepTracker(cfg)
    events, frame_id = [], 0
    for k, scores in enumerate(sweeps):
        source = {"case": 0, "sweep": k}
        events += feed(tracker, frames(scores, start_id=frame_id, t0=k * 10.0, source=source))
        frame_id += len(scores)
    events += tracker.flush(100.0)
    by_sweep = {}
    for e in finals(events):
        by_sweep.setdefault(e.sweep_id, []).append(e)
    assert sorted(by_sweep) == list(range(len(sweeps)))
    assert [e.sweep_id for e in of_type(events, "sweep_ended")] == list(range(len(sweeps)))
    for k, scores in enumerate(sweeps):
        (final,) = by_sweep[k]
        top = causal_mean(scores, window).max()
        if top >= min_score:
            assert final.best.score == pytest.approx(top)
            assert all(f.score <= final.best.score for f in final.top_k)
        else:
            assert final.best is None and final.reason == NO_GOOD_FRAME
    for e in lives(events):
        assert e.best.score >= min_score


def test_min_score_comes_from_the_run_else_the_bundle_else_the_default() -> None:
    scores = [0.1, 0.35, 0.2]

    def picked(config: SweepConfig) -> int | None:
        selector = BestFrameSelector(0, config)
        for i, score in enumerate(scores):
            selector.update(FrameInfo(i, i / 30, score))
        final = selector.finish()
        return None if final.best is None else final.best.frame_id

    assert SweepConfig().threshold == 0.5 and picked(SweepConfig()) is None
    assert picked(SweepConfig().for_bundle(0.3)) == 1  # the bundle's operating point
    assert picked(SweepConfig(min_score=0.4).for_bundle(0.3)) is None  # the run's setting wins
    assert SweepConfig().for_bundle(None) == SweepConfig()
