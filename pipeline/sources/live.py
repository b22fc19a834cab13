"""What capture cards and network streams share: opened once before the stages start (so a missing device
or an unreachable URL is one clear error), then read by a `NewestFrameReader` thread through PyAV."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import av

from .base import Source, SourceError, SourceFrame
from .reader import NewestFrameReader

WAIT_S = 0.05  # longest a read waits for a frame, so the capture loop keeps reporting while a source is down
OPEN_TIMEOUT_S = 10.0
STALL_S = 2.0  # no data for this long is a stalled stream: reconnect


def av_frames(container: av.container.InputContainer, pixel_format: str
              ) -> Iterator[tuple[Any, float | None]]:
    """Decoded frames of the first video stream as (ndarray, pts in s), decoded with slice threads only
    (frame threads hold frames back, one per thread)."""
    stream = container.streams.video[0]
    stream.thread_type = "SLICE"
    for frame in container.decode(stream):
        yield frame.to_ndarray(format=pixel_format), frame.time


class LiveSource(Source):
    """A source that delivers frames in real time by itself; subclasses say how to open it."""

    live = True
    screen = True
    reconnect = True

    def __init__(self, uri: str, pixel_format: str) -> None:
        super().__init__(uri, pixel_format)
        self.reader: NewestFrameReader | None = None
        self._fps = 30.0
        self.codec: str | None = None

    @abstractmethod
    def _open_container(self, timeout: tuple[float, float]) -> av.container.InputContainer:
        """The opened container (PyAV), or an av.FFmpegError / OSError."""

    def _opened(self, timeout: tuple[float, float]) -> tuple[AbstractContextManager, Iterator]:
        container = self._open_container(timeout)
        if not container.streams.video:
            container.close()
            raise SourceError(f"source {self.uri}: has no video stream")
        stream = container.streams.video[0]
        self.size = (stream.codec_context.width, stream.codec_context.height)
        self.codec = stream.codec_context.name
        if stream.average_rate:
            self._fps = float(stream.average_rate)
        return container, av_frames(container, self.pixel_format)

    def open(self) -> None:
        try:
            first = self._opened((OPEN_TIMEOUT_S, STALL_S))
        except av.ProtocolNotFoundError:
            scheme = self.uri.partition(":")[0]
            raise SourceError(f"source {self.uri}: this FFmpeg (PyAV's) cannot read {scheme}:// "
                              "streams") from None
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(f"source {self.uri}: cannot open: {exc}") from None
        self.reader = NewestFrameReader(self.uri, lambda: self._opened((STALL_S, STALL_S)),
                                        reconnect=self.reconnect)
        self.reader.start(first)

    @property
    def fps(self) -> float:
        return self._fps

    def read(self) -> SourceFrame | None:
        return self.reader.take(WAIT_S)

    @property
    def ended(self) -> bool:
        return self.reader is None or self.reader.ended

    def rewind(self) -> None:
        raise SourceError(f"source {self.uri}: a live source cannot loop")

    def close(self) -> None:
        if self.reader is not None:
            self.reader.stop()
            self.reader = None

    def health(self) -> dict[str, int]:
        reader = self.reader
        if reader is None:
            return {}
        return {"reconnects": reader.reconnects, "reconnected": reader.reconnected,
                "source_overwritten": reader.overwritten}

    def describe(self) -> dict:
        return {**super().describe(), "codec": self.codec}
