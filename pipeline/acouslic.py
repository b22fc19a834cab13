"""ACOUSLIC-AI challenge metrics, per case and aggregated (pure logic, no file I/O).

The rules follow the official evaluation (DIAGNijmegen/ACOUSLIC-AI-evaluation-method:
``evaluate.py``, ``src/acouslicaieval/evaluation.py``, ``src/acouslicaieval/ellipse_fitting.py``);
the code here is our own.

* **WFSS** (``compute_wfss``): a case whose ground truth has no annotation at all scores 0, whatever
  was chosen; otherwise frame -1 scores 0; a frame holding an optimal label (1) scores 1; a frame
  holding a suboptimal label (2) scores 1 when the case has no optimal frame anywhere and 0.6 when it
  has one; any other frame scores 0.
* **NAE of AC** (``evaluate.py``): ``|ref - pred| / max(ref, pred, 1e-6)`` (the larger of the two,
  not the reference alone), with ref the reference AC of the sweep that holds the chosen frame.
  NAE is 1 when no AC can be measured on the prediction (frame -1, empty or unfittable mask) or when
  that sweep has no reference AC.  Sweeps are fixed blocks of 140 frames.
* **AC of the prediction** (``ellipse_fitting.py``): mask times FOV mask, contour points on the FOV
  edge dropped, ``cv2.fitEllipse``, Ramanujan I perimeter, times 0.28 mm/px.  We measure with
  :func:`pipeline.biometry.measure`, which implements the same method (see its docstring).
* **Soft Dice** (``FetalAbdomenSegmentationEval.score_case``): prediction and ground-truth frame are
  binarised and multiplied by the FOV mask.  If the chosen ground-truth frame is annotated, or the
  prediction is empty, DSC_soft is the plain Dice.  If the ground-truth frame is empty and the
  prediction is not, the nearest annotated frame within +-15 frames *in the same sweep* is used:
  the previous one is preferred whenever there is one (the official search takes the nearest
  previous annotated frame if any, else the nearest next one), and
  ``DSC_soft = Dice(gt[nearest], pred) * (1 - |nearest - frame| / 15)``; no such frame -> 0.
  The official code does not FOV-mask that neighbour's ground truth; neither do we.
* **Score**: ``0.5 (1 - NAE) + 0.25 WFSS + 0.25 DSC_soft`` over the case means.

Our choices where the official code is undefined: Dice of two empty masks is 0 (SimpleITK returns
inf or NaN there), and frame -1 gets DSC_soft 0 (the official code would index the *last* frame).
Frame-level F1 (not part of the challenge) treats optimal or suboptimal as positive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from pipeline import biometry

PIXEL_SPACING_MM = 0.28
FRAMES_PER_SWEEP = 140
MAX_FRAME_TOLERANCE = 15
OPTIMAL = 1
SUBOPTIMAL = 2
WFSS_SUBOPTIMAL = 0.6
NO_FRAME = -1


def ranking_score(nae: float, wfss: float, dsc_soft: float) -> float:
    """The challenge's ranking score: 0.5 (1 - NAE) + 0.25 WFSS + 0.25 DSC_soft."""
    return 0.5 * (1.0 - nae) + 0.25 * wfss + 0.25 * dsc_soft


def sweep_of(frame: int, frames_per_sweep: int = FRAMES_PER_SWEEP) -> int | None:
    """0-based sweep index of a frame (fixed blocks), None for frame -1."""
    if frame < 0:
        return None
    return frame // frames_per_sweep


def frame_labels(gt_masks: np.ndarray) -> np.ndarray:
    """Per-frame label of a (F, H, W) mask stack: 1 if any optimal pixel, else 2 if any suboptimal, else 0."""
    gt = np.asarray(gt_masks)
    flat = gt.reshape(gt.shape[0], -1)
    has_opt = (flat == OPTIMAL).any(axis=1)
    has_sub = (flat == SUBOPTIMAL).any(axis=1)
    return np.where(has_opt, OPTIMAL, np.where(has_sub, SUBOPTIMAL, 0)).astype(np.uint8)


