"""Recorded sweep stacks: ACOUSLIC-AI-style image volumes (.mha, .mhd, .nrrd, .nii) of frames x H x W,
one case per file, read with SimpleITK. A folder streams every stack in it (or in its
images/stacked_fetal_ultrasound/, the challenge's layout) in name order.

A stack holds the blind sweeps of one case: ACOUSLIC's 840 frames are 6 sweeps of 140, so a stack whose
depth divides by 6 is split into 6 equal sweeps; any other depth is one sweep. Every frame carries its
case id (the file name without extension), sweep, frame within the sweep and within the case, and the
pixel spacing from the file, which makes biometry calibrated without configuration.

Stacks are read on a thread of their own, the next one while the current one plays: an ACOUSLIC stack is
350 MB of pixels, which a slow cart takes seconds to decompress, and a capture blocked that long between two
frames would be taken by the watchdog for a stalled one.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .base import GeneratedSource, SourceError, SourceFrame

STACK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nii", ".nii.gz")
ACOUSLIC_IMAGES = Path("images/stacked_fetal_ultrasound")
SWEEPS_PER_CASE = 6
STACK_FPS = 30.0  # nominal: the files carry no frame rate


def is_stack_path(uri: str) -> bool:
    return uri.lower().endswith(STACK_SUFFIXES) or Path(uri).is_dir()


def stack_files(uri: str) -> list[Path]:
    """The stacks a stack URI names, in streaming order; a clear error when there are none."""
    path = Path(uri)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise SourceError(f"source {uri}: no such file or folder")
    folder = path / ACOUSLIC_IMAGES if (path / ACOUSLIC_IMAGES).is_dir() else path
    files = sorted(p for p in folder.iterdir() if p.name.lower().endswith(STACK_SUFFIXES))
    if not files:
        raise SourceError(f"source {uri}: no image stacks ({', '.join(STACK_SUFFIXES)}) in {folder}")
    return files


def case_id(path: Path) -> str:
    name = path.name
    for suffix in STACK_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def frames_per_sweep(depth: int) -> int:
    return depth // SWEEPS_PER_CASE if depth % SWEEPS_PER_CASE == 0 else depth


class StackSource(GeneratedSource):
    def __init__(self, uri: str, pixel_format: str) -> None:
        super().__init__(uri, pixel_format)
        self.files = stack_files(uri)
        self.sweep_boundaries = True
        self._depth_list: list[int] | None = None

    @property
    def fps(self) -> float:
        return STACK_FPS

    def open(self) -> None:
        try:
            import SimpleITK  # noqa: F401
        except ImportError:
            raise SourceError(f"source {self.uri}: reading image stacks needs SimpleITK "
                              "(pip install 'sweepstream[mha]')") from None
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stack-reader")
        super().open()

    def _load(self, number: int) -> Future | None:
        """Start reading the stack `number` (None past the last)."""
        return self._reader.submit(self._read, self.files[number]) if number < len(self.files) else None

    def close(self) -> None:
        if getattr(self, "_reader", None) is not None:
            self._reader.shutdown(wait=False, cancel_futures=True)

    def _read(self, path: Path) -> tuple[np.ndarray, tuple[float, float] | None]:
        import SimpleITK as sitk

        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise SourceError(f"source {path}: cannot read image stack "
                              f"({str(exc).strip().splitlines()[-1]})") from None
        array = sitk.GetArrayFromImage(image)
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3 or array.dtype != np.uint8:
            raise SourceError(f"source {path}: expected a uint8 stack (frames, H, W), got {array.dtype} "
                              f"{list(array.shape)}")
        spacing = image.GetSpacing()  # (x, y, frame)
        return array, (float(spacing[1]), float(spacing[0]))

    def _depths(self) -> list[int]:
        """Frames per stack from the files' headers alone (no pixels decompressed)."""
        import SimpleITK as sitk

        if self._depth_list is None:
            depths = []
            for path in self.files:
                reader = sitk.ImageFileReader()
                reader.SetFileName(str(path))
                try:
                    reader.ReadImageInformation()
                except RuntimeError as exc:
                    raise SourceError(f"source {path}: cannot read image stack "
                                      f"({str(exc).strip().splitlines()[-1]})") from None
                size = reader.GetSize()
                depths.append(int(size[2]) if len(size) > 2 else 1)
            self._depth_list = depths
        return self._depth_list

    def frame_total(self) -> int:
        """From the headers, so a seek skips the stacks before its frame undecompressed (an ACOUSLIC stack
        is 350 MB of pixels)."""
        return sum(self._depths())

    def _generate(self, start: int = 0) -> Iterator[SourceFrame]:
        first, index = 0, 0
        if start:
            depths = self._depths()
            while first < len(depths) and index + depths[first] <= start:
                index += depths[first]
                first += 1
        pending = self._load(first)
        for number in range(first, len(self.files)):
            path = self.files[number]
            stack, spacing = pending.result()  # raises the reader's SourceError
            pending = self._load(number + 1)
            self.size, self.pixel_spacing_mm = (stack.shape[2], stack.shape[1]), spacing
            per_sweep = frames_per_sweep(len(stack))
            skip = max(0, start - index)
            index += skip
            for i, image in enumerate(stack[skip:], start=skip):
                if self.pixel_format == "bgr24":
                    image = np.repeat(image[..., None], 3, axis=-1)
                meta = {"case": case_id(path), "sweep": i // per_sweep, "sweep_frame": i % per_sweep,
                        "case_frame": i, "pixel_spacing_mm": list(spacing)}
                yield SourceFrame(np.ascontiguousarray(image), index, index / self.fps, meta)
                index += 1

    def describe(self) -> dict:
        return {**super().describe(), "stacks": len(self.files)}
