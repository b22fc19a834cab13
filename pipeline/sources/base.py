"""What every frame source gives the capture stage."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class SourceError(RuntimeError):
    """A source that cannot be opened or read; the message names the source."""


@dataclass
class SourceFrame:
    image: np.ndarray  # H x W (gray) or H x W x 3 (bgr24), uint8
    index: int  # position in the source (restarts at 0 on a loop)
    pts: float | None  # presentation time in seconds from the source's start, when it has one
    meta: dict[str, Any] = field(default_factory=dict)
    t_arrival: int | None = None  # monotonic ns when a live frame arrived (its reader thread took it)


class Source(ABC):
    """A source of frames. `live` sources deliver frames in real time by themselves (cameras, network
    streams); recorded ones are paced by the capture stage unless it floods."""

    live: bool = False
    screen: bool = False  # shows a machine's whole screen: preprocess.roi = auto looks for the sector on it
    region: tuple[int, int, int, int] | None = None  # the sector's box when the source says (DICOM regions)
    size: tuple[int, int] | None = None  # width, height once known
    pixel_spacing_mm: tuple[float, float] | None = None  # row, column, when the source gives it
    sweep_boundaries: bool = False  # frames say which sweep they belong to

    def __init__(self, uri: str, pixel_format: str) -> None:
        self.uri = uri
        self.pixel_format = pixel_format

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def read(self) -> SourceFrame | None:
        """The next frame, or None: at the end of the source, or (live sources) when no frame came within
        a short wait; `ended` tells which."""

    @property
    def ended(self) -> bool:
        """After read() gave None: whether the source is over (a live source waiting is not)."""
        return True

    @abstractmethod
    def rewind(self) -> None:
        """Start again from the first frame (for --loop)."""

    def seek(self, index: int, loop: bool) -> None:
        """Go on from the recording's frame `index` (a restarted capture), counted through its repeats
        when `loop`. A source without a cheaper way reads past the frames before it."""
        for _ in range(index):
            if self.read() is None:
                if not loop:
                    return
                self.rewind()
                self.read()

    @property
    @abstractmethod
    def fps(self) -> float:
        """Nominal frame rate, used for pacing frames without timestamps."""

    def health(self) -> dict[str, int]:
        """Counts a live source keeps (reconnects, frames its reader replaced), for capture's counters."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook, most sources hold nothing
        """Release the device or file."""

    def describe(self) -> dict[str, Any]:
        """What every source reports: kind, size, rate, pixel format, spacing and sweep boundaries."""
        size = self.size
        return {"uri": self.uri, "kind": type(self).__name__, "fps": self.fps, "live": self.live,
                "width": size[0] if size else None, "height": size[1] if size else None,
                "pixel_format": self.pixel_format,
                "pixel_spacing_mm": list(self.pixel_spacing_mm) if self.pixel_spacing_mm else None,
                "sweep_boundaries": self.sweep_boundaries}


class GeneratedSource(Source):
    """A recorded source whose frames come from a generator, started again on rewind."""

    _frames: Iterator[SourceFrame] | None = None

    @abstractmethod
    def _generate(self, start: int = 0) -> Iterator[SourceFrame]:
        """The frames from the recording's frame `start` on (a source that cannot start there, with
        `frame_total` None, is only asked for 0)."""

    def frame_total(self) -> int | None:
        """Frames in one pass of the recording, when known without reading them; then seek jumps."""
        return None

    def seek(self, index: int, loop: bool) -> None:
        total = self.frame_total()
        if total is None:
            super().seek(index, loop)
        else:
            self._frames = self._generate(index % total if loop and total else min(index, total))

    def open(self) -> None:
        self._frames = self._generate()

    def read(self) -> SourceFrame | None:
        return next(self._frames, None)

    def rewind(self) -> None:
        self._frames = self._generate()
