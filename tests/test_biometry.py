"""Biometry on masks drawn with cv2.ellipse, checked against the exact elliptic-integral perimeter."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import ellipe

from pipeline.biometry import (
    HADLOCK_AC_RANGE_MM,
    Ellipse,
    Measurement,
    fit_abdomen,
    hadlock_ga_weeks,
    measure,
    ramanujan_perimeter,
    robust_ac,
)


def exact_perimeter(a: float, b: float) -> float:
    a, b = max(a, b), min(a, b)
    return 4.0 * a * ellipe(1.0 - (b / a) ** 2)


def ellipse_mask(shape, center, axes, angle=0.0) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    cv2.ellipse(m, center, axes, angle, 0, 360, 1, -1)
    return m


def sector_fov(shape=(300, 400)) -> np.ndarray:
    """A fan-shaped field of view with its apex at the top centre, like a curvilinear probe."""
    fov = np.zeros(shape, np.uint8)
    cv2.ellipse(fov, (shape[1] // 2, 0), (290, 290), 0, 20, 160, 1, -1)
    return fov


@pytest.mark.parametrize(
    ("axes", "angle"),
    [((20, 12), 0), ((25, 25), 0), ((40, 25), 30), ((80, 50), 75), ((150, 90), 10), ((120, 115), 135)],
)
def test_fitted_perimeter_within_one_percent(axes, angle):
    fit = fit_abdomen(ellipse_mask((400, 400), (200, 200), axes, angle), min_area_px=10)
    assert fit is not None and not fit.truncated and fit.coverage == 1.0
    assert fit.ellipse.perimeter() == pytest.approx(exact_perimeter(*axes), rel=0.01)
    assert fit.ellipse.a >= fit.ellipse.b
    assert (fit.ellipse.cx, fit.ellipse.cy) == pytest.approx((200, 200), abs=0.5)
    if axes[0] - axes[1] > 5:
        assert (fit.ellipse.angle_deg - angle + 90) % 180 - 90 == pytest.approx(0, abs=1.5)
    assert fit.residual < 0.6


def test_ramanujan_matches_exact():
    assert ramanujan_perimeter(10, 10) == pytest.approx(2 * math.pi * 10)
    assert ramanujan_perimeter(100, 60) == pytest.approx(exact_perimeter(100, 60), rel=1e-4)
    assert Ellipse(0, 0, 100, 60, 0).perimeter() == ramanujan_perimeter(100, 60)


def test_isotropic_spacing_scales_ac():
    m = measure(ellipse_mask((400, 400), (200, 200), (100, 70), 20), (0.3, 0.3))
    assert m.valid and not m.uncalibrated
    assert m.ac_mm == pytest.approx(0.3 * m.ac_px, rel=1e-3)
    assert m.ac_mm == pytest.approx(0.3 * exact_perimeter(100, 70), rel=0.01)


def test_anisotropic_spacing_fits_in_mm():
    # Drawn circle r=100 px; columns are 0.2 mm and rows 0.4 mm, so in mm it is an ellipse 20 x 40.
    m = measure(ellipse_mask((400, 400), (200, 200), (100, 100)), (0.4, 0.2))
    assert m.valid
    assert m.ac_mm == pytest.approx(exact_perimeter(20.0, 40.0), rel=0.01)
    assert m.ac_px == pytest.approx(2 * math.pi * 100, rel=0.01)
    # Rotated: an ellipse 100 x 50 px at 30 deg; compare with the exact perimeter of its image in mm.
    m = measure(ellipse_mask((400, 400), (200, 200), (100, 50), 30), (0.4, 0.2))
    t = math.radians(30)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    shape = np.diag([0.2, 0.4]) @ rot @ np.diag([100.0, 50.0])  # unit circle -> ellipse in mm
    sv = np.linalg.svd(shape, compute_uv=False)
    assert m.ac_mm == pytest.approx(exact_perimeter(sv[0], sv[1]), rel=0.01)


def test_uncalibrated_reports_pixels_and_flag():
    m = measure(ellipse_mask((300, 300), (150, 150), (60, 40)), None)
    assert m.valid and m.uncalibrated and "uncalibrated" in m.flags
    assert m.ac_mm is None and m.ga_weeks is None
    assert m.ac_px == pytest.approx(exact_perimeter(60, 40), rel=0.01)


@pytest.mark.parametrize(
    ("ac_mm", "weeks"),
    [
        (300.0, 8.14 + 22.59 + 3.24),  # 30 cm: 0.753*30 = 22.59, 0.0036*900 = 3.24 -> 33.97
        (200.0, 8.14 + 15.06 + 1.44),  # 20 cm -> 24.64
        (100.0, 8.14 + 7.53 + 0.36),  # 10 cm -> 16.03
        (350.0, 8.14 + 26.355 + 4.41),  # 35 cm -> 38.905
        (60.0, 8.14 + 4.518 + 0.1296),  # 6 cm -> 12.7876
    ],
)
def test_hadlock_by_hand(ac_mm, weeks):
    ga, flag = hadlock_ga_weeks(ac_mm)
    assert flag is None
    assert ga == pytest.approx(weeks, abs=1e-9)


def test_hadlock_range_maps_to_12_and_42_weeks():
    lo, hi = HADLOCK_AC_RANGE_MM
    assert lo == pytest.approx(50.07, abs=0.01) and hi == pytest.approx(380.46, abs=0.01)
    assert hadlock_ga_weeks(lo)[0] == pytest.approx(12.0)
    assert hadlock_ga_weeks(hi)[0] == pytest.approx(42.0)


@pytest.mark.parametrize(
    ("ac_mm", "flag"), [(40.0, "ac_below_hadlock_range"), (400.0, "ac_above_hadlock_range")]
)
def test_hadlock_out_of_range_is_flagged_not_extrapolated(ac_mm, flag):
    assert hadlock_ga_weeks(ac_mm) == (None, flag)
    assert hadlock_ga_weeks(math.nan) == (None, "ac_invalid")


def test_measure_flags_out_of_range_ga():
    # r = 100 px circle at 0.7 mm/px -> AC ~ 440 mm, beyond 42 weeks.
    m = measure(ellipse_mask((300, 300), (150, 150), (100, 100)), (0.7, 0.7))
    assert m.valid and m.ac_mm > HADLOCK_AC_RANGE_MM[1]
    assert m.ga_weeks is None and "ac_above_hadlock_range" in m.flags


def test_empty_mask():
    mask = np.zeros((100, 100), np.uint8)
    assert fit_abdomen(mask) is None
    m = measure(mask, (0.3, 0.3))
    assert m.status == "empty" and not m.valid and m.ac_mm is None


def test_tiny_blob():
    mask = ellipse_mask((100, 100), (50, 50), (4, 3))
    assert fit_abdomen(mask) is None
    assert measure(mask, None).status == "too_small"


def test_mask_outside_fov_is_empty():
    mask = ellipse_mask((100, 100), (20, 20), (10, 10))
    fov = np.zeros((100, 100), bool)
    fov[50:, 50:] = True
    assert measure(mask, None, fov).status == "empty"


def test_several_blobs_largest_wins():
    mask = ellipse_mask((400, 400), (250, 250), (90, 60), 15)
    cv2.ellipse(mask, (60, 60), (30, 20), 0, 0, 360, 1, -1)
    cv2.circle(mask, (350, 40), 10, 1, -1)
    m = measure(mask, (0.3, 0.3))
    assert m.valid and "multiple_blobs" in m.flags
    assert (m.fit.ellipse.cx, m.fit.ellipse.cy) == pytest.approx((250, 250), abs=0.5)
    assert m.ac_px == pytest.approx(exact_perimeter(90, 60), rel=0.01)


@pytest.mark.parametrize("cy", [250, 270])
def test_truncated_by_sector_edge(cy):
    # Ellipse 70 x 45 px cut by the bottom arc of the sector; more than half of it remains visible.
    full = ellipse_mask((300, 400), (200, cy), (70, 45), 10)
    fov = sector_fov()
    m = measure(full * fov, (0.3, 0.3), fov)
    assert m.valid and m.fit.truncated and "truncated" in m.flags
    assert 0.5 < m.fit.coverage < 1.0 and "low_coverage" not in m.flags
    err = abs(m.ac_px / exact_perimeter(70, 45) - 1)
    assert err < 0.03
    # Fitting the whole outline, cut included, does worse than leaving the cut out.
    contours, _ = cv2.findContours(full * fov, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    _, (w, h), _ = cv2.fitEllipse(contours[0])
    assert abs(ramanujan_perimeter(w / 2, h / 2) / exact_perimeter(70, 45) - 1) > err


def test_mostly_cut_contour_is_low_coverage():
    fov = sector_fov()
    m = measure(ellipse_mask((300, 400), (200, 300), (70, 45), 10) * fov, (0.3, 0.3), fov)
    assert m.valid and "truncated" in m.flags and "low_coverage" in m.flags


def test_image_border_counts_as_fov_edge():
    m = measure(ellipse_mask((200, 200), (100, 180), (60, 40)), None)
    assert m.valid and m.fit.truncated
    assert m.ac_px == pytest.approx(exact_perimeter(60, 40), rel=0.03)


def test_fov_inside_blob_does_not_flag_truncation():
    mask = ellipse_mask((300, 400), (200, 150), (60, 40))
    m = measure(mask, None, sector_fov())
    assert m.valid and not m.fit.truncated and "truncated" not in m.flags


def _m(ac_mm: float) -> Measurement:
    return Measurement(status="ok", ac_px=ac_mm / 0.3, ac_mm=ac_mm, spacing_mm=(0.3, 0.3))


def test_robust_ac_median_resists_one_bad_frame():
    frames = [(_m(v), s) for v, s in [(300, 0.9), (302, 0.8), (298, 0.85), (301, 0.7), (150, 0.95)]]
    frames += [(_m(500), 0.1), (Measurement(status="empty"), 0.99)]
    r = robust_ac(frames, k=5)
    assert r.status == "ok" and r.unit == "mm" and r.n_used == 5
    assert r.ac == 300.0
    assert r.used == (4, 0, 2, 1, 3)  # the empty frame is skipped despite its top score
    assert r.iqr == pytest.approx(3.0) and r.mad == pytest.approx(2.0)
    assert r.rel_spread == pytest.approx(0.01)
    assert r.confidence == pytest.approx(0.9)
    assert r.ga_weeks == pytest.approx(33.97)
    json.dumps(r.as_dict())


def test_robust_ac_fewer_valid_frames_than_k():
    frames = [(_m(300), 0.9), (_m(310), 0.5), (Measurement(status="too_small"), 0.8)]
    r = robust_ac(frames, k=5)
    assert r.n_used == 2 and r.ac == pytest.approx(305.0) and "fewer_than_k" in r.flags
    assert r.confidence <= 2 / 5
    assert robust_ac([(Measurement(status="empty"), 1.0)]).status == "no_valid_frames"
    assert robust_ac([]).confidence == 0.0


def test_robust_ac_prefers_calibrated_and_falls_back_to_pixels():
    px_only = Measurement(status="ok", ac_px=1000.0, flags=("uncalibrated",))
    r = robust_ac([(px_only, 0.99), (_m(300), 0.1)])
    assert r.unit == "mm" and r.ac == 300.0
    r = robust_ac([(px_only, 0.99)])
    assert r.unit == "px" and r.ac == 1000.0 and "uncalibrated" in r.flags and r.ga_weeks is None


def test_as_dict_is_json_friendly():
    m = measure(ellipse_mask((300, 300), (150, 150), (80, 50), 40), (0.28, 0.28))
    d = json.loads(json.dumps(m.as_dict()))
    assert d["status"] == "ok" and d["uncalibrated"] is False
    assert set(d["fit"]["ellipse"]) == {"cx", "cy", "a", "b", "angle_deg"}
    assert json.loads(json.dumps(measure(np.zeros((10, 10)), None).as_dict()))["fit"] is None


@settings(max_examples=60, deadline=None)
@given(
    a=st.integers(12, 90),
    ratio=st.floats(0.35, 1.0),
    angle=st.floats(0.0, 180.0),
    dx=st.integers(-20, 20),
    dy=st.integers(-20, 20),
)
def test_property_fitted_semi_axes(a, ratio, angle, dx, dy):
    b = max(8, round(a * ratio))
    fit = fit_abdomen(ellipse_mask((240, 240), (120 + dx, 120 + dy), (a, b), angle), min_area_px=10)
    assert fit is not None and not fit.truncated
    big, small = max(a, b), min(a, b)
    assert abs(fit.ellipse.a - big) <= max(0.02 * big, 1.5)
    assert abs(fit.ellipse.b - small) <= max(0.02 * small, 1.5)
