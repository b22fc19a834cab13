"""Annotated best frames: the picture a sonographer accepts as the measurement image (pure drawing, no I/O).

The frame is cropped to its non-dark content (the sector), the fitted ellipse and its two axes are drawn on
it, and a banner above the picture says the AC in mm, the GA in weeks and days, the sweep, the frame and the
confidence. Postprocess's writer thread saves the result beside the raw frame and mask PNGs
(`best/sweep-SSSS-frame-FFFFFF-annotated.png`); the exam summary's picture is these cards side by side.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .analysis import Finding

ELLIPSE_BGR = (0, 215, 255)  # amber: seen on grey speckle, not a colour the scanner's own overlays use
AXIS_BGR = (255, 200, 0)
TEXT_BGR = (255, 255, 255)
BANNER_BGR = (32, 32, 32)
CONTENT_LEVEL = 8  # grey level above which a pixel is picture, not the black around the sector
CROP_MARGIN = 8  # pixels kept around the content
ANNOTATED = "annotated"  # the image name, so the file is ...-annotated.png


def ga_text(ga_weeks: float | None) -> str:
    """Gestational age as the clinic writes it: 28w 3d."""
    if ga_weeks is None or not math.isfinite(ga_weeks):
        return "GA -"
    days = int(round(ga_weeks * 7))
    return f"GA {days // 7}w {days % 7}d"


def _crop_box(image: np.ndarray, ellipse: Mapping[str, float] | None) -> tuple[int, int, int, int]:
    """x0, y0, x1, y1 around the picture's content and the whole ellipse."""
    height, width = image.shape[:2]
    grey = image if image.ndim == 2 else image.max(axis=2)
    rows = np.flatnonzero((grey > CONTENT_LEVEL).any(axis=1))
    cols = np.flatnonzero((grey > CONTENT_LEVEL).any(axis=0))
    if rows.size == 0:
        x0, y0, x1, y1 = 0, 0, width, height
    else:
        x0, x1, y0, y1 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
    if ellipse is not None:
        reach = ellipse["a"]
        x0, x1 = min(x0, ellipse["cx"] - reach), max(x1, ellipse["cx"] + reach)
        y0, y1 = min(y0, ellipse["cy"] - reach), max(y1, ellipse["cy"] + reach)
    return (max(0, int(x0) - CROP_MARGIN), max(0, int(y0) - CROP_MARGIN),
            min(width, int(math.ceil(x1)) + CROP_MARGIN), min(height, int(math.ceil(y1)) + CROP_MARGIN))


