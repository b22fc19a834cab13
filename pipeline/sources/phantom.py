"""Phantom blind sweeps streamed live: the synthetic cases of pipeline.phantom, frame by frame, with the
sweep they belong to and their ground-truth label in the frame's source metadata."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qs, urlparse

from pipeline.phantom import HEIGHT, PIXEL_MM, SWEEPS, WIDTH, iter_case_frames, make_cases

from .base import GeneratedSource, SourceError, SourceFrame


def parse_phantom(uri: str) -> dict:
    """`phantom://SEED[?cases=N&frames=F&fps=R]` -> seed, case count, frames per sweep, frame rate."""
    parsed = urlparse("phantom://" if uri == "phantom" else uri)
    try:
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        unknown = set(query) - {"cases", "frames", "fps"}
        if unknown:
            raise ValueError(f"unknown parameter {sorted(unknown)[0]!r}")
        spec = {"seed": int(parsed.netloc or 0), "cases": int(query.get("cases", 1)),
                "frames": int(query.get("frames", 140)), "fps": float(query.get("fps", 30))}
    except ValueError as exc:
        raise SourceError(f"source {uri}: expected phantom://SEED[?cases=N&frames=F&fps=R] ({exc})") from None
    if spec["seed"] < 0 or spec["cases"] < 1 or spec["frames"] < 2 or spec["fps"] <= 0:
        raise SourceError(f"source {uri}: needs seed >= 0, cases >= 1, frames >= 2, fps > 0")
    return spec


class PhantomSource(GeneratedSource):
    def __init__(self, uri: str, pixel_format: str) -> None:
        super().__init__(uri, pixel_format)
        self.spec = parse_phantom(uri)
        self.size, self.pixel_spacing_mm, self.sweep_boundaries = (WIDTH, HEIGHT), (PIXEL_MM, PIXEL_MM), True

    @property
    def fps(self) -> float:
        return self.spec["fps"]

    def frame_total(self) -> int:
        """Known from the spec, so a seek renders none of the frames before its own."""
        return self.spec["cases"] * SWEEPS * self.spec["frames"]

    def _generate(self, start: int = 0) -> Iterator[SourceFrame]:
        offset = 0  # index of the case's first frame
        for case in make_cases(self.spec["seed"], self.spec["cases"], self.spec["frames"]):
            frames = SWEEPS * case.frames_per_sweep
            if offset + frames > start:
                for image, sweep, frame, truth in iter_case_frames(case, max(0, start - offset)):
                    if self.pixel_format == "bgr24":
                        image = image[..., None].repeat(3, axis=-1)
                    case_frame = sweep * case.frames_per_sweep + frame
                    meta = {"case": case.uid, "sweep": sweep, "sweep_frame": frame, "case_frame": case_frame,
                            "pixel_spacing_mm": [PIXEL_MM, PIXEL_MM], "gt_label": int(truth["label"])}
                    yield SourceFrame(image, offset + case_frame, (offset + case_frame) / self.fps, meta)
            offset += frames

    def describe(self) -> dict:
        return {**super().describe(), **self.spec}
