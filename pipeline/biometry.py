"""Abdominal-circumference biometry from a segmentation mask (pure logic, no I/O).

Pipeline per frame: largest blob of the mask -> boundary points -> least-squares ellipse
(``cv2.fitEllipse``, the same fitter the ACOUSLIC-AI evaluation uses) -> perimeter by
Ramanujan's first approximation -> millimetres through the pixel spacing -> gestational age
by Hadlock (1984) from AC.  Per sweep, :func:`robust_ac` takes the median over the
best-scored frames so that one bad segmentation cannot move the reported AC.

Sector-edge truncation.  The ACOUSLIC-AI evaluation (DIAGNijmegen/ACOUSLIC-AI-evaluation-method,
``src/acouslicaieval/ellipse_fitting.py``) multiplies the predicted mask by the fixed FOV mask,
zero-pads both by 200 px, draws the 1-px outline of the FOV and of the mask, drops the mask
outline pixels that lie on the FOV outline, fits ``cv2.fitEllipse`` to the largest remaining
outline piece and reports the Ramanujan perimeter of that ellipse, so an abdomen cut by the
sector edge is extrapolated to a full ellipse rather than measured along the cut.  We do the
same in spirit: the mask is clipped to the FOV, boundary points within 1 px of the FOV edge
(the image border counts as an edge) are left out of the fit, and the result is flagged
``truncated``; ``coverage`` (visible arc / fitted perimeter) below one half adds
``low_coverage`` because the extrapolation is then poorly constrained.  One difference, on
purpose: we keep every visible boundary point rather than only the longest visible arc (and
drop points within 1 px of the FOV edge where they drop about 3 px), so a truncated abdomen can
measure slightly differently from the official code.

The fit goes through the centres of the outline pixels, as in the ACOUSLIC code and as
``cv2.ellipse`` draws (the pixel at distance a from the centre is inside).  If a mask marks
the pixels whose centres fall inside the abdomen, the true edge is on average half a pixel
further out, so AC reads ~pi px short (~0.9 mm at 0.28 mm/px, 0.3 % of a 300 mm AC).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

# Hadlock FP et al., Radiology 1984;152:497-501: GA (weeks) = 8.14 + 0.753 AC + 0.0036 AC^2, AC in cm.
_HADLOCK = (8.14, 0.753, 0.0036)
# The regression was fitted on fetuses of about 12 to 42 weeks; outside that we refuse to extrapolate.
HADLOCK_GA_RANGE_WEEKS = (12.0, 42.0)

DEFAULT_MIN_AREA_PX = 200
# Below this fraction of the fitted perimeter actually seen, a truncated fit is an extrapolation.
MIN_COVERAGE = 0.5
# Relative IQR of the top-k ACs at which robust_ac's confidence reaches 0 (10 %, about twice the
# inter-observer variability usually quoted for manual AC).
_REL_SPREAD_ZERO_CONFIDENCE = 0.10


def _hadlock_ac_cm_for(ga_weeks: float) -> float:
    """Invert Hadlock's quadratic (positive root) so the AC range follows from the GA range."""
    c0, c1, c2 = _HADLOCK
    return (-c1 + math.sqrt(c1 * c1 - 4.0 * c2 * (c0 - ga_weeks))) / (2.0 * c2)


# About 5.0 cm to 38.1 cm: the AC interval that the formula maps onto 12-42 weeks.
HADLOCK_AC_RANGE_MM = tuple(10.0 * _hadlock_ac_cm_for(w) for w in HADLOCK_GA_RANGE_WEEKS)


def ramanujan_perimeter(a: float, b: float) -> float:
    """Ellipse perimeter from semi-axes a, b (Ramanujan I; error < 0.5 % up to b/a = 0.1)."""
    return math.pi * (3.0 * (a + b) - math.sqrt((3.0 * a + b) * (a + 3.0 * b)))


