"""Video files (MP4, MKV, AVI, ...) through PyAV (FFmpeg); network streams and capture cards are live
sources of their own (stream.py, v4l2.py)."""

from __future__ import annotations

import av

from .base import Source, SourceError, SourceFrame


class VideoSource(Source):
    screen = True  # a recording of a machine's video output

    def __init__(self, uri: str, pixel_format: str) -> None:
        super().__init__(uri, pixel_format)
        self._container = None
        self._frames = None
        self._fps = 30.0

    @property
    def fps(self) -> float:
        return self._fps

    def open(self) -> None:
        try:
            self._container = av.open(self.uri, timeout=10.0)
            stream = self._container.streams.video[0]
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(f"source {self.uri}: cannot open: {exc}") from None
        except IndexError:
            raise SourceError(f"source {self.uri}: has no video stream") from None
        stream.thread_type = "AUTO"
        if stream.average_rate:
            self._fps = float(stream.average_rate)
        self.size = (stream.codec_context.width, stream.codec_context.height)
        self._stream = stream
        self._frames = self._container.decode(stream)
        self._first_pts: float | None = None
        self._index = 0

    def read(self) -> SourceFrame | None:
        try:
            frame = next(self._frames)
        except StopIteration:
            return None
        except av.FFmpegError as exc:
            raise SourceError(f"source {self.uri}: decode failed at frame {self._index}: {exc}") from None
        pts = frame.time
        if pts is not None:
            self._first_pts = pts if self._first_pts is None else self._first_pts
            pts -= self._first_pts
        index, self._index = self._index, self._index + 1
        return SourceFrame(frame.to_ndarray(format=self.pixel_format), index, pts)

    def rewind(self) -> None:
        self._container.seek(0, stream=self._stream)
        self._frames = self._container.decode(self._stream)
        self._first_pts = None
        self._index = 0

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def describe(self) -> dict:
        out = super().describe()
        if self._container is not None:
            out.update(codec=self._stream.codec_context.name, width=self._stream.width,
                       height=self._stream.height, frames=self._stream.frames or None)
        return out