def compute_wfss(gt_masks: np.ndarray, frame: int) -> float:
    """Weighted frame selection score of the chosen frame (-1 for none); rules in the module docstring."""
    labels = frame_labels(gt_masks)
    if frame != NO_FRAME and not 0 <= frame < len(labels):
        raise ValueError(f"frame {frame} out of range [0, {len(labels)})")
    if not labels.any() or frame == NO_FRAME:
        return 0.0
    case_has_optimal = bool((labels == OPTIMAL).any())
    label = int(labels[frame])
    if label == OPTIMAL:
        return 1.0
    if label == SUBOPTIMAL:
        return WFSS_SUBOPTIMAL if case_has_optimal else 1.0
    return 0.0


def nae(pred_ac_mm: float | None, ref_ac_mm: float | None) -> float:
    """Normalised absolute error as the challenge computes it; 1 when either AC is missing."""
    if pred_ac_mm is None or ref_ac_mm is None:
        return 1.0
    if not (math.isfinite(pred_ac_mm) and math.isfinite(ref_ac_mm)):
        return 1.0
    return abs(ref_ac_mm - pred_ac_mm) / max(ref_ac_mm, pred_ac_mm, 1e-6)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks (non-zero = foreground); 0 when both are empty."""
    a = np.asarray(a) != 0
    b = np.asarray(b) != 0
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 0.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def nearest_annotated_frame(
    gt_masks: np.ndarray,
    frame: int,
    frames_per_sweep: int = FRAMES_PER_SWEEP,
    tolerance: int = MAX_FRAME_TOLERANCE,
) -> int | None:
    """Annotated frame near ``frame`` in its sweep, as the official search picks it.

    Within ``tolerance`` frames and the same sweep: the nearest previous annotated frame if there
    is one, otherwise the nearest next one; None if neither exists.
    """
    gt = np.asarray(gt_masks)
    sweep = frame // frames_per_sweep
    start = max(sweep * frames_per_sweep, frame - tolerance)
    end = min((sweep + 1) * frames_per_sweep, frame + tolerance + 1, gt.shape[0])
    for f in range(frame - 1, start - 1, -1):
        if gt[f].any():
            return f
    for f in range(frame + 1, end):
        if gt[f].any():
            return f
    return None


@dataclass(frozen=True)
class SoftDice:
    dsc: float  # Dice against the chosen frame's ground truth
    dsc_nearest: float  # Dice against the frame actually compared (the chosen one unless a neighbour)
    nearest_frame: int | None  # the ground-truth frame compared; None for frame -1
    dsc_soft: float


def soft_dice(
    gt_masks: np.ndarray,
    pred_mask: np.ndarray,
    frame: int,
    fov: np.ndarray,
    frames_per_sweep: int = FRAMES_PER_SWEEP,
    tolerance: int = MAX_FRAME_TOLERANCE,
) -> SoftDice:
    """Soft Dice of the chosen frame's predicted mask (rules in the module docstring)."""
    if frame == NO_FRAME:
        return SoftDice(0.0, 0.0, None, 0.0)
    gt_masks = np.asarray(gt_masks)
    fov_b = np.asarray(fov) != 0
    gt = (gt_masks[frame] != 0) & fov_b
    pred = (np.asarray(pred_mask) != 0) & fov_b
    d = dice(gt, pred)
    if gt.any() or not pred.any():
        return SoftDice(d, d, frame, d)
    near = nearest_annotated_frame(gt_masks, frame, frames_per_sweep, tolerance)
    if near is None:
        return SoftDice(d, d, None, d)
    d_near = dice(gt_masks[near] != 0, pred)
    return SoftDice(d, d_near, near, d_near * (1.0 - abs(near - frame) / tolerance))


def predicted_ac_mm(
    pred_mask: np.ndarray, fov: np.ndarray | None, spacing_mm: float = PIXEL_SPACING_MM
) -> biometry.Measurement:
    """AC of the predicted mask by ellipse fit (FOV-aware), any blob size as in the official code."""
    return biometry.measure(pred_mask, (spacing_mm, spacing_mm), fov, min_area_px=0)