def hadlock_ga_weeks(ac_mm: float) -> tuple[float | None, str | None]:
    """GA in weeks from AC in mm, or (None, flag) outside the range the formula was fitted on."""
    lo, hi = HADLOCK_AC_RANGE_MM
    if not math.isfinite(ac_mm):
        return None, "ac_invalid"
    if ac_mm < lo:
        return None, "ac_below_hadlock_range"
    if ac_mm > hi:
        return None, "ac_above_hadlock_range"
    c0, c1, c2 = _HADLOCK
    ac_cm = ac_mm / 10.0
    return c0 + c1 * ac_cm + c2 * ac_cm * ac_cm, None


@dataclass(frozen=True)
class Ellipse:
    """Ellipse with semi-axes a >= b, centre (cx, cy) and major-axis angle from +x, in fit units."""

    cx: float
    cy: float
    a: float
    b: float
    angle_deg: float

    def perimeter(self) -> float:
        return ramanujan_perimeter(self.a, self.b)

    def as_dict(self) -> dict[str, float]:
        return {"cx": self.cx, "cy": self.cy, "a": self.a, "b": self.b, "angle_deg": self.angle_deg}


@dataclass(frozen=True)
class EllipseFit:
    """An ellipse fitted to a mask boundary, with what is needed to judge it.

    ``residual`` is the RMS radial distance of the fitted points to the ellipse, in fit units;
    ``coverage`` is the visible boundary length over the fitted perimeter (1 when untruncated).
    """

    ellipse: Ellipse
    area_px: float
    truncated: bool
    coverage: float
    residual: float
    n_points: int

    def as_dict(self) -> dict:
        return {
            "ellipse": self.ellipse.as_dict(),
            "area_px": self.area_px,
            "truncated": self.truncated,
            "coverage": self.coverage,
            "residual": self.residual,
            "n_points": self.n_points,
        }


@dataclass(frozen=True)
class _Boundary:
    points: np.ndarray  # (n, 2) float64 x, y: centres of the blob's outline pixels, closed order
    keep: np.ndarray  # (n,) bool: not on the FOV edge
    area_px: float
    n_blobs: int


def _boundary(mask: np.ndarray, fov: np.ndarray | None, min_area_px: int) -> tuple[_Boundary | None, str]:
    """Largest blob's boundary, or (None, reason) when there is nothing measurable."""
    m = np.asarray(mask) != 0
    if fov is not None:
        fov_b = np.asarray(fov) != 0
        if fov_b.shape != m.shape:
            raise ValueError(f"fov shape {fov_b.shape} != mask shape {m.shape}")
    else:
        fov_b = np.ones_like(m)
    m &= fov_b
    if not m.any():
        return None, "empty"
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    areas = [cv2.contourArea(c) for c in contours]
    best = int(np.argmax(areas))
    if areas[best] < min_area_px:
        return None, "too_small"
    pts = contours[best].reshape(-1, 2).astype(np.float64)
    # Padding makes the image border part of the FOV edge: nothing is known beyond it either.
    fov_pad = np.pad(fov_b.astype(np.uint8), 1)
    edge = fov_pad.astype(bool) & ~cv2.erode(fov_pad, np.ones((3, 3), np.uint8)).astype(bool)
    near_edge = cv2.dilate(edge.astype(np.uint8), np.ones((3, 3), np.uint8))[1:-1, 1:-1].astype(bool)
    ix = pts.astype(np.intp)
    keep = ~near_edge[ix[:, 1], ix[:, 0]]
    return _Boundary(pts, keep, float(areas[best]), len(contours)), "ok"


