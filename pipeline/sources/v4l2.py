"""Capture cards (HDMI/SDI to USB or PCIe, UVC) as V4L2 devices, through PyAV's `v4l2` input.

PyAV rather than OpenCV's CAP_V4L2: the frames then come through the same decoder and the same
newest-frame reader as network streams and files, MJPG decodes with FFmpeg's decoder, and FFmpeg's v4l2
input asks the driver for 256 memory-mapped buffers (the driver grants what it can, typically 32: over
half a second of 1080p60), so a busy moment never drops frames in the driver.

`/dev/video0`, or `v4l2:///dev/video0?size=1920x1080&fps=60&format=yuyv`. Without a format, uncompressed
YUYV is tried, then NV12, then whatever the driver gives (often MJPG, which costs a decode and is lossy).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import av

from .base import SourceError
from .live import LiveSource

FORMATS = {"yuyv": "yuyv422", "yuyv422": "yuyv422", "nv12": "nv12", "mjpg": "mjpeg", "mjpeg": "mjpeg",
           "uyvy": "uyvy422", "gray": "gray"}
PREFERRED = ("yuyv422", "nv12", None)


@dataclass(frozen=True)
class V4l2Spec:
    device: str
    size: tuple[int, int] | None = None
    fps: float | None = None
    input_format: str | None = None

    def options(self, input_format: str | None) -> dict[str, str]:
        options = {}
        if self.size:
            options["video_size"] = f"{self.size[0]}x{self.size[1]}"
        if self.fps:
            options["framerate"] = f"{self.fps:g}"
        if input_format:
            options["input_format"] = input_format
        return options


def is_v4l2(uri: str) -> bool:
    return uri.startswith(("v4l2://", "/dev/video"))


def parse_v4l2(uri: str) -> V4l2Spec:
    """`/dev/videoN` or `v4l2:///dev/videoN?size=WxH&fps=F&format=yuyv|nv12|mjpg`."""
    if not uri.startswith("v4l2://"):
        return V4l2Spec(uri)
    parsed = urlparse(uri)
    device = parsed.path or ""
    try:
        query = {k: v[-1] for k, v in parse_qs(parsed.query, strict_parsing=bool(parsed.query)).items()}
        unknown = set(query) - {"size", "fps", "format"}
        if unknown:
            raise ValueError(f"unknown parameter {sorted(unknown)[0]!r}")
        size = tuple(int(v) for v in query["size"].lower().split("x")) if "size" in query else None
        if size is not None and (len(size) != 2 or min(size) < 16):
            raise ValueError(f"size {query['size']!r} is not WIDTHxHEIGHT")
        fps = float(query["fps"]) if "fps" in query else None
        if fps is not None and not 0 < fps <= 1000:
            raise ValueError(f"fps {fps:g} is not in (0, 1000]")
        fmt = query.get("format")
        if fmt is not None and fmt.lower() not in FORMATS:
            raise ValueError(f"format {fmt!r} is not one of {', '.join(sorted(FORMATS))}")
    except ValueError as exc:
        raise SourceError(f"source {uri}: expected v4l2:///dev/videoN[?size=WxH&fps=F&format=yuyv|nv12|mjpg] "
                          f"({exc})") from None
    if not device.startswith("/dev/"):
        raise SourceError(f"source {uri}: expected a device path such as v4l2:///dev/video0")
    return V4l2Spec(device, size, fps, FORMATS[fmt.lower()] if fmt else None)


class V4l2Source(LiveSource):
    def __init__(self, uri: str, pixel_format: str) -> None:
        super().__init__(uri, pixel_format)
        self.spec = parse_v4l2(uri)
        self.input_format: str | None = None

    def _open_container(self, timeout: tuple[float, float]) -> av.container.InputContainer:
        formats = (self.spec.input_format,) if self.spec.input_format else PREFERRED
        for fmt in formats[:-1]:  # the preferred formats the device may lack at this size and rate
            try:
                container = self._open_as(fmt, timeout)
            except av.FFmpegError:
                continue
            return container
        return self._open_as(formats[-1], timeout)

    def _open_as(self, input_format: str | None, timeout: tuple[float, float]) -> av.container.InputContainer:
        container = av.open(self.spec.device, format="v4l2", options=self.spec.options(input_format),
                            timeout=timeout)
        self.input_format = input_format or "driver default"
        return container

    def open(self) -> None:
        if not Path(self.spec.device).exists():
            raise SourceError(f"source {self.uri}: no such device {self.spec.device}")
        super().open()

    def describe(self) -> dict:
        return {**super().describe(), "device": self.spec.device, "input_format": self.input_format}
