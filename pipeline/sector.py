"""The imaging sector on an ultrasound machine's screen: where the live B-mode image is, found from how the
screen changes over time, and kept steady while the layout stays the same.

A machine's video output is its whole screen: the sector plus patient name and ID, date, probe, MI/TI, a
depth scale, grey and colour bars, a logo. Those are drawn once and stay still; the sector's speckle changes
with every frame (and fluid inside it is black, so a single frame shows only part of the sector). So the
sector is where pixels are seen changing: the changes of recent frames are OR-ed into an activity map, the
large connected group of changing pixels is the sector, and its convex hull is its outline (the field of
view). A small changing thing apart from it (a clock, a cursor) is too small to count.

Pure functions (`find_sector`, `colour_share`) and one small stateful tracker (`SectorTracker`) with no I/O:
the source wrapper (`pipeline.sources.screen`), `tools/inspect_source.py` and the tests use them alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np

# Grey levels a pixel must change between two frames to count as live image (codec noise on still UI stays
# below it; speckle moves by tens of levels).
ACTIVE_LEVEL = 12
# The sector covers at least this share of the screen; changing pixels are grouped across this share of
# the screen's short side (fluid inside the sector is black and still, so early on the tissue seen is in
# pieces with wide gaps between them).
MIN_SECTOR_SHARE = 0.03
GROUP_SHARE = 0.1
# A group of changing pixels smaller than this share of the screen is not image (a clock's digits).
MIN_PIECE_SHARE = 0.0005
CHECK_EVERY = 10  # frames between two detections
AGREE_PX = 3  # two detections whose box edges are within this agree
# The layout changed (preset, depth) when this share of the screen outside the sector differs by more than
# LAYOUT_LEVEL from the frame the sector was accepted on.
LAYOUT_LEVEL = 24
LAYOUT_SHARE = 0.01
LAYOUT_STRIDE = 4  # the layout check samples every 4th pixel each way
# A pixel is colour when its channels spread by more than this; a colour Doppler box is flagged when such
# pixels cover COLOUR_SHARE of the sector.
COLOUR_LEVEL = 40
COLOUR_SHARE = 0.005
OUTLINE_TOLERANCE_PX = 1.5  # the hull is simplified to within this


@dataclass(frozen=True)
class Sector:
    """The sector on the screen: `box` (x, y, width, height) and `outline`, its convex hull's vertices in
    screen pixels."""

    box: tuple[int, int, int, int]
    outline: tuple[tuple[int, int], ...]

    @cached_property
    def mask(self) -> np.ndarray:
        """Box-sized uint8 mask, 1 inside the outline."""
        x, y, w, h = self.box
        mask = np.zeros((h, w), np.uint8)
        cv2.fillConvexPoly(mask, np.array(self.outline, np.int32) - (x, y), 1)
        return mask

    def agrees(self, other: Sector | None, tolerance: int = AGREE_PX) -> bool:
        if other is None:
            return False
        (x, y, w, h), (u, v, s, t) = self.box, other.box
        return max(abs(x - u), abs(y - v), abs(x + w - u - s), abs(y + h - v - t)) <= tolerance

    def as_meta(self) -> dict[str, list]:
        """For a frame's source metadata: the box on the screen and the outline in the cropped frame's
        pixels (what biometry sees as the field of view)."""
        x, y = self.box[:2]
        return {"box": list(self.box), "outline": [[px - x, py - y] for px, py in self.outline]}


def to_gray(frame: np.ndarray) -> np.ndarray:
    """Luma (ITU-R 601: 0.299 R + 0.587 G + 0.114 B), as the model's grey training images were made."""
    return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame


def changed(previous: np.ndarray, current: np.ndarray, level: int = ACTIVE_LEVEL) -> np.ndarray:
    """Pixels of two grey frames that differ by more than `level`."""
    return cv2.absdiff(previous, current) > level


