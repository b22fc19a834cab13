"""ACOUSLIC-format training cases for the heads trainer: the folder checked before any work, the split by
subject, and the prepared-frame cache.

A case is a stack of 840 frames of 562 x 744 uint8 (351 MB decoded) in a zlib-compressed .mha, which can
only be read whole; an epoch visits frames of every case in random order. So each case is read once and
its frames are prepared by the pipeline's own letterbox for the bundle being trained (bicubic for FetalCLIP),
masks through the same letterbox, and kept as uncompressed .npy files that epochs read lazily by memory
map: every frame's model input (F x S x S bytes) and the soft masks of the labelled frames only (the rest
are empty). A cache entry is keyed by the letterbox and the source files' sizes and times, and written
under a temporary name first, so an interrupted build never leaves a half entry.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import acouslic
from pipeline.evaluation.layout import CSV_PATH, IMAGES_DIR, MASKS_DIR, InputError, read_mha, stack_shapes
from pipeline.letterbox import Letterbox

from .data import prepare
from .options import TrainError

CACHE_VERSION = 1
STRATA = {"optimal": acouslic.OPTIMAL, "suboptimal": acouslic.SUBOPTIMAL, "background": 0}
"""Sampling strata of ACOUSLIC frames by their ground-truth label."""


@dataclass(frozen=True)
class CaseFiles:
    """One case of an ACOUSLIC folder: its id, subject and stacks (frames, height, width)."""

    case_id: str
    subject: str
    image: Path
    mask: Path
    shape: tuple[int, int, int]


def read_subjects(cases_dir: Path, case_ids: Sequence[str]) -> dict[str, str]:
    """Subject of each case from the circumferences CSV's ``subject_id``; a case is its own subject when
    the folder has no CSV or the CSV no ``subject_id`` column. A CSV that lacks a case is an error naming
    it: the split would otherwise guess."""
    path = cases_dir / CSV_PATH
    if not path.is_file():
        return {case: case for case in case_ids}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if "uuid" not in (reader.fieldnames or []):
            raise TrainError(f"{path}: no 'uuid' column")
        rows = {row["uuid"].strip(): (row.get("subject_id") or "").strip() for row in reader}
    missing = [case for case in case_ids if case not in rows]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise TrainError(f"{path}: lacks {len(missing)} case(s) of the folder ({shown})")
    return {case: rows[case] or case for case in case_ids}


def find_cases(cases_dir: Path) -> list[CaseFiles]:
    """Every case of the folder, checked from file headers alone: each image stack has a mask stack of
    the same shape, and the CSV (if any) names every case. One TrainError line naming the file otherwise."""
    try:
        images = stack_shapes(cases_dir)
        masks = stack_shapes(cases_dir, MASKS_DIR) if (cases_dir / MASKS_DIR).is_dir() else {}
    except InputError as exc:
        raise TrainError(str(exc)) from None
    cases = []
    for case_id, shape in images.items():
        mask = cases_dir / MASKS_DIR / f"{case_id}.mha"
        if case_id not in masks:
            raise TrainError(f"{mask}: missing (case {case_id} has an image stack but no mask stack)")
        if masks[case_id] != shape:
            raise TrainError(f"{mask}: mask stack {masks[case_id]} does not match its image stack {shape}")
        cases.append((case_id, shape, mask))
    subjects = read_subjects(cases_dir, [case_id for case_id, _, _ in cases])
    return [CaseFiles(case_id, subjects[case_id], cases_dir / IMAGES_DIR / f"{case_id}.mha", mask, shape)
            for case_id, shape, mask in cases]


def split_by_subject(cases: Sequence[CaseFiles], *, val_fraction: float, folds: int, fold: int, seed: int,
                     where: Path) -> tuple[list[CaseFiles], list[CaseFiles]]:
    """(train, validation) with no subject on both sides. Subjects are shuffled by ``seed``; with
    ``folds`` > 1 validation is fold ``fold`` of a round-robin assignment, else the first
    ceil(``val_fraction`` x subjects) subjects."""
    subjects = sorted({case.subject for case in cases})
    order = [subjects[i] for i in np.random.default_rng(seed).permutation(len(subjects))]
    held = set(order[fold::folds] if folds > 1 else order[: math.ceil(val_fraction * len(order))])
    train = [case for case in cases if case.subject not in held]
    val = [case for case in cases if case.subject in held]
    if not val or not train:
        side = "validation" if not val else "training"
        raise TrainError(f"{where}: {len(cases)} case(s) of {len(subjects)} subject(s) leave the {side} "
                         f"split empty (split by subject; --val-fraction {val_fraction}, --folds {folds})")
    return train, val


def link_cases(cases: Sequence[CaseFiles], source: Path, folder: Path) -> Path:
    """``folder`` as an ACOUSLIC folder of just these cases (stacks symlinked, the CSV's rows copied), so
    tools/evaluate.py scores exactly the validation split."""
    shutil.rmtree(folder, ignore_errors=True)
    for stacks in (IMAGES_DIR, MASKS_DIR, CSV_PATH.parent):
        (folder / stacks).mkdir(parents=True)
    for case in cases:
        (folder / IMAGES_DIR / case.image.name).symlink_to(case.image.resolve())
        (folder / MASKS_DIR / case.mask.name).symlink_to(case.mask.resolve())
    if (source / CSV_PATH).is_file():
        with (source / CSV_PATH).open(newline="") as f:
            rows = list(csv.reader(f))
        keep = {case.case_id for case in cases}
        with (folder / CSV_PATH).open("w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows([rows[0], *(r for r in rows[1:] if r[0] in keep)])
    return folder


@dataclass
class PreparedCase:
    """One case's prepared frames, memory-mapped from the cache: model inputs [F, S, S] of every frame,
    labels [F], and soft masks 0..255 [P, S, S] of the P labelled frames (``mask_row`` maps a frame to its
    row, -1 for an empty mask)."""

    files: CaseFiles
    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    mask_row: np.ndarray

    def mask(self, frame: int) -> np.ndarray:
        row = self.mask_row[frame]
        return self.masks[row] if row >= 0 else np.zeros(self.images.shape[1:], np.uint8)


def cache_key(files: CaseFiles, letterbox: Letterbox) -> str:
    """What a cache entry depends on: the letterbox and the source files (size, modification time)."""
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in (files.image, files.mask)]
    text = json.dumps([CACHE_VERSION, asdict(letterbox), stats], sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_entry(files: CaseFiles, letterbox: Letterbox, entry: Path) -> None:
    """Read one case's stacks, prepare every frame and its mask, and write them as ``entry``."""
    try:
        images, masks = read_mha(files.image), read_mha(files.mask)
    except InputError as exc:
        raise TrainError(str(exc)) from None
    labels = acouslic.frame_labels(masks)
    size = letterbox.size
    prepared = np.empty((len(images), size, size), np.uint8)
    labelled = np.flatnonzero(labels > 0)
    soft = np.empty((len(labelled), size, size), np.uint8)
    row = 0
    for frame in range(len(images)):
        if labels[frame] > 0:
            inputs, soft[row] = prepare(images[frame], masks[frame], letterbox)
            row += 1
        else:  # an empty mask letterboxes to an empty mask: only the image needs the work
            inputs = letterbox(images[frame])
        prepared[frame] = inputs.pixels
    partial = entry.with_name(entry.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    np.save(partial / "images.npy", prepared)
    np.save(partial / "labels.npy", labels.astype(np.uint8))
    np.save(partial / "masks.npy", soft)
    os.replace(partial, entry)


@dataclass
class CacheStats:
    """What building cache entries cost: entries built, seconds and bytes on disk (the rest were reused)."""

    built: int = 0
    reused: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    bytes: int = 0

    def as_dict(self) -> dict:
        def per(total: float, digits: int) -> float | None:
            return round(total / self.built, digits) if self.built else None

        return {"built": self.built, "reused": self.reused, "seconds_per_built_case": per(self.seconds, 2),
                "cpu_seconds_per_built_case": per(self.cpu_seconds, 2),
                "mb_per_built_case": per(self.bytes / 1e6, 1)}


def load_cases(cases: Sequence[CaseFiles], letterbox: Letterbox, cache: Path, desc: str,
               stats: CacheStats) -> list[PreparedCase]:
    """The cases' prepared frames, building any cache entry that is missing or stale (counted in
    ``stats``)."""
    loaded = []
    for files in tqdm(cases, desc=desc, unit="case"):
        entry = cache / f"{files.case_id}-{cache_key(files, letterbox)}"
        if entry.is_dir():
            stats.reused += 1
        else:
            started, cpu = time.perf_counter(), time.process_time()
            build_entry(files, letterbox, entry)
            stats.built += 1
            stats.seconds += time.perf_counter() - started
            stats.cpu_seconds += time.process_time() - cpu
            stats.bytes += sum(f.stat().st_size for f in entry.iterdir())
        labels = np.load(entry / "labels.npy")
        rows = np.full(len(labels), -1, np.int64)
        rows[labels > 0] = np.arange(int((labels > 0).sum()))
        loaded.append(PreparedCase(files, np.load(entry / "images.npy", mmap_mode="r"), labels,
                                   np.load(entry / "masks.npy", mmap_mode="r"), rows))
    return loaded


@dataclass
class CasePool:
    """Every frame of some prepared cases, addressed by one index: case [N], frame [N], label [N]."""

    cases: list[PreparedCase]
    case: np.ndarray
    frame: np.ndarray
    labels: np.ndarray

    @classmethod
    def of(cls, cases: list[PreparedCase]) -> CasePool:
        case = np.concatenate([np.full(len(c.labels), i) for i, c in enumerate(cases)])
        frame = np.concatenate([np.arange(len(c.labels)) for c in cases])
        return cls(cases, case, frame, np.concatenate([c.labels for c in cases]).astype(np.int64))

    def strata(self) -> dict[str, np.ndarray]:
        return {name: np.flatnonzero(self.labels == label) for name, label in STRATA.items()}

    def counts(self) -> dict[str, int]:
        return {name: len(indices) for name, indices in self.strata().items()}

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Model inputs [B, S, S], soft masks [B, S, S] and labels [B] of pool frames ``indices``."""
        picked = [(self.cases[self.case[i]], int(self.frame[i])) for i in indices]
        return (np.stack([case.images[frame] for case, frame in picked]),
                np.stack([case.mask(frame) for case, frame in picked]), self.labels[indices])
