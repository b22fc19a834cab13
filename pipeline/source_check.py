"""`tools/inspect_source.py SOURCE --out roi.png`: what a source is (its reported properties) and where its
imaging sector is, drawn on one of its frames. The last line printed is the sector box as `x y w h`.

The PNG shows the whole screen, patient text included: it is for setting up a cart, keep it local.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from .sector import Sector, SectorTracker, to_gray
from .sources import SourceError, open_source
from .sources.screen import fixed_sector

BOX_COLOUR, OUTLINE_COLOUR = (40, 220, 40), (0, 220, 255)  # BGR


def find_on(source, frames: int, seconds: float) -> tuple[Sector | None, np.ndarray | None]:
    """The sector the tracker settles on within `frames` frames or `seconds`, and the last frame seen."""
    if source.region is not None:
        frame = _next_frame(source, seconds)
        return fixed_sector(source.region), None if frame is None else frame.image
    tracker, last = SectorTracker(), None
    deadline = time.monotonic() + seconds
    for _ in tqdm(range(frames), desc="frames", leave=False):
        frame = _next_frame(source, deadline - time.monotonic())
        if frame is None:
            break
        last = frame.image
        tracker.update(to_gray(last))
    return tracker.sector or tracker.settle(), last


def _next_frame(source, seconds: float):
    deadline = time.monotonic() + max(seconds, 0)
    while time.monotonic() < deadline:
        frame = source.read()
        if frame is not None or source.ended:
            return frame
    return None


def draw(frame: np.ndarray, sector: Sector) -> np.ndarray:
    canvas = frame if frame.ndim == 3 else cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    canvas = canvas.copy()
    x, y, w, h = sector.box
    cv2.rectangle(canvas, (x, y), (x + w - 1, y + h - 1), BOX_COLOUR, 2)
    cv2.polylines(canvas, [np.array(sector.outline, np.int32)], True, OUTLINE_COLOUR, 2)
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="anything --source takes: device, stream URL, video, DICOM, folder")
    parser.add_argument("--out", type=Path, help="PNG of a frame with the sector's box and outline drawn")
    parser.add_argument("--frames", type=int, default=150, help="frames looked at, at most")
    parser.add_argument("--seconds", type=float, default=20.0, help="time spent looking, at most")
    args = parser.parse_args(argv)
    try:
        source = open_source(args.source, "bgr24", None)
    except SourceError as exc:
        print(f"inspect_source: {exc}", file=sys.stderr)
        return 1
    try:
        for key, value in source.describe().items():
            print(f"{key}: {value}")
        sector, frame = find_on(source, args.frames, args.seconds)
    except SourceError as exc:
        print(f"inspect_source: {exc}", file=sys.stderr)
        return 1
    finally:
        source.close()
    if sector is None or frame is None:
        print(f"inspect_source: {args.source}: no imaging sector found (nothing large changes on the "
              "screen: is the probe imaging?)", file=sys.stderr)
        return 1
    if args.out is not None:
        cv2.imwrite(str(args.out), draw(frame, sector))
        print(f"drawn on a frame: {args.out}")
    print(" ".join(str(v) for v in sector.box))
    return 0