def find_sector(active: np.ndarray) -> Sector | None:
    """The sector from an activity map (bool, pixels seen changing): the largest group of changing pixels,
    its convex hull as the outline; None when nothing large enough changed."""
    height, width = active.shape
    pixels = active.astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(pixels, connectivity=8)
    keep = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] >= MIN_PIECE_SHARE * height * width) + 1
    if not len(keep):
        return None
    pieces = np.isin(labels, keep).astype(np.uint8)
    reach = max(3, int(GROUP_SHARE * min(height, width)) | 1)
    grouped = cv2.dilate(pieces, cv2.getStructuringElement(cv2.MORPH_RECT, (reach, reach)))
    count, groups = cv2.connectedComponents(grouped, connectivity=8)
    changing = np.bincount(groups.ravel(), weights=pieces.ravel(), minlength=count)
    largest = 1 + int(np.argmax(changing[1:]))  # the group with the most changing pixels
    points = cv2.findNonZero(pieces & (groups == largest).astype(np.uint8))
    if points is None or len(points) < MIN_SECTOR_SHARE * height * width:
        return None
    hull = cv2.approxPolyDP(cv2.convexHull(points), OUTLINE_TOLERANCE_PX, True)
    box = cv2.boundingRect(points)
    return Sector(tuple(int(v) for v in box), tuple((int(p[0][0]), int(p[0][1])) for p in hull))


def colour_share(frame: np.ndarray, sector: Sector) -> float:
    """Share of the sector's pixels that are coloured (a colour Doppler box), 0 for a grey frame."""
    if frame.ndim != 3:
        return 0.0
    x, y, w, h = sector.box
    crop = frame[y:y + h:2, x:x + w:2]
    spread = crop.max(axis=2).astype(np.int16) - crop.min(axis=2)
    inside = sector.mask[::2, ::2] != 0
    return float(np.count_nonzero((spread > COLOUR_LEVEL) & inside)) / max(int(inside.sum()), 1)


class SectorTracker:
    """Follows the sector over a stream of grey frames. A detection is accepted once two in a row
    (CHECK_EVERY frames apart) agree, and then held: a new box replaces it only when two detections agree on
    it again, so it never flickers frame to frame. When the screen around the sector changes (a preset or
    depth change redraws the scale and labels) the activity is forgotten and the sector found afresh, the
    old one held meanwhile."""

    def __init__(self) -> None:
        self.sector: Sector | None = None
        self.layout_changes = 0
        self._active: np.ndarray | None = None
        self._previous: np.ndarray | None = None
        self._candidate: Sector | None = None
        self._reference: np.ndarray | None = None  # the screen (sampled) when the sector was accepted
        self._frames = 0
        self._searching = True  # no sector accepted since the start or the last layout change

    def update(self, gray: np.ndarray) -> Sector | None:
        """Take one grey frame; the sector to use for it (None until one is found)."""
        if self._previous is None or self._previous.shape != gray.shape:
            self._reset(gray)
        else:
            self._active |= changed(self._previous, gray)
            self._previous = gray.copy()
        if not self._searching and self._layout_changed(gray):
            self.layout_changes += 1
            self._searching = True
            self._reset(gray)
        self._frames += 1
        if self._frames % CHECK_EVERY == 0:
            self._check(gray)
        return self.sector

    def settle(self) -> Sector | None:
        """At the end of a recording too short for two detections to agree: a last detection, taken as
        it is."""
        if self.sector is None and self._active is not None:
            self.sector = find_sector(self._active)
            self._searching = self.sector is None
        return self.sector

    def _reset(self, gray: np.ndarray) -> None:
        self._active = np.zeros(gray.shape, bool)
        self._previous = gray.copy()
        self._candidate = None
        self._reference = gray[::LAYOUT_STRIDE, ::LAYOUT_STRIDE].copy()
        self._frames = 0

    def _check(self, gray: np.ndarray) -> None:
        found = find_sector(self._active)
        if found is not None and found.agrees(self._candidate):
            if not found.agrees(self.sector):
                self.sector = found
            if self._searching:
                self._reference = gray[::LAYOUT_STRIDE, ::LAYOUT_STRIDE].copy()
                self._searching = False
        self._candidate = found

    def _layout_changed(self, gray: np.ndarray) -> bool:
        sample = gray[::LAYOUT_STRIDE, ::LAYOUT_STRIDE]
        if self._reference is None or sample.shape != self._reference.shape:
            return False
        x, y, w, h = (v // LAYOUT_STRIDE for v in self.sector.box)
        outside = np.ones(sample.shape, bool)
        outside[max(y - 1, 0):y + h + 2, max(x - 1, 0):x + w + 2] = False
        moved = changed(self._reference, sample, LAYOUT_LEVEL) & outside
        return np.count_nonzero(moved) > LAYOUT_SHARE * sample.size
