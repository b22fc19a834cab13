"""Synthetic ultrasound machine screens: phantom sectors placed on a screen with what a machine draws around
them (patient name and ID, date, probe and preset, MI/TI, a depth scale, a grey bar, a colour bar, a
logo), for testing sector detection and the pipeline on what a capture card delivers. The truth is exact:
the sector's box on the screen is the phantom's scan-converted region, placed and scaled."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from .phantom import HEIGHT, WIDTH, iter_case_frames, make_cases, sector_mask

FONT = cv2.FONT_HERSHEY_SIMPLEX
WHITE, YELLOW, CYAN = (235, 235, 235), (40, 220, 240), (230, 200, 40)  # BGR


def sector_region() -> np.ndarray:
    """The phantom frame's scan-converted region (bool HEIGHT x WIDTH)."""
    return sector_mask()


@dataclass(frozen=True)
class ScreenLayout:
    """Where a phantom frame of HEIGHT x WIDTH goes on a `size` (width, height) screen: top-left corner and
    scale."""

    size: tuple[int, int]
    origin: tuple[int, int]
    scale: float = 1.0

    @property
    def frame_size(self) -> tuple[int, int]:
        return round(WIDTH * self.scale), round(HEIGHT * self.scale)

    def truth_box(self) -> tuple[int, int, int, int]:
        """The sector's bounding box on the screen."""
        region = cv2.resize(sector_region().astype(np.uint8) * 255, self.frame_size,
                            interpolation=cv2.INTER_LINEAR) >= 128
        x, y, w, h = cv2.boundingRect(region.astype(np.uint8))
        return x + self.origin[0], y + self.origin[1], w, h

    def background(self) -> np.ndarray:
        """The screen without the image: labels, scales, bars and logo (BGR)."""
        width, height = self.size
        (x0, y0), (fw, fh) = self.origin, self.frame_size
        screen = np.zeros((height, width, 3), np.uint8)
        screen[:36] = (48, 40, 36)  # title bar
        text = [("DOE^JANE  ID 0042-7781", (12, 25), WHITE),
                ("2026-12-01 11:42:07", (width - 300, 25), WHITE)]
        text += [("C5-1  OB 2nd/3rd", (12, 70), YELLOW), ("MI 0.9  TIb 0.4", (12, 100), YELLOW),
                 ("Gain 52  DR 60", (12, 130), CYAN), ("Frq 3.5 MHz", (12, 160), CYAN)]
        for words, at, colour in text:
            cv2.putText(screen, words, at, FONT, 0.7, colour, 2, cv2.LINE_AA)
        scale_x = min(x0 + fw + 18, width - 60)  # depth scale right of the image
        cv2.line(screen, (scale_x, y0), (scale_x, y0 + fh), WHITE, 1)
        for i, y in enumerate(np.linspace(y0, y0 + fh, 9).astype(int)):
            cv2.line(screen, (scale_x, int(y)), (scale_x + (12 if i % 2 == 0 else 6), int(y)), WHITE, 2)
            if i % 2 == 0:
                cv2.putText(screen, str(i * 2), (scale_x + 16, int(y) + 6), FONT, 0.5, WHITE, 1, cv2.LINE_AA)
        bar_x = max(x0 - 70, 8)  # grey bar and colour bar left of the image
        grey = np.linspace(255, 0, 256).astype(np.uint8)[:, None].repeat(16, axis=1)
        screen[y0:y0 + 256, bar_x:bar_x + 16] = grey[..., None]
        colours = cv2.applyColorMap(np.linspace(255, 0, 128).astype(np.uint8)[:, None].repeat(16, axis=1),
                                    cv2.COLORMAP_JET)
        screen[y0 + 280:y0 + 408, bar_x:bar_x + 16] = colours
        cv2.circle(screen, (width - 70, height - 60), 30, (200, 120, 20), -1)  # logo
        cv2.putText(screen, "SONO", (width - 98, height - 54), FONT, 0.6, WHITE, 2, cv2.LINE_AA)
        cv2.putText(screen, "FR 30 Hz", (12, height - 20), FONT, 0.6, WHITE, 1, cv2.LINE_AA)
        return screen

    def compose(self, background: np.ndarray, frame: np.ndarray) -> np.ndarray:
        """`frame` (grey) placed onto a copy of the screen."""
        (x0, y0), (fw, fh) = self.origin, self.frame_size
        image = frame if self.scale == 1.0 else cv2.resize(frame, (fw, fh), interpolation=cv2.INTER_LINEAR)
        screen = background.copy()
        screen[y0:y0 + fh, x0:x0 + fw] = image[..., None]
        return screen


def screen_frames(layout: ScreenLayout, seed: int = 7, frames: int = 40
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(screen BGR, phantom frame) pairs of the first `frames` frames of one phantom case."""
    background = layout.background()
    case = make_cases(seed, 1, max(frames, 2))[0]
    for i, (image, *_rest) in enumerate(iter_case_frames(case)):
        if i >= frames:
            return
        yield layout.compose(background, image), image


def write_recording(path: Path, screens: Iterable[np.ndarray], fps: int = 30) -> Path:
    """Screens (BGR) as a lossless FFV1 recording in Matroska, as a capture card would have seen them."""
    with av.open(str(path), "w") as container:
        stream = None
        for screen in screens:
            if stream is None:
                stream = container.add_stream("ffv1", rate=Fraction(fps))
                stream.height, stream.width = screen.shape[:2]
                stream.pix_fmt = "bgr0"
            for packet in stream.encode(av.VideoFrame.from_ndarray(screen, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def sector_box() -> tuple[int, int, int, int]:
    """The phantom frame's sector box (x, y, width, height): a raw sector stack is cut to it."""
    return tuple(int(v) for v in cv2.boundingRect(sector_region().astype(np.uint8)))


# Layouts the tests and tools/check_sector.py measure: two screen sizes, several positions and sizes.
LAYOUTS = (
    ScreenLayout((1920, 1080), (588, 259), 1.0),
    ScreenLayout((1920, 1080), (420, 150), 1.45),
    ScreenLayout((1920, 1080), (900, 120), 1.2),
    ScreenLayout((1280, 1024), (268, 231), 1.0),
    ScreenLayout((1280, 1024), (200, 190), 0.8),
    ScreenLayout((1280, 1024), (300, 130), 1.15),
)
