"""In-memory test pattern: frames exist before they are asked for, so a run over it measures transport and
processing with no decode cost (the benchmark's 1080p source)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import numpy as np

from .base import Source, SourceError, SourceFrame

PATTERN_COUNT = 16  # distinct frames cycled through (enough that consecutive frames differ)


def parse_synthetic(uri: str) -> dict:
    """`synthetic://WxH?fps=F&frames=N&channels=C` -> size, fps, frame count (None = endless), channels."""
    parsed = urlparse(uri)
    size = parsed.netloc or parsed.path.lstrip("/") or "1920x1080"
    try:
        width, height = (int(v) for v in size.lower().split("x"))
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        unknown = set(query) - {"fps", "frames", "channels"}
        if unknown:
            raise ValueError(f"unknown parameter {sorted(unknown)[0]!r}")
        spec = {"width": width, "height": height, "fps": float(query.get("fps", 30)),
                "frames": int(query["frames"]) if "frames" in query else None,
                "channels": int(query.get("channels", 1))}
    except ValueError as exc:
        raise SourceError(f"source {uri}: expected synthetic://WIDTHxHEIGHT[?fps=F&frames=N&channels=1|3] "
                          f"({exc})") from None
    sane = (16 <= width <= 8192 and 16 <= height <= 8192 and spec["fps"] > 0 and spec["channels"] in (1, 3)
            and (spec["frames"] is None or spec["frames"] >= 1))
    if not sane:
        raise SourceError(f"source {uri}: size must be 16..8192, fps > 0, frames >= 1, channels 1 or 3")
    return spec


def make_pattern(width: int, height: int, channels: int, count: int = PATTERN_COUNT) -> np.ndarray:
    """`count` frames of a sector-like gradient with a moving bright disc over fixed-seed speckle."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    base = (rng.rayleigh(40.0, size=(height, width)) * (1.0 - yy / height * 0.6)).clip(0, 255)
    frames = np.empty((count, height, width), dtype=np.uint8)
    for i in range(count):
        cx = width * (0.3 + 0.4 * i / count)
        disc = ((xx - cx) ** 2 + (yy - height / 2) ** 2) < (min(width, height) / 6) ** 2
        frames[i] = np.where(disc, np.minimum(base + 120, 255), base).astype(np.uint8)
    if channels == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    return frames


class SyntheticSource(Source):
    def __init__(self, uri: str, pixel_format: str) -> None:
        super().__init__(uri, pixel_format)
        self.spec = parse_synthetic(uri)
        if pixel_format == "bgr24":
            self.spec["channels"] = 3
        self._frames: np.ndarray | None = None
        self.size = (self.spec["width"], self.spec["height"])
        self._index = 0

    @property
    def fps(self) -> float:
        return self.spec["fps"]

    def open(self) -> None:
        self._frames = make_pattern(self.spec["width"], self.spec["height"], self.spec["channels"])

    def read(self) -> SourceFrame | None:
        if self.spec["frames"] is not None and self._index >= self.spec["frames"]:
            return None
        index, self._index = self._index, self._index + 1
        return SourceFrame(self._frames[index % len(self._frames)], index, index / self.fps)

    def rewind(self) -> None:
        self._index = 0
