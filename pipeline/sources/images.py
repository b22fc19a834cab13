"""A folder of still images (PNG, JPEG, BMP, TIFF) played as one sweep in name order, read with OpenCV."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2

from pipeline.sector import to_gray

from .base import GeneratedSource, SourceError, SourceFrame

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGES_FPS = 30.0  # nominal: still images carry no frame rate


def image_files(uri: str) -> list[Path]:
    path = Path(uri)
    return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else []


def is_image_folder(uri: str) -> bool:
    return bool(image_files(uri))


class ImageFolderSource(GeneratedSource):
    screen = True  # exported screenshots show the machine's screen

    def __init__(self, uri: str, pixel_format: str) -> None:
        super().__init__(uri, pixel_format)
        self.files = image_files(uri)

    @property
    def fps(self) -> float:
        return IMAGES_FPS

    def frame_total(self) -> int:
        return len(self.files)

    def _generate(self, start: int = 0) -> Iterator[SourceFrame]:
        for index, path in enumerate(self.files[start:], start=start):
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                raise SourceError(f"source {path}: not a readable image")
            if self.pixel_format == "gray":
                image = to_gray(image)  # luma, as everywhere (imread's own grey conversion rounds apart)
            self.size = (image.shape[1], image.shape[0])
            yield SourceFrame(image, index, index / self.fps)

    def describe(self) -> dict:
        return {**super().describe(), "images": len(self.files)}
