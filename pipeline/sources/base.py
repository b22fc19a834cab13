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


class Source(ABC):
    """A source of frames. `live` sources deliver frames in real time by themselves (cameras, network
    streams); recorded ones are paced by the capture stage unless it floods."""

    live: bool = False

    def __init__(self, uri: str, pixel_format: str) -> None:
        self.uri = uri
        self.pixel_format = pixel_format

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def read(self) -> SourceFrame | None:
        """The next frame, or None at the end of the source."""

    @abstractmethod
    def rewind(self) -> None:
        """Start again from the first frame (for --loop)."""

    @property
    @abstractmethod
    def fps(self) -> float:
        """Nominal frame rate, used for pacing frames without timestamps."""

    def close(self) -> None:  # noqa: B027 - optional hook, most sources hold nothing
        """Release the device or file."""

    def describe(self) -> dict[str, Any]:
        return {"uri": self.uri, "kind": type(self).__name__, "fps": self.fps, "live": self.live}


class GeneratedSource(Source):
    """A recorded source whose frames come from a generator, started again on rewind."""

    _frames: Iterator[SourceFrame] | None = None

    @abstractmethod
    def _generate(self) -> Iterator[SourceFrame]: ...

    def open(self) -> None:
        self._frames = self._generate()

    def read(self) -> SourceFrame | None:
        return next(self._frames, None)

    def rewind(self) -> None:
        self._frames = self._generate()