@dataclass(frozen=True)
class CaseResult:
    frame: int
    sweep: int | None  # 0-based
    gt_label: int | None  # label of the chosen frame (0/1/2); None for frame -1
    wfss: float
    pred_ac_mm: float | None
    ref_ac_mm: float | None
    ac_status: str
    nae: float
    dsc: float
    dsc_nearest: float
    nearest_frame: int | None
    dsc_soft: float
    score: float

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_case(
    gt_masks: np.ndarray,
    pred_mask: np.ndarray | None,
    frame: int,
    ref_ac_mm: Sequence[float | None],
    fov: np.ndarray,
    *,
    spacing_mm: float = PIXEL_SPACING_MM,
    frames_per_sweep: int = FRAMES_PER_SWEEP,
    tolerance: int = MAX_FRAME_TOLERANCE,
) -> CaseResult:
    """All per-case metrics.

    ``gt_masks``: (F, H, W) labels 0/1/2.  ``pred_mask``: the chosen frame's (H, W) mask (ignored
    and may be None for frame -1).  ``ref_ac_mm``: reference AC per sweep (None or NaN = none).
    ``fov``: (H, W) field-of-view mask.
    """
    gt_masks = np.asarray(gt_masks)
    if gt_masks.ndim != 3:
        raise ValueError(f"ground-truth masks must be (frames, H, W), got shape {gt_masks.shape}")
    n_frames, h, w = gt_masks.shape
    if np.asarray(fov).shape != (h, w):
        raise ValueError(f"FOV mask shape {np.asarray(fov).shape} != frame shape {(h, w)}")
    if frame != NO_FRAME and not 0 <= frame < n_frames:
        raise ValueError(f"frame {frame} out of range: -1 or 0..{n_frames - 1}")
    if frame == NO_FRAME or pred_mask is None:
        pred = np.zeros((h, w), np.uint8)
    else:
        pred = np.asarray(pred_mask)
        if pred.shape != (h, w):
            raise ValueError(f"predicted mask shape {pred.shape} != frame shape {(h, w)}")
    sweep = sweep_of(frame, frames_per_sweep)
    ref = None
    if sweep is not None and sweep < len(ref_ac_mm):
        r = ref_ac_mm[sweep]
        ref = float(r) if r is not None and math.isfinite(float(r)) else None
    if frame == NO_FRAME:
        pred_ac, status = None, "no_frame"
    else:
        m = predicted_ac_mm(pred, fov, spacing_mm)
        pred_ac, status = m.ac_mm, m.status
    e = nae(pred_ac, ref)
    wf = compute_wfss(gt_masks, frame)
    sd = soft_dice(gt_masks, pred, frame, fov, frames_per_sweep, tolerance)
    label = None if frame == NO_FRAME else int(frame_labels(gt_masks[frame : frame + 1])[0])
    return CaseResult(
        frame=frame,
        sweep=sweep,
        gt_label=label,
        wfss=wf,
        pred_ac_mm=pred_ac,
        ref_ac_mm=ref,
        ac_status=status,
        nae=e,
        dsc=sd.dsc,
        dsc_nearest=sd.dsc_nearest,
        nearest_frame=sd.nearest_frame,
        dsc_soft=sd.dsc_soft,
        score=ranking_score(e, wf, sd.dsc_soft),
    )


@dataclass(frozen=True)
class F1:
    f1: float
    precision: float
    recall: float
    tp: int
    fp: int
    fn: int
    tn: int


