"""Letterbox geometry and its inverse: the model input a frame becomes (ROI, zero-pad to a centred square,
resize, channels), the geometry that maps model pixels back to the frame, and how much of the input is
tissue. Pure functions shared by the preprocess stage, the benchmarks' in-process baseline, the trainers and
the evaluation, so every one of them prepares a frame the same way."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image

INTERPOLATION = {"area": cv2.INTER_AREA, "cubic": cv2.INTER_CUBIC, "linear": cv2.INTER_LINEAR,
                 "nearest": cv2.INTER_NEAREST}
RESIZE_MODES = ("bicubic", *INTERPOLATION)
# The manifest's `input.resize` in this module's terms. "bicubic" is the exact antialiased filter open_clip
# applies (Pillow's); the others are OpenCV filters after a whole-factor box filter (faster, not exact).
BUNDLE_RESIZE = {"bicubic": "bicubic", "bilinear": "linear", "area": "area", "nearest": "nearest"}
# Pillow first box-reduces by whole factors while the remaining ratio stays >= this: 3x faster on 1080p,
# within one grey level of the exact filter.
PIL_REDUCING_GAP = 3.0
# Grey level (of 255) above which a model-input pixel counts as content rather than an empty, lifted probe.
DARK_LEVEL = 16


@dataclass(frozen=True)
class Geometry:
    """Where the model input came from: a model pixel (u, v) comes from frame pixel
    (roi_x + (u - offset_x) / scale_x, roi_y + (v - offset_y) / scale_y). `roi` is the frame region the
    model saw (x, y, width, height), `content` the size of the unpadded picture inside the model input."""

    roi: tuple[int, int, int, int]
    offset: tuple[float, float]
    content: tuple[float, float]
    scale: tuple[float, float]

    def as_wire(self) -> dict[str, list]:
        return {"roi": list(self.roi), "offset": list(self.offset), "content": list(self.content),
                "scale": list(self.scale)}

    @classmethod
    def from_wire(cls, value: Mapping[str, Any]) -> Geometry:
        """Strict: four fields of the right lengths and numeric types, or ValueError naming the field."""
        if not isinstance(value, Mapping) or set(value) != {"roi", "offset", "content", "scale"}:
            raise ValueError("geometry must have exactly roi, offset, content and scale")
        parts = {}
        for name, length, kinds in (("roi", 4, (int,)), ("offset", 2, (int, float)),
                                    ("content", 2, (int, float)), ("scale", 2, (int, float))):
            item = value[name]
            if (not isinstance(item, (list, tuple)) or len(item) != length
                    or not all(type(v) in kinds for v in item)):
                raise ValueError(f"geometry.{name} must be {length} numbers, got {item!r}")
            parts[name] = tuple(item)
        return cls(**parts)


@dataclass(frozen=True)
class Prepared:
    """One frame made ready for the model: its input pixels, the geometry back to the frame, and the share
    of the input that is tissue (near 0 when the probe is off the skin)."""

    pixels: np.ndarray
    geometry: Geometry
    content: float


@dataclass(frozen=True)
class Letterbox:
    """The one per-frame preparation step, configured once from the bundle's input spec and the run's
    `[preprocess]` section; the stage, the benchmark baseline, the trainers and the evaluation call it."""

    size: int
    channels: int
    pad_to_square: bool = True
    roi: tuple[int, int, int, int] | None = None
    interpolation: str = "area"

    @classmethod
    def for_bundle(cls, spec: Any, roi: tuple[int, int, int, int] | None = None,
                   interpolation: str | None = None) -> Letterbox:
        """From a bundle's `InputSpec`; `interpolation` None keeps the bundle's own resize filter."""
        return cls(spec.size, spec.channels, spec.pad_to_square, roi,
                   interpolation or BUNDLE_RESIZE[spec.resize])

    def __call__(self, frame: np.ndarray) -> Prepared:
        pixels, geometry = letterbox(frame, self.size, self.channels, pad_to_square=self.pad_to_square,
                                     roi=self.roi, interpolation=self.interpolation)
        return Prepared(pixels, geometry, content_fraction(pixels, geometry))


def letterbox(frame: np.ndarray, size: int, channels: int, *, pad_to_square: bool = True,
              roi: tuple[int, int, int, int] | None = None, interpolation: str = "area"
              ) -> tuple[np.ndarray, Geometry]:
    """Model input of `size` x `size` (x channels) and the geometry that maps it back to the frame.

    The result equals zero-padding the (ROI of the) frame to a centred square and resizing that, without
    building the padded full-resolution image.
    """
    x0, y0 = 0, 0
    if roi is not None:
        x0, y0 = roi[:2]
        frame = crop(frame, roi)
    height, width = frame.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"empty frame after ROI {roi}")
    if frame.ndim == 3 and channels == 1:
        frame = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)  # before resizing: a third of the pixels to filter
    if interpolation == "bicubic":
        out, geometry = _bicubic(frame, size, pad_to_square)
    else:
        out, geometry = _opencv(frame, size, pad_to_square, interpolation)
    box = geometry["roi"]
    if out.ndim == 2 and channels == 3:
        out = cv2.cvtColor(out, cv2.COLOR_GRAY2BGR)
    return out, Geometry((x0 + box[0], y0 + box[1], box[2], box[3]), tuple(geometry["offset"]),
                         tuple(geometry["content"]), tuple(geometry["scale"]))


def crop(frame: np.ndarray, box: tuple[int, int, int, int], outline_mask: np.ndarray | None = None
         ) -> np.ndarray:
    """The frame cut to `box` (x, y, width, height) and, with `outline_mask` (box-sized, 1 inside), zero
    outside the outline: what a screen source passes on of the machine's screen (pipeline.sector), and
    the fixed `preprocess.roi`. A view unless masked."""
    x, y, w, h = box
    out = frame[y:y + h, x:x + w]
    if outline_mask is not None:
        out = out * (outline_mask[..., None] if out.ndim == 3 else outline_mask)
    return out


def content_fraction(model_input: np.ndarray, geometry: Geometry) -> float:
    """Share of the content box (the model input without its padding) brighter than DARK_LEVEL: near 0 when
    the probe is off the skin, what sweep tracking uses to end a sweep without the source's help."""
    (x, y), (w, h) = geometry.offset, geometry.content
    x0, y0 = math.floor(x), math.floor(y)
    box = model_input[y0:math.ceil(y + h), x0:math.ceil(x + w)]
    if box.ndim == 3:
        box = box[..., 0]
    return float(np.count_nonzero(box > DARK_LEVEL)) / max(box.size, 1)


