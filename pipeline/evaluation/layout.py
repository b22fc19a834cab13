"""The ACOUSLIC-AI folder layouts, read strictly: a bad file is an InputError naming it, never a default.

    CASES/masks/stacked_fetal_abdomen/<id>.mha       ground truth (frames, H, W): 0 / 1 optimal / 2 suboptimal
    CASES/images/stacked_fetal_ultrasound/<id>.mha   images (frames, H, W)
    CASES/circumferences/fetal_abdominal_circumferences_per_sweep.csv
                                                     uuid, subject_id, sweep_1_ac_mm .. sweep_6_ac_mm
    PRED/<id>/fetal-abdomen-segmentation.mha         the chosen frame's binary mask (2-D, or the stack)
    PRED/<id>/fetal-abdomen-frame-number.json        an integer, -1 for none
    PRED/<id>/frame-quality.json                     optional per-frame labels
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import acouslic
from pipeline.sources.stack import ACOUSLIC_IMAGES, SWEEPS_PER_CASE

MASKS_DIR = Path("masks/stacked_fetal_abdomen")
IMAGES_DIR = ACOUSLIC_IMAGES
CSV_PATH = Path("circumferences/fetal_abdominal_circumferences_per_sweep.csv")
SEG_NAME = "fetal-abdomen-segmentation.mha"
FRAME_NAME = "fetal-abdomen-frame-number.json"
QUALITY_NAME = "frame-quality.json"
N_SWEEPS = SWEEPS_PER_CASE
AC_COLUMNS = [f"sweep_{i}_ac_mm" for i in range(1, N_SWEEPS + 1)]


class InputError(Exception):
    """Bad input: the message starts with the offending file."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"{path}: {message}")


def read_mha(path: Path) -> np.ndarray:
    """An image file as a numpy array (SimpleITK's axis order: frames, rows, columns)."""
    import SimpleITK as sitk

    if not path.is_file():
        raise InputError(path, "missing file")
    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as exc:
        raise InputError(path, f"cannot read image ({str(exc).strip().splitlines()[-1]})") from None


def write_mha(array: np.ndarray, path: Path, spacing: tuple[float, ...] | None = None) -> None:
    """zlib-compressed and timestamp-free, so the same array gives the same bytes."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    if spacing is not None:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), useCompression=True)


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise InputError(path, "missing file")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"invalid JSON ({exc})") from None


def read_reference_acs(path: Path) -> dict[str, list[float | None]]:
    """Per case id, the reference AC of each sweep (None where the sweep has none)."""
    if not path.is_file():
        raise InputError(path, "missing file")
    out: dict[str, list[float | None]] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ["uuid", *AC_COLUMNS] if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(path, f"missing columns {missing}")
        for row in reader:
            acs: list[float | None] = []
            for c in AC_COLUMNS:
                v = (row[c] or "").strip()
                try:
                    x = float(v) if v else None
                except ValueError:
                    raise InputError(path, f"case {row['uuid']}: {c} is not a number: {v!r}") from None
                acs.append(x if x is not None and math.isfinite(x) else None)
            out[row["uuid"].strip()] = acs
    return out


def read_frame_number(path: Path, n_frames: int) -> int:
    value = read_json(path)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(path, f"frame number must be an integer, got {value!r}")
    if value != -1 and not 0 <= value < n_frames:
        raise InputError(path, f"frame number {value} out of range (-1 or 0..{n_frames - 1})")
    return value


def read_prediction_mask(path: Path, frame: int, shape: tuple[int, int, int]) -> np.ndarray | None:
    """The chosen frame's binary mask from a 2-D mask or a whole stack (None for frame -1 in a stack)."""
    seg = read_mha(path)
    if seg.ndim == 3 and seg.shape[0] == 1:
        seg = seg[0]
    if seg.ndim == 2:
        if seg.shape != shape[1:]:
            raise InputError(path, f"mask shape {seg.shape} != frame shape {shape[1:]}")
        mask = seg
    elif seg.ndim == 3:
        if seg.shape != shape:
            raise InputError(path, f"mask stack shape {seg.shape} != ground-truth shape {shape}")
        mask = seg[frame] if frame >= 0 else None
    else:
        raise InputError(path, f"mask must be 2-D or 3-D, got shape {seg.shape}")
    if mask is not None and not np.isin(np.unique(mask), [0, 1]).all():
        raise InputError(path, f"mask must be binary (0/1), has values {np.unique(mask)[:8].tolist()}")
    return mask


def read_quality(path: Path, n_frames: int) -> np.ndarray | None:
    """Per-frame quality labels, or None when the (optional) file is absent."""
    if not path.exists():
        return None
    value = read_json(path)
    if not isinstance(value, list) or len(value) != n_frames:
        raise InputError(path, f"expected a list of {n_frames} per-frame labels")
    try:
        return np.array([int(v) for v in value])
    except (TypeError, ValueError):
        raise InputError(path, "labels must be integers or booleans") from None


def stack_shapes(cases_dir: Path, stacks: Path = IMAGES_DIR) -> dict[str, tuple[int, int, int]]:
    """(frames, height, width) of each case's image stack (or mask stack: ``stacks`` MASKS_DIR), from the
    file headers alone."""
    import SimpleITK as sitk

    folder = cases_dir / stacks
    if not folder.is_dir():
        raise InputError(folder, "missing folder (not an ACOUSLIC-AI case folder)")
    shapes = {}
    for path in sorted(folder.glob("*.mha")):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise InputError(path, f"cannot read image ({str(exc).strip().splitlines()[-1]})") from None
        size = reader.GetSize()  # (x, y[, frames])
        depth = int(size[2]) if len(size) == 3 else 1
        shapes[path.name[: -len(".mha")]] = (depth, int(size[1]), int(size[0]))
    if not shapes:
        raise InputError(folder, "no .mha cases")
    return shapes


class CaseLabels:
    """Per-frame ground-truth labels of each case, read from its mask stack once."""

    def __init__(self, cases_dir: Path) -> None:
        self.cases_dir = cases_dir
        self._labels: dict[str, np.ndarray] = {}

    def __call__(self, case: str) -> np.ndarray:
        if case not in self._labels:
            self._labels[case] = acouslic.frame_labels(read_mha(self.cases_dir / MASKS_DIR / f"{case}.mha"))
        return self._labels[case]