def frame_f1(gt_labels: Sequence[int] | np.ndarray, pred_labels: Sequence[int] | np.ndarray) -> F1:
    """Frame-level F1 of a quality classifier: optimal or suboptimal (non-zero) vs background.

    Undefined ratios (no positives predicted and/or present) are 0, except F1 = 1 when there are
    neither true nor predicted positives.
    """
    g = np.asarray(gt_labels).ravel() != 0
    p = np.asarray(pred_labels).ravel() != 0
    if g.shape != p.shape:
        raise ValueError(f"{p.size} predicted labels for {g.size} frames")
    tp = int((g & p).sum())
    fp = int((~g & p).sum())
    fn = int((g & ~p).sum())
    tn = int((~g & ~p).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2 * tp + fp + fn)
    return F1(f1, precision, recall, tp, fp, fn, tn)


def summarize(results: Sequence[CaseResult], f1: F1 | None = None) -> dict:
    """Case means (and standard deviations) and the ranking score of the means, as the challenge does."""
    out: dict = {"n_cases": len(results)}
    if not results:
        out.update(score=None, wfss=None, nae=None, dsc_soft=None, f1=None if f1 is None else f1.f1)
        return out
    means = {}
    for key in ("wfss", "nae", "dsc_soft", "dsc"):
        values = np.array([getattr(r, key) for r in results], dtype=np.float64)
        means[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std())
    out["score"] = ranking_score(means["nae"], means["wfss"], means["dsc_soft"])
    out.update(wfss=means["wfss"], nae=means["nae"], dsc_soft=means["dsc_soft"], dsc=means["dsc"])
    out["f1"] = None if f1 is None else f1.f1
    if f1 is not None:
        out["f1_detail"] = asdict(f1)
    return out


def derive_fov_mask(images: np.ndarray, kernel_px: int = 7) -> np.ndarray:
    """Field of view of an image stack: pixels non-zero in any frame, cleaned.

    Morphological opening then closing with an elliptical kernel, largest connected component,
    holes filled.  Returns a (H, W) bool array (all False for an all-zero stack).
    """
    imgs = np.asarray(images)
    if imgs.ndim == 2:
        imgs = imgs[None]
    if imgs.ndim != 3:
        raise ValueError(f"images must be (frames, H, W), got shape {imgs.shape}")
    raw = (imgs != 0).any(axis=0).astype(np.uint8)
    if kernel_px > 1:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel_px, kernel_px))
        pad = kernel_px
        padded = np.pad(raw, pad)
        padded = cv2.morphologyEx(padded, cv2.MORPH_OPEN, k)
        padded = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, k)
        raw = padded[pad:-pad, pad:-pad]
    n, lab, stats, _ = cv2.connectedComponentsWithStats(raw, connectivity=8)
    if n <= 1:
        return np.zeros(raw.shape, bool)
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    comp = (lab == best).astype(np.uint8)
    # Fill holes: flood the background from outside (padded so the border is background).
    bg = np.pad(1 - comp, 1, constant_values=1)
    flood = bg.copy()
    ff_mask = np.zeros((flood.shape[0] + 2, flood.shape[1] + 2), np.uint8)
    cv2.floodFill(flood, ff_mask, (0, 0), 2)
    outside = (flood == 2)[1:-1, 1:-1]
    return ~outside


def convex_fov_mask(image_max: np.ndarray) -> np.ndarray:
    """Field of view from few frames (live): the convex hull of the non-zero pixels, specks removed.

    :func:`derive_fov_mask` keeps the largest non-zero component, which needs many frames: in a few,
    fluid below the display's dynamic range is exactly 0 and cuts the sector into pieces (the amniotic
    fluid around the fetus, typically), and the largest piece is then the maternal near field alone. A
    convex sector is its own hull, so one frame already gives it (IoU 0.99 with the whole-stack mask on a
    phantom case); erring large only hides a truncation, where erring small would clip the abdomen away.
    """
    raw = (np.asarray(image_max) != 0).astype(np.uint8)
    if raw.ndim != 2:
        raise ValueError(f"image_max must be (H, W), got shape {raw.shape}")
    raw = cv2.morphologyEx(raw, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    points = cv2.findNonZero(raw)
    fov = np.zeros(raw.shape, np.uint8)
    if points is not None:
        cv2.fillConvexPoly(fov, cv2.convexHull(points), 1)
    return fov.astype(bool)