def to_frame(mask: np.ndarray, geometry: Geometry, frame_shape: tuple[int, ...]) -> np.ndarray:
    """A model-resolution 0/1 mask mapped back onto the full frame through the inverse of `letterbox`
    (bilinear, then thresholded at one half, so edges are not staircased by the resize factor); zero
    outside the region the model saw (ROI, rows and columns trimmed by the whole-factor shrink)."""
    (rx, ry, rw, rh), (ox, oy), (sx, sy) = geometry.roi, geometry.offset, geometry.scale
    height, width = frame_shape[:2]
    # Pixel centres: model u + 0.5 = ox + (X + 0.5 - rx) * sx, so u = sx * X + (ox + (0.5 - rx) * sx - 0.5).
    to_model = np.array([[sx, 0.0, ox + (0.5 - rx) * sx - 0.5],
                         [0.0, sy, oy + (0.5 - ry) * sy - 0.5]], dtype=np.float64)
    soft = cv2.warpAffine((np.asarray(mask) != 0).astype(np.uint8) * 255, to_model, (width, height),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT)
    out = np.zeros((height, width), np.uint8)
    box = (slice(max(ry, 0), min(ry + rh, height)), slice(max(rx, 0), min(rx + rw, width)))
    out[box] = soft[box] >= 128
    return out


