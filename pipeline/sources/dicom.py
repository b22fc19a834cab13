"""DICOM ultrasound cine (pydicom): multi-frame and single-frame US images, uncompressed, RLE Lossless or
JPEG Baseline (YBR_FULL_422 colour), as ultrasound machines export them.

Frames are paced by Frame Time, Frame Time Vector or Cine Rate. Pixel spacing comes from the Sequence of
Ultrasound Regions (Physical Delta X/Y, in cm when the units code is 3) or Pixel Spacing, and the region's
bounds are the sector's box (so `preprocess.roi = auto` crops to it without looking). A folder of DICOM files
of one series plays as one source in instance order: each multi-frame file is one sweep, single-frame files
together are one. Nothing of the patient (name, ID, dates, UIDs) goes into a frame's metadata.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .base import GeneratedSource, SourceError, SourceFrame

DICOM_SUFFIXES = (".dcm", ".dicom")
DEFAULT_FPS = 30.0
CM_UNITS = 3  # Physical Units X/Y Direction: 3 = cm
TISSUE_REGION = 1  # Region Spatial Format: 1 = 2D (tissue or flow)


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise SourceError("reading DICOM needs pydicom (pip install 'sweepstream[dicom]')") from None
    return pydicom


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom_path(uri: str) -> bool:
    path = Path(uri)
    if path.is_dir():
        return any(p.is_file() and _is_dicom_file(p) for p in path.iterdir())
    return uri.lower().endswith(DICOM_SUFFIXES) or (path.is_file() and _is_dicom_file(path))


@dataclass(frozen=True)
class Calibration:
    """What a file says about its frames' geometry and timing."""

    spacing_mm: tuple[float, float] | None  # row, column
    region: tuple[int, int, int, int] | None  # x, y, width, height of the imaging region
    frame_times_s: tuple[float, ...] | None  # per-frame intervals (Frame Time Vector), or None
    period_s: float  # the interval when there is no vector


def calibration(ds) -> Calibration:
    """Spacing, region and frame timing of a dataset, from the attributes ultrasound machines write."""
    spacing, region = None, None
    regions = [r for r in ds.get("SequenceOfUltrasoundRegions", [])
               if r.get("RegionSpatialFormat", TISSUE_REGION) == TISSUE_REGION]
    if regions:
        r = max(regions, key=lambda r: (r.RegionLocationMaxX1 - r.RegionLocationMinX0)
                * (r.RegionLocationMaxY1 - r.RegionLocationMinY0))
        region = (int(r.RegionLocationMinX0), int(r.RegionLocationMinY0),
                  int(r.RegionLocationMaxX1 - r.RegionLocationMinX0 + 1),
                  int(r.RegionLocationMaxY1 - r.RegionLocationMinY0 + 1))
        units = (r.get("PhysicalUnitsXDirection"), r.get("PhysicalUnitsYDirection"))
        if units == (CM_UNITS, CM_UNITS) and "PhysicalDeltaX" in r and "PhysicalDeltaY" in r:
            spacing = (abs(float(r.PhysicalDeltaY)) * 10.0, abs(float(r.PhysicalDeltaX)) * 10.0)
    if spacing is None and "PixelSpacing" in ds:
        spacing = (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]))
    vector = None
    if "FrameTimeVector" in ds:
        vector = tuple(float(v) / 1000.0 for v in ds.FrameTimeVector)
    if "FrameTime" in ds and float(ds.FrameTime) > 0:
        period = float(ds.FrameTime) / 1000.0
    elif "CineRate" in ds and float(ds.CineRate) > 0:
        period = 1.0 / float(ds.CineRate)
    elif "RecommendedDisplayFrameRate" in ds and float(ds.RecommendedDisplayFrameRate) > 0:
        period = 1.0 / float(ds.RecommendedDisplayFrameRate)
    else:
        period = 1.0 / DEFAULT_FPS
    return Calibration(spacing, region, vector, period)


def dicom_files(uri: str) -> list[Path]:
    """The files a DICOM URI names, of one series, in instance order; one clear error otherwise."""
    pydicom = _pydicom()
    path = Path(uri)
    if path.is_file():
        return [path]
    if not path.exists():
        raise SourceError(f"source {uri}: no such file or folder")
    found = []
    for file in sorted(p for p in path.iterdir() if p.is_file() and _is_dicom_file(p)):
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises several types for a damaged file
            raise SourceError(f"source {file}: not a readable DICOM file ({exc})") from None
        found.append((str(ds.get("SeriesInstanceUID", "")), int(ds.get("InstanceNumber", 0) or 0), file))
    if not found:
        raise SourceError(f"source {uri}: no DICOM files in the folder")
    series = {s for s, _, _ in found}
    if len(series) > 1:
        raise SourceError(f"source {uri}: the folder holds {len(series)} series; give one series' folder")
    return [file for _, _, file in sorted(found, key=lambda item: (item[1], item[2].name))]