def _fit(points: np.ndarray, keep: np.ndarray, area_px: float) -> EllipseFit | None:
    """Fit an ellipse to the kept points (already in fit units); None if degenerate."""
    used = points[keep]
    if len(used) < 5:
        return None
    (cx, cy), (w, h), angle = cv2.fitEllipse(used.astype(np.float32))
    a, b = w / 2.0, h / 2.0
    if not (math.isfinite(a) and math.isfinite(b)) or min(a, b) <= 0:
        return None
    if b > a:  # cv2 reports the axis along `angle` first; normalise to a >= b
        a, b, angle = b, a, angle + 90.0
    ellipse = Ellipse(float(cx), float(cy), float(a), float(b), float(angle % 180.0))
    # Radial distance of each point to the ellipse along the ray from the centre.
    t = math.radians(ellipse.angle_deg)
    d = used - (cx, cy)
    u = d[:, 0] * math.cos(t) + d[:, 1] * math.sin(t)
    v = -d[:, 0] * math.sin(t) + d[:, 1] * math.cos(t)
    r = np.hypot(u / a, v / b)
    rho = np.hypot(u, v)
    radial = np.where(r > 0, rho * (1.0 - 1.0 / np.maximum(r, 1e-12)), 0.0)
    # Visible arc: steps of the closed boundary whose two ends were both kept.
    steps = np.linalg.norm(np.roll(points, -1, axis=0) - points, axis=1)
    seen = float(steps[keep & np.roll(keep, -1)].sum())
    truncated = not bool(keep.all())
    coverage = min(1.0, seen / ellipse.perimeter()) if truncated else 1.0
    return EllipseFit(
        ellipse=ellipse,
        area_px=area_px,
        truncated=truncated,
        coverage=coverage,
        residual=float(np.sqrt(np.mean(radial**2))),
        n_points=len(used),
    )


def fit_abdomen(
    mask: np.ndarray, fov: np.ndarray | None = None, *, min_area_px: int = DEFAULT_MIN_AREA_PX
) -> EllipseFit | None:
    """Ellipse (pixel units) of the largest blob; None when empty, tiny or unfittable.

    :func:`measure` gives the reason for a None as its ``status``.
    """
    boundary, _ = _boundary(mask, fov, min_area_px)
    if boundary is None:
        return None
    return _fit(boundary.points, boundary.keep, boundary.area_px)


@dataclass(frozen=True)
class Measurement:
    """One frame's AC.  ``status`` is "ok", "empty", "too_small" or "fit_failed".

    ``ac_px`` is the perimeter of the pixel-space ellipse; ``ac_mm`` is set only when a pixel
    spacing was given (else the ``uncalibrated`` flag is raised), and comes from a fit on
    spacing-scaled points so anisotropic pixels are handled exactly.
    """

    status: str
    ac_px: float | None = None
    ac_mm: float | None = None
    ga_weeks: float | None = None
    spacing_mm: tuple[float, float] | None = None
    fit: EllipseFit | None = None
    flags: tuple[str, ...] = field(default=())

    @property
    def valid(self) -> bool:
        return self.status == "ok"

    @property
    def uncalibrated(self) -> bool:
        return self.spacing_mm is None

    def as_dict(self) -> dict:
        return {
            "status": self.status,
            "ac_px": self.ac_px,
            "ac_mm": self.ac_mm,
            "ga_weeks": self.ga_weeks,
            "uncalibrated": self.uncalibrated,
            "spacing_mm": list(self.spacing_mm) if self.spacing_mm is not None else None,
            "fit": self.fit.as_dict() if self.fit is not None else None,
            "flags": list(self.flags),
        }


def measure(
    mask: np.ndarray,
    spacing_mm: tuple[float, float] | None,
    fov: np.ndarray | None = None,
    *,
    min_area_px: int = DEFAULT_MIN_AREA_PX,
) -> Measurement:
    """AC (and GA when calibrated) of one frame's mask.

    ``spacing_mm`` is (row, column) = (dy, dx) in mm per pixel, as in DICOM PixelSpacing.
    """
    if spacing_mm is not None:
        dy, dx = (float(s) for s in spacing_mm)
        if not (dy > 0 and dx > 0):
            raise ValueError(f"pixel spacing must be positive, got {spacing_mm}")
        spacing_mm = (dy, dx)
    flags: list[str] = [] if spacing_mm is not None else ["uncalibrated"]
    boundary, reason = _boundary(mask, fov, min_area_px)
    if boundary is None:
        return Measurement(status=reason, spacing_mm=spacing_mm, flags=tuple(flags))
    fit_px = _fit(boundary.points, boundary.keep, boundary.area_px)
    if fit_px is None:
        return Measurement(status="fit_failed", spacing_mm=spacing_mm, flags=tuple(flags))
    if boundary.n_blobs > 1:
        flags.append("multiple_blobs")
    if fit_px.truncated:
        flags.append("truncated")
        if fit_px.coverage < MIN_COVERAGE:
            flags.append("low_coverage")
    ac_mm = ga = None
    if spacing_mm is not None:
        fit_mm = _fit(boundary.points * (spacing_mm[1], spacing_mm[0]), boundary.keep, boundary.area_px)
        if fit_mm is None:
            return Measurement(status="fit_failed", spacing_mm=spacing_mm, flags=tuple(flags))
        ac_mm = fit_mm.ellipse.perimeter()
        ga, ga_flag = hadlock_ga_weeks(ac_mm)
        if ga_flag is not None:
            flags.append(ga_flag)
    return Measurement(
        status="ok",
        ac_px=fit_px.ellipse.perimeter(),
        ac_mm=ac_mm,
        ga_weeks=ga,
        spacing_mm=spacing_mm,
        fit=fit_px,
        flags=tuple(flags),
    )