def _opencv(frame: np.ndarray, size: int, pad_to_square: bool, interpolation: str) -> tuple[np.ndarray, dict]:
    """Content resized into its place on a zero canvas, with integer placement."""
    height, width = frame.shape[:2]
    if pad_to_square:
        fit = size / max(height, width)
        new_w, new_h = max(1, round(width * fit)), max(1, round(height * fit))
    else:
        new_w, new_h = size, size
    box = (0, 0, width, height)
    factor = min(width // new_w, height // new_h)
    if factor >= 2:
        frame, box = _shrink_whole(frame, factor, box)
    resized = cv2.resize(frame, (new_w, new_h), interpolation=INTERPOLATION[interpolation])
    out = np.zeros((size, size, *frame.shape[2:]), dtype=np.uint8)
    off_x, off_y = (size - new_w) // 2, (size - new_h) // 2
    out[off_y:off_y + new_h, off_x:off_x + new_w] = resized
    return out, {"roi": list(box), "offset": [off_x, off_y], "content": [new_w, new_h],
                 "scale": [new_w / box[2], new_h / box[3]]}


def _bicubic(frame: np.ndarray, size: int, pad_to_square: bool) -> tuple[np.ndarray, dict]:
    """Pillow's antialiased bicubic on the zero-padded square, as open_clip's transform does, computed on
    only the band of the square that the content reaches (plus the filter's support)."""
    height, width = frame.shape[:2]
    full = (0, 0, width, height)
    if not pad_to_square or height == width:
        image = Image.fromarray(frame).resize((size, size), Image.BICUBIC, reducing_gap=PIL_REDUCING_GAP)
        return np.asarray(image), {"roi": list(full), "offset": [0, 0], "content": [size, size],
                                   "scale": [size / width, size / height]}
    transposed = height > width  # work on a horizontal band; a tall frame is transposed and back
    if transposed:
        frame = np.swapaxes(frame, 0, 1)
        height, width = width, height
    side = width
    scale = side / size  # source pixels per output pixel
    top = (side - height) // 2  # the content's first row in the padded square
    support = 2 * scale  # bicubic reaches two output pixels' worth of source on each side
    first = max(0, math.floor((top - support) / scale))
    last = min(size, math.ceil((top + height + support) / scale))
    lo, hi = math.floor(first * scale), math.ceil(last * scale)
    band = np.zeros((hi - lo, side, *frame.shape[2:]), dtype=np.uint8)
    band[max(top, lo) - lo:min(top + height, hi) - lo] = frame[max(lo - top, 0):min(hi, top + height) - top]
    rows = Image.fromarray(np.ascontiguousarray(band)).resize(
        (size, last - first), Image.BICUBIC, box=(0, first * scale - lo, side, last * scale - lo),
        reducing_gap=PIL_REDUCING_GAP)
    out = np.zeros((size, size, *frame.shape[2:]), dtype=np.uint8)
    out[first:last] = np.asarray(rows)
    offset, content = [0.0, top / scale], [size, height / scale]
    if transposed:
        out = np.ascontiguousarray(np.swapaxes(out, 0, 1))
        offset, content, full = offset[::-1], content[::-1], (0, 0, height, width)
    return out, {"roi": list(full), "offset": offset, "content": content, "scale": [1 / scale, 1 / scale]}


def _shrink_whole(frame: np.ndarray, factor: int, box: tuple[int, int, int, int]
                  ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Box-filter by a whole factor first: OpenCV's area filter is several times faster for an exact
    integer ratio, so the frame loses its last < `factor` rows and columns (split evenly between both
    sides, reflected in the returned box) and the remaining < 2x step is cheap."""
    x0, y0, width, height = box
    used_w, used_h = width // factor * factor, height // factor * factor
    cut_x, cut_y = (width - used_w) // 2, (height - used_h) // 2
    frame = frame[cut_y:cut_y + used_h, cut_x:cut_x + used_w]
    small = cv2.resize(frame, (used_w // factor, used_h // factor), interpolation=cv2.INTER_AREA)
    return small, (x0 + cut_x, y0 + cut_y, used_w, used_h)
