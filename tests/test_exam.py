"""Exam summaries (pure): the combination rule, when an exam ends, and the annotated pictures."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.analysis import Finding
from pipeline.annotate import ANNOTATED, ELLIPSE_BGR, annotate, ga_text, with_annotations
from pipeline.biometry import hadlock_ga_weeks
from pipeline.exam import EXAM_DISAGREEMENT, ExamTracker, SweepAC, combine, weighted_median


def _sweep(sweep_id: int, ac: float | None, confidence: float, status: str = "ok") -> SweepAC:
    return SweepAC(sweep_id, 100 + sweep_id, 0.9, ac, None, confidence, status)


def test_weighted_median_follows_the_weights() -> None:
    assert weighted_median([1, 2, 3], [1, 1, 1]) == 2
    assert weighted_median([1, 2, 3], [0.1, 0.1, 5]) == 3
    assert weighted_median([1, 3], [1, 1]) == 2  # an exact half: the mean of the two around it


def test_combined_ac_is_the_confidence_weighted_median_with_its_spread() -> None:
    combined = combine([_sweep(0, 250.0, 0.6), _sweep(1, 255.0, 0.9), _sweep(2, 320.0, 0.1),
                        _sweep(3, None, 0.0, "empty")])
    assert combined.ac_mm == 255.0  # the unsure outlier does not move it
    assert combined.used == (0, 1, 2)
    assert combined.spread_mm == pytest.approx((0.6 * 5 + 0.1 * 65) / 1.6, abs=1e-3)
    assert combined.disagreement == pytest.approx(65 / 255, abs=1e-4)
    assert "sweeps_disagree" in combined.flags
    assert combined.ga_weeks == pytest.approx(hadlock_ga_weeks(255.0)[0], abs=1e-3)


def test_sweeps_within_the_bound_agree_and_zero_confidences_count_equally() -> None:
    close = combine([_sweep(0, 250.0, 0.0), _sweep(1, 250.0 * (1 + EXAM_DISAGREEMENT / 2), 0.0),
                     _sweep(2, 252.0, 0.0)])
    assert close.ac_mm == 252.0 and "sweeps_disagree" not in close.flags
    assert combine([_sweep(0, 250.0, 0.5)]).flags == ("single_sweep",)
    nothing = combine([_sweep(0, None, 0.0, "no_valid_frames")])
    assert nothing.ac_mm is None and nothing.flags == ("no_measurement",)


def _events(sweep_id: int, case: str, ac: float) -> list[dict]:
    return [{"type": "sweep_started", "sweep_id": sweep_id, "case": case, "frame_id": sweep_id * 10},
            {"type": "best_frame", "sweep_id": sweep_id, "final": True, "frame_id": sweep_id * 10 + 5,
             "raw_score": 0.9, "annotated_png": f"best/sweep-{sweep_id:04d}-annotated.png"},
            {"type": "biometry", "sweep_id": sweep_id, "final": True, "status": "ok", "unit": "mm",
             "ac_mm": ac, "ga_weeks": 30.0, "confidence": 0.8},
            {"type": "sweep_ended", "sweep_id": sweep_id, "case": case}]


def test_an_exam_ends_with_its_case_after_its_last_sweep_has_ended() -> None:
    tracker = ExamTracker()
    a0, a1, b2 = _events(0, "A", 250.0), _events(1, "A", 254.0), _events(2, "B", 300.0)
    out = [s for e in [*a0, a1[0], a1[1]] for s in tracker.observe(e)]
    assert out == []
    # Case B starts while A's second sweep still waits for its final (refinement): A is summed up only
    # once that sweep has ended, and with its final in it.
    assert tracker.observe(b2[0]) == []
    assert tracker.observe(a1[2]) == []
    (summary,) = tracker.observe(a1[3])
    assert summary["case"] == "A" and summary["reason"] == "case_changed" and summary["exam"] == 1
    assert [s["sweep_id"] for s in summary["sweeps"]] == [0, 1]
    assert summary["ac_mm"] == 252.0 and summary["rule"] == "confidence_weighted_median"
    assert summary["sweeps"][1]["annotated_png"] == "best/sweep-0001-annotated.png"
    for event in b2[1:]:
        assert tracker.observe(event) == []
    (last,) = tracker.end("end_of_stream")
    assert last["case"] == "B" and last["exam"] == 2 and last["ac_mm"] == 300.0
    assert tracker.end("end_of_stream") == []


def test_the_operator_ends_an_exam_and_the_next_sweep_opens_another() -> None:
    tracker = ExamTracker()
    first = _events(0, None, 250.0)
    for event in first[:3]:
        tracker.observe(event)
    assert tracker.end("operator") == []  # its sweep is still open
    (summary,) = tracker.observe(first[3])
    assert summary["reason"] == "operator" and summary["exam"] == 1
    for event in _events(1, None, 260.0):
        tracker.observe(event)
    (second,) = tracker.end("end_of_stream")
    assert second["exam"] == 2 and [s["sweep_id"] for s in second["sweeps"]] == [1]


def _phantom_like_frame() -> tuple[np.ndarray, dict]:
    frame = np.zeros((300, 400), dtype=np.uint8)
    frame[40:280, 60:360] = 90  # the sector's picture, black around it
    ellipse = {"cx": 200.0, "cy": 160.0, "a": 80.0, "b": 50.0, "angle_deg": 20.0}
    cv2.ellipse(frame, (200, 160), (80, 50), 20, 0, 360, 200, -1)
    return frame, ellipse


def test_an_annotated_best_frame_is_cropped_with_the_ellipse_drawn_and_a_banner() -> None:
    frame, ellipse = _phantom_like_frame()
    biometry = {"status": "ok", "unit": "mm", "ac_mm": 203.4, "ga_weeks": 24.5, "confidence": 0.8,
                "ellipse": ellipse}
    picture = annotate(frame, sweep_id=3, frame_id=203, score=0.91, biometry=biometry)
    width = 300 + 2 * 8  # the sector's 300 columns and the margin
    assert picture.shape[1] == width and picture.ndim == 3
    banner = picture.shape[0] - (240 + 2 * 8)
    assert 20 < banner < 120
    amber = np.all(np.abs(picture.astype(int) - ELLIPSE_BGR) < 40, axis=2)
    # On the ellipse: the point at the end of its major axis, moved into the crop and below the banner.
    x = 200 + 80 * np.cos(np.radians(20)) - 60 + 8
    y = 160 + 80 * np.sin(np.radians(20)) - 40 + 8 + banner
    assert amber[int(round(y)) - 2:int(round(y)) + 3, int(round(x)) - 2:int(round(x)) + 3].any()
    assert not amber[banner + 10, 10]  # not in the corner


def test_with_annotations_draws_a_final_with_the_biometry_that_follows_it() -> None:
    frame, ellipse = _phantom_like_frame()
    final = Finding("best_frame", 1, 203, None, {"final": True, "raw_score": 0.9}, images={"frame": frame})
    live = Finding("best_frame", 2, 300, None, {"final": False}, images={"frame": frame})
    biometry = Finding("biometry", 1, 203, None, {"final": True, "status": "ok", "unit": "mm",
                                                   "ac_mm": 210.0, "ga_weeks": 25.0, "confidence": 1.0,
                                                   "ellipse": ellipse})
    with_annotations([final, biometry, live])
    assert ANNOTATED in final.images and ANNOTATED not in live.images
    drawn = np.all(np.abs(final.images[ANNOTATED].astype(int) - ELLIPSE_BGR) < 40, axis=2)
    assert drawn.sum() > 100


def test_ga_is_written_in_weeks_and_days() -> None:
    assert ga_text(28.43) == "GA 28w 3d"
    assert ga_text(None) == "GA -"


def test_a_restarted_postprocess_takes_its_open_exams_back_from_the_journal(tmp_path) -> None:
    import zmq

    from pipeline.events import EventSink, read_journal
    from pipeline.exam import ExamRecorder

    path = tmp_path / "events.jsonl"
    context = zmq.Context()

    def life() -> ExamRecorder:
        return ExamRecorder(EventSink(context, "tcp://127.0.0.1:*", path), "run", tmp_path, None)
    try:
        first = life()
        for event in [*_events(0, "A", 250.0), *_events(1, "B", 260.0)[:2]]:
            first.emit(event)
        first.close()  # the process dies here, with case B's sweep open
        journal = read_journal(path)
        assert [e["exam"] for e in journal if e["type"] == "exam_summary"] == [1]
        second = life()
        second.replay(journal)
        assert read_journal(path) == journal  # nothing published twice
        for event in _events(1, "B", 260.0)[2:]:
            second.emit(event)
        second.finish()
        second.close()
    finally:
        context.term()
    summaries = [e for e in read_journal(path) if e["type"] == "exam_summary"]
    assert [(e["exam"], e["case"], e["ac_mm"]) for e in summaries] == [(1, "A", 250.0), (2, "B", 260.0)]