@dataclass(frozen=True)
class RobustAC:
    """Sweep-level AC: median of the top-k scored valid frames and how much they agree.

    ``ac`` is in ``unit`` ("mm", or "px" when no used frame was calibrated).  ``iqr`` and ``mad``
    are in the same unit; ``rel_spread`` = IQR / median.  ``confidence`` =
    clip(1 - rel_spread / 0.10, 0, 1) * n_used / k: a 10 % relative IQR, or no frames, gives 0,
    and a sweep with fewer valid frames than k cannot reach full confidence.
    ``used`` holds indices into the input sequence, best score first.
    """

    status: str
    k: int
    n_used: int = 0
    ac: float | None = None
    unit: str | None = None
    iqr: float | None = None
    mad: float | None = None
    rel_spread: float | None = None
    confidence: float = 0.0
    ga_weeks: float | None = None
    used: tuple[int, ...] = ()
    flags: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {
            "status": self.status,
            "k": self.k,
            "n_used": self.n_used,
            "ac": self.ac,
            "unit": self.unit,
            "iqr": self.iqr,
            "mad": self.mad,
            "rel_spread": self.rel_spread,
            "confidence": self.confidence,
            "ga_weeks": self.ga_weeks,
            "used": list(self.used),
            "flags": list(self.flags),
        }


def robust_ac(measurements_with_scores: Sequence[tuple[Measurement, float]], k: int = 5) -> RobustAC:
    """Median AC over the k best-scored valid frames, with their spread as the confidence.

    Calibrated frames are preferred over uncalibrated ones so that mm and px never mix.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    valid = [(i, m, float(s)) for i, (m, s) in enumerate(measurements_with_scores) if m.valid]
    calibrated = [v for v in valid if v[1].ac_mm is not None]
    pool = calibrated or valid
    if not pool:
        return RobustAC(status="no_valid_frames", k=k)
    top = sorted(pool, key=lambda v: -v[2])[:k]
    unit = "mm" if calibrated else "px"
    values = np.array([m.ac_mm if calibrated else m.ac_px for _, m, _ in top], dtype=np.float64)
    median = float(np.median(values))
    q1, q3 = np.percentile(values, [25.0, 75.0])
    iqr = float(q3 - q1)
    mad = float(np.median(np.abs(values - median)))
    rel = iqr / median if median > 0 else math.inf
    confidence = max(0.0, 1.0 - rel / _REL_SPREAD_ZERO_CONFIDENCE) * len(top) / k
    flags: list[str] = []
    if unit == "px":
        flags.append("uncalibrated")
    if len(top) < k:
        flags.append("fewer_than_k")
    if any(m.fit is not None and m.fit.truncated for _, m, _ in top):
        flags.append("truncated")
    ga = None
    if unit == "mm":
        ga, ga_flag = hadlock_ga_weeks(median)
        if ga_flag is not None:
            flags.append(ga_flag)
    return RobustAC(
        status="ok",
        k=k,
        n_used=len(top),
        ac=median,
        unit=unit,
        iqr=iqr,
        mad=mad,
        rel_spread=rel,
        confidence=float(confidence),
        ga_weeks=ga,
        used=tuple(i for i, _, _ in top),
        flags=tuple(flags),
    )