def _draw_ellipse(canvas: np.ndarray, ellipse: Mapping[str, float], origin: tuple[int, int],
                  thickness: int) -> None:
    cx, cy = ellipse["cx"] - origin[0], ellipse["cy"] - origin[1]
    a, b, angle = ellipse["a"], ellipse["b"], ellipse["angle_deg"]
    shift = 4  # sub-pixel drawing: OpenCV takes fixed-point coordinates with this many fraction bits
    scale = 1 << shift
    cv2.ellipse(canvas, (round(cx * scale), round(cy * scale)), (round(a * scale), round(b * scale)), angle,
                0, 360, ELLIPSE_BGR, thickness, cv2.LINE_AA, shift)
    theta = math.radians(angle)
    for length, direction in ((a, theta), (b, theta + math.pi / 2)):
        dx, dy = length * math.cos(direction), length * math.sin(direction)
        cv2.line(canvas, (round((cx - dx) * scale), round((cy - dy) * scale)),
                 (round((cx + dx) * scale), round((cy + dy) * scale)), AXIS_BGR, max(1, thickness // 2),
                 cv2.LINE_AA, shift)


def _banner(width: int, lines: Sequence[str]) -> np.ndarray:
    """Text lines on a dark strip `width` wide, the font sized to the width and the longest line."""
    longest = max((len(line) for line in lines), default=1)
    scale = max(0.4, min(1.0, width / 700, width / (19 * longest)))
    height_line = int(26 * scale) + 6
    banner = np.full((height_line * len(lines) + 8, width, 3), BANNER_BGR, dtype=np.uint8)
    for i, text in enumerate(lines):
        cv2.putText(banner, text, (8, height_line * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, scale, TEXT_BGR,
                    1 if scale < 0.7 else 2, cv2.LINE_AA)
    return banner


def annotate(image: np.ndarray, *, sweep_id: int, frame_id: int, score: float | None,
             biometry: Mapping[str, Any] | None) -> np.ndarray:
    """The BGR measurement picture of one final best frame. `biometry`: the final biometry event's fields
    (`ac_mm`/`ac_px`, `unit`, `ga_weeks`, `confidence`, `ellipse`), None when nothing was measured."""
    ellipse = None if biometry is None else biometry.get("ellipse")
    x0, y0, x1, y1 = _crop_box(image, ellipse)
    crop = image[y0:y1, x0:x1]
    canvas = cv2.cvtColor(crop, cv2.COLOR_GRAY2BGR) if crop.ndim == 2 else crop.copy()
    if ellipse is not None:
        _draw_ellipse(canvas, ellipse, (x0, y0), thickness=max(2, canvas.shape[1] // 250))
    score_text = "-" if score is None else f"{score:.2f}"
    lines = [f"sweep {sweep_id}  frame {frame_id}  score {score_text}"]
    lines.append(measurement_text(biometry))
    return np.vstack([_banner(canvas.shape[1], lines), canvas])


def measurement_text(biometry: Mapping[str, Any] | None) -> str:
    """AC, GA and confidence in one line (or why there is no measurement)."""
    if biometry is None:
        return "AC not measured (no mask)"
    if biometry.get("status") != "ok":
        return f"AC not measured ({biometry.get('status')})"
    if biometry.get("unit") == "mm" and biometry.get("ac_mm") is not None:
        size = f"AC {biometry['ac_mm']:.1f} mm"
    else:
        size = f"AC {biometry.get('ac_px') or 0:.0f} px (uncalibrated)"
    confidence = biometry.get("confidence")
    conf_text = "" if confidence is None else f"  conf {confidence:.2f}"
    return f"{size}  {ga_text(biometry.get('ga_weeks'))}{conf_text}"


def with_annotations(findings: list[Finding]) -> list[Finding]:
    """Findings as given, each final best frame that has its picture given an annotated one too (drawn with
    the final biometry that follows it, when there is one)."""
    for index, finding in enumerate(findings):
        if finding.type != "best_frame" or not finding.fields.get("final") or "frame" not in finding.images:
            continue
        biometry = next((f.fields for f in findings[index + 1:] if f.type == "biometry"
                         and f.sweep_id == finding.sweep_id and f.fields.get("final")), None)
        finding.images[ANNOTATED] = annotate(finding.images["frame"], sweep_id=finding.sweep_id,
                                             frame_id=finding.frame_id, score=finding.fields.get("raw_score"),
                                             biometry=biometry)
    return findings


def side_by_side(cards: Sequence[np.ndarray], header: Sequence[str], height: int = 360,
                 min_width: int = 720) -> np.ndarray:
    """Cards scaled to one height in a row under a banner (at least `min_width` wide, so the header reads):
    the exam summary's picture."""
    scaled = [cv2.resize(card, (max(1, round(card.shape[1] * height / card.shape[0])), height),
                         interpolation=cv2.INTER_AREA) for card in cards]
    gap = np.full((height, 6, 3), BANNER_BGR, dtype=np.uint8)
    row = [part for card in scaled for part in (card, gap)][:-1] or [np.full((height, 480, 3), BANNER_BGR,
                                                                             dtype=np.uint8)]
    body = np.hstack(row)
    if body.shape[1] < min_width:
        body = np.hstack([body, np.full((height, min_width - body.shape[1], 3), BANNER_BGR, dtype=np.uint8)])
    return np.vstack([_banner(body.shape[1], header), body])


def write_png(path: Path, image: np.ndarray) -> None:
    """Atomically (a temporary file renamed into place): a crash never leaves a torn PNG under the name
    an event points to. Fastest zlib level: a 562 x 744 frame in a few ms instead of tens, at 10-20 %
    more bytes."""
    ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise OSError("the image could not be encoded as PNG")
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_bytes(data.tobytes())
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise
