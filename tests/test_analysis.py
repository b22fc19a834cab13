"""Sweep analysis on a phantom case whose model outputs are its own ground truth (pure logic, no I/O)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.analysis import AnalyzedFrame, SweepAnalyzer, resolve
from pipeline.letterbox import content_fraction, letterbox
from pipeline.phantom import PIXEL_MM, iter_case_frames, make_cases
from pipeline.sweep import FrameInfo, SweepConfig

FRAMES = 40
SCORE_OF_LABEL = {0: 0.05, 1: 0.95, 2: 0.6}


def truth_score(label: int, distance_mm: float) -> float:
    """An ideal scorer: optimal frames highest, then suboptimal ones the closer to the standard plane."""
    closeness = float(np.exp(-0.5 * (distance_mm / 4.0) ** 2))
    return SCORE_OF_LABEL[label] + (0.2 * closeness if label == 2 else 0.0)


@pytest.fixture(scope="module")
def case_frames():
    """Seed 3 with 40 frames per sweep: sweep 2 crosses the optimal plane in exactly one frame."""
    case = make_cases(3, 1, FRAMES)[0]
    frames = []
    for image, sweep, frame, truth in iter_case_frames(case):
        small, geometry = letterbox(image, 224, 1)
        mask, _ = letterbox((truth["mask"] > 0).astype(np.uint8), 224, 1, interpolation="nearest")
        score = truth_score(int(truth["label"]), truth["distance_mm"])
        frames.append((image, sweep, frame, int(truth["label"]), small, geometry, mask, score))
    return case, frames


def analyze(case, frames, *, spacing=(PIXEL_MM, PIXEL_MM), images=True, config=None, noise=0.02):
    analyzer = SweepAnalyzer(config or SweepConfig())
    rng = np.random.default_rng(0)
    findings = []
    for i, (image, sweep, frame, _label, small, geometry, mask, truth) in enumerate(frames):
        source = {"case": case.uid, "sweep": sweep, "sweep_frame": frame}
        score = truth + rng.normal(0, noise)
        info = FrameInfo(i, i / 30, score, content_fraction(small, geometry), source)
        findings += analyzer.add(AnalyzedFrame(info, i, mask, geometry, image.shape, spacing),
                                 image if images else None)
    return analyzer, resolve(findings + analyzer.flush(len(frames) / 30))


def test_each_sweep_gets_started_final_biometry_and_ended_in_order(case_frames):
    case, frames = case_frames
    labels = [f[3] for f in frames]
    _, findings = analyze(case, frames)
    types = [f.type for f in findings]
    assert types.count("sweep_started") == types.count("sweep_ended") == 6
    finals = [f for f in findings if f.type == "best_frame" and f.fields["final"]]
    assert [f.sweep_id for f in finals] == list(range(6))
    for sweep, final in enumerate(finals):
        sweep_labels = labels[sweep * FRAMES:(sweep + 1) * FRAMES]
        if 1 in sweep_labels:
            assert labels[final.frame_id] == 1  # the single optimal frame
        if final.frame_id is None:
            assert max(sweep_labels) == 0 and final.fields["reason"] == "no good frame"
        # Nothing about a sweep after its sweep_ended.
        ended = types.index("sweep_ended", findings.index(final))
        assert all(f.sweep_id != sweep for f in findings[ended + 1:])


def test_final_biometry_matches_the_phantom_truth_and_images_are_full_resolution(case_frames):
    case, frames = case_frames
    _, findings = analyze(case, frames)
    finals = {f.sweep_id: f for f in findings if f.type == "best_frame" and f.fields["final"] and f.frame_id}
    biometry = [f for f in findings if f.type == "biometry" and f.fields["final"]]
    assert biometry and {b.sweep_id for b in biometry} == set(finals)
    optimal_sweeps = {f[1] for f in frames if f[3] == 1}
    assert optimal_sweeps <= set(finals)
    for b in biometry:
        assert b.fields["method"] == "median_top_k" and b.fields["unit"] == "mm"
        if b.sweep_id in optimal_sweeps:  # the reference AC is that of a sweep with an optimal frame
            assert b.fields["ac_mm"] == pytest.approx(case.fetus.ac_mm, rel=0.02)
        assert b.fields["ga_weeks"] is not None and not b.fields["uncalibrated"]
        assert b.fields["frames"][0] == b.frame_id == finals[b.sweep_id].frame_id
        images = finals[b.sweep_id].images
        assert images["frame"].shape == images["mask"].shape == frames[0][0].shape
        assert set(np.unique(images["mask"])) <= {0, 255}
        truth = frames[b.frame_id][6]  # the model-resolution mask; the full one must cover the same area
        ratio = (images["mask"] > 0).sum() / (truth.sum() * (frames[0][0].shape[1] / 224) ** 2)
        assert ratio == pytest.approx(1.0, rel=0.05)


def test_without_pixel_spacing_biometry_is_in_pixels_and_flagged(case_frames):
    case, frames = case_frames
    _, findings = analyze(case, frames, spacing=None)
    biometry = [f for f in findings if f.type == "biometry" and f.fields["final"]]
    optimal_sweeps = {f[1] for f in frames if f[3] == 1}
    assert optimal_sweeps <= {b.sweep_id for b in biometry}
    for b in biometry:
        assert b.fields["uncalibrated"] and b.fields["ac_mm"] is None and b.fields["ga_weeks"] is None
        assert b.fields["unit"] == "px" and "uncalibrated" in b.fields["flags"]
        if b.sweep_id in optimal_sweeps:
            assert b.fields["ac_px"] == pytest.approx(case.fetus.ac_mm / PIXEL_MM, rel=0.02)


def test_lost_ring_slots_cost_the_best_frame_image_not_the_result(case_frames):
    case, frames = case_frames
    analyzer, findings = analyze(case, frames, images=False)
    finals = [f for f in findings if f.type == "best_frame" and f.fields["final"] and f.frame_id is not None]
    assert finals and all("frame" not in f.images and "mask" in f.images for f in finals)
    assert analyzer.images_missed == len(finals)


def test_operator_commands_override_source_sweeps(case_frames):
    case, frames = case_frames
    analyzer = SweepAnalyzer()
    findings = []
    for i, (image, sweep, _frame, label, _small, geometry, mask, _score) in enumerate(frames[:100]):
        if i == 10:
            findings += analyzer.command("start", i / 30)
        if i == 90:
            findings += analyzer.command("stop", i / 30)
        info = FrameInfo(i, i / 30, SCORE_OF_LABEL[label], 1.0, {"case": case.uid, "sweep": sweep})
        findings += analyzer.add(AnalyzedFrame(info, i, mask, geometry, image.shape, None), image)
    findings = resolve(findings + analyzer.flush(100 / 30))
    operated = [f for f in findings if f.type in ("sweep_started", "sweep_ended")
                and f.fields["reason"] == "operator"]
    # `start` ends the source's sweep at frame 9 and opens one at frame 10 that only `stop` ends, although
    # the source's sweep changes at frame 40 and 80.
    assert [(f.type, f.frame_id) for f in operated] == [
        ("sweep_ended", 9), ("sweep_started", 10), ("sweep_ended", 89)]
    assert operated[-1].fields["frame_count"] == 80
    assert not [f for f in findings if f.type == "sweep_started" and f.frame_id > 10]
