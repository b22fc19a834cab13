"""Only the imaging sector of a machine's screen goes on: a wrapper around any source that crops each frame
to the sector's box and blanks what lies outside its outline, before the frame reaches the ring. So the
model, the saved best frames and their masks never hold the patient's name or the machine's labels (text
burned into the sector itself stays).

`preprocess.roi`: `auto` finds the sector on sources that are screens (capture cards, streams, video files,
DICOM without ultrasound regions) with `pipeline.sector.SectorTracker`, crops DICOM to its region, and
leaves stacks and phantoms whole; `[x, y, w, h]` is a fixed box; `none` passes whole frames.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.letterbox import crop
from pipeline.sector import COLOUR_SHARE, Sector, SectorTracker, colour_share, to_gray

from .base import Source, SourceError, SourceFrame

log = logging.getLogger("sweepstream")

PRIME_FRAMES = 300  # a recording is looked at for at most this many frames to find its sector first

Roi = tuple[int, int, int, int] | str | None


def fixed_sector(box: tuple[int, int, int, int]) -> Sector:
    x, y, w, h = box
    return Sector(tuple(box), ((x, y), (x + w - 1, y), (x + w - 1, y + h - 1), (x, y + h - 1)))


class SectorSource(Source):
    """`inner`'s frames cut to the sector. A recording is looked through first (then rewound), so its first
    frame is already cut; a live source's frames are held back until the sector is found (under a
    second), since passing a whole screen would pass the patient's name."""

    def __init__(self, inner: Source, box: tuple[int, int, int, int] | None) -> None:
        super().__init__(inner.uri, inner.pixel_format)
        self.inner = inner
        self.live = inner.live
        self.tracker = None if box is not None else SectorTracker()
        self.sector = fixed_sector(box) if box is not None else None
        self.withheld = 0  # live frames read before the sector was found

    @property
    def fps(self) -> float:
        return self.inner.fps

    @property
    def ended(self) -> bool:
        return self.inner.ended

    def open(self) -> None:
        if self.tracker is not None and not self.inner.live:
            self._prime()

    def _prime(self) -> None:
        for _ in range(PRIME_FRAMES):
            frame = self.inner.read()
            if frame is None:
                break
            if self.tracker.update(to_gray(frame.image)) is not None:
                break
        self.sector = self.tracker.sector or self.tracker.settle()
        if self.sector is None:
            raise SourceError(f"source {self.uri}: no imaging sector found on the screen in its first frames "
                              "(nothing large moves); set preprocess.roi to x,y,w,h or none")
        self.inner.rewind()

    def read(self) -> SourceFrame | None:
        while True:
            frame = self.inner.read()
            if frame is None:
                return None
            if self.tracker is not None:
                found = self.tracker.update(to_gray(frame.image))
                if found is not None and found is not self.sector:
                    if self.sector is not None:
                        log.info("source %s: imaging sector now %s (was %s)", self.uri, found.box,
                                 self.sector.box)
                    self.sector = found
            if self.sector is not None:
                return self._cut(frame, self.sector)
            self.withheld += 1
            if self.live:
                return None  # the next read tries again; capture's loop stays responsive

    def _cut(self, frame: SourceFrame, sector: Sector) -> SourceFrame:
        x, y, w, h = sector.box
        height, width = frame.image.shape[:2]
        if x + w > width or y + h > height:
            raise SourceError(f"source {self.uri}: ROI {list(sector.box)} lies outside its {width}x{height} "
                              "frames")
        mask = sector.mask if self.tracker is not None else None
        meta = {**frame.meta, "sector": sector.as_meta()}
        if frame.image.ndim == 3:
            meta["colour_doppler"] = colour_share(frame.image, sector) > COLOUR_SHARE
        return SourceFrame(crop(frame.image, sector.box, mask), frame.index, frame.pts, meta, frame.t_arrival)

    def rewind(self) -> None:
        self.inner.rewind()

    def close(self) -> None:
        self.inner.close()

    def health(self) -> dict[str, int]:
        return {**self.inner.health(), "roi_withheld": self.withheld}

    def describe(self) -> dict[str, Any]:
        out = self.inner.describe()
        out["sector"] = None if self.sector is None else {
            "box": list(self.sector.box), "found": "detected" if self.tracker is not None else "fixed",
            "layout_changes": self.tracker.layout_changes if self.tracker is not None else 0}
        return out