class DicomSource(GeneratedSource):
    def __init__(self, uri: str, pixel_format: str) -> None:
        super().__init__(uri, pixel_format)
        self.files = dicom_files(uri)
        self._fps = DEFAULT_FPS
        self.transfer_syntax: str | None = None
        self.photometric: str | None = None
        self.frame_count = 0

    @property
    def fps(self) -> float:
        return self._fps

    def open(self) -> None:
        """Reads the headers now, so an unsupported file is one clear error before the stages start."""
        pydicom = _pydicom()
        try:
            first = pydicom.dcmread(self.files[0], stop_before_pixels=True)
        except Exception as exc:  # pydicom raises several types for a damaged file
            raise SourceError(f"source {self.files[0]}: not a readable DICOM file ({exc})") from None
        if "Rows" not in first or "Columns" not in first:
            raise SourceError(f"source {self.files[0]}: has no image (no Rows/Columns)")
        if int(first.get("BitsAllocated", 8)) != 8:
            raise SourceError(f"source {self.files[0]}: {first.BitsAllocated}-bit pixels; ultrasound frames "
                              "are 8-bit")
        info = calibration(first)
        self.pixel_spacing_mm, self.region = info.spacing_mm, info.region
        self._fps = 1.0 / info.period_s
        self.size = (int(first.Columns), int(first.Rows))
        self.transfer_syntax = first.file_meta.TransferSyntaxUID.name
        self.photometric = str(first.get("PhotometricInterpretation", ""))
        self.screen = info.region is None  # an exported screen without regions: find the sector
        self.sweep_boundaries = len(self.files) > 1 and int(first.get("NumberOfFrames", 1) or 1) > 1
        super().open()

    def _frames_of(self, path: Path) -> tuple[Iterator[np.ndarray], Calibration, str]:
        pydicom = _pydicom()
        try:
            ds = pydicom.dcmread(path)
            frames = pydicom.pixels.iter_pixels(ds)  # decodes RLE natively, JPEG with pylibjpeg or Pillow
        except Exception as exc:  # pydicom raises several types for a damaged file
            raise SourceError(f"source {path}: cannot read DICOM pixels ({exc})") from None
        return frames, calibration(ds), str(ds.get("PhotometricInterpretation", ""))

    def _convert(self, image: np.ndarray, photometric: str) -> np.ndarray:
        """pydicom gives colour as RGB (YBR converted): grey by luma or BGR, as the ring wants."""
        if image.ndim == 3:
            code = cv2.COLOR_RGB2GRAY if self.pixel_format == "gray" else cv2.COLOR_RGB2BGR
            return cv2.cvtColor(image, code)
        if photometric == "MONOCHROME1":
            image = 255 - image
        if self.pixel_format == "bgr24":
            return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        return image

    def _generate(self) -> Iterator[SourceFrame]:
        index, t, single_frames = 0, 0.0, len(self.files) > 1 and not self.sweep_boundaries
        for number, path in enumerate(self.files):
            frames, info, photometric = self._frames_of(path)
            sweep = 0 if single_frames else number
            try:
                for i, image in enumerate(frames):
                    if image.dtype != np.uint8:
                        raise SourceError(f"source {path}: {image.dtype} pixels; expected 8-bit")
                    meta = {"case": Path(self.uri).name, "sweep": sweep,
                            "sweep_frame": index if single_frames else i}
                    if info.spacing_mm:
                        meta["pixel_spacing_mm"] = list(info.spacing_mm)
                    yield SourceFrame(np.ascontiguousarray(self._convert(image, photometric)), index, t, meta)
                    step = info.frame_times_s[i + 1] if info.frame_times_s and i + 1 < len(
                        info.frame_times_s) else info.period_s
                    t += step
                    index += 1
            except SourceError:
                raise
            except Exception as exc:  # a decoder's own error types (pydicom, pylibjpeg, Pillow)
                raise SourceError(f"source {path}: cannot decode frame {index}: {exc}") from None
        self.frame_count = index

    def describe(self) -> dict:
        return {**super().describe(), "files": len(self.files), "transfer_syntax": self.transfer_syntax,
                "photometric": self.photometric, "region": list(self.region) if self.region else None}
