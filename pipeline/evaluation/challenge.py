"""Saved predictions scored with the challenge's metrics (pipeline/acouslic.py): per-case rows and the
summary, plus the frame-level F1 of the quality labels where the predictions carry them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import acouslic
from pipeline.sources.stack import frames_per_sweep as stack_frames_per_sweep

from .layout import (
    CSV_PATH,
    FRAME_NAME,
    IMAGES_DIR,
    MASKS_DIR,
    QUALITY_NAME,
    SEG_NAME,
    InputError,
    read_frame_number,
    read_mha,
    read_prediction_mask,
    read_quality,
    read_reference_acs,
)


def read_fov(path: Path) -> np.ndarray:
    """A given 2-D field-of-view mask (a one-frame stack is accepted)."""
    fov = read_mha(path)
    if fov.ndim == 3 and fov.shape[0] == 1:
        fov = fov[0]
    if fov.ndim != 2:
        raise InputError(path, f"FOV mask must be 2-D, got shape {fov.shape}")
    return fov


def case_fov(cases_dir: Path, case: str, shape: tuple[int, ...], fov_mask: Path | None,
             given: np.ndarray | None) -> np.ndarray:
    """The given FOV mask, checked against the case's frames, or one derived from its image stack."""
    if given is not None:
        if given.shape != shape[1:]:
            raise InputError(fov_mask, f"FOV shape {given.shape} != frame shape {shape[1:]}")
        return given
    img_path = cases_dir / IMAGES_DIR / f"{case}.mha"
    images = read_mha(img_path)
    if images.shape[-2:] != shape[1:]:
        raise InputError(img_path, f"image shape {images.shape} does not match masks {shape}")
    return acouslic.derive_fov_mask(images)


def score_predictions(cases_dir: Path, pred_dir: Path, *, fov_mask: Path | None = None,
                      spacing_mm: float = acouslic.PIXEL_SPACING_MM, frames_per_sweep: int | None = None,
                      quiet: bool = False) -> tuple[list[dict], dict]:
    """Per-case rows and the summary (case means, score, f1) of every case in ``cases_dir``; each case
    must have a prediction folder. ``frames_per_sweep`` None: a sixth of each stack."""
    if not (cases_dir / MASKS_DIR).is_dir():
        raise InputError(cases_dir / MASKS_DIR, "missing folder (not an ACOUSLIC-AI case folder)")
    if not pred_dir.is_dir():
        raise InputError(pred_dir, "missing predictions folder")
    case_ids = sorted(p.name[: -len(".mha")] for p in (cases_dir / MASKS_DIR).glob("*.mha"))
    if not case_ids:
        raise InputError(cases_dir / MASKS_DIR, "no .mha cases")
    refs = read_reference_acs(cases_dir / CSV_PATH)
    given_fov = None if fov_mask is None else read_fov(fov_mask)

    rows: list[dict] = []
    results: list[acouslic.CaseResult] = []
    gt_quality: list[np.ndarray] = []
    pred_quality: list[np.ndarray] = []
    for cid in tqdm(case_ids, desc="evaluate", unit="case", disable=quiet):
        gt_path = cases_dir / MASKS_DIR / f"{cid}.mha"
        gt = read_mha(gt_path)
        if gt.ndim != 3:
            raise InputError(gt_path, f"mask stack must be (frames, H, W), got shape {gt.shape}")
        if cid not in refs:
            raise InputError(cases_dir / CSV_PATH, f"no row for case {cid}")
        fov = case_fov(cases_dir, cid, gt.shape, fov_mask, given_fov)
        frame = read_frame_number(pred_dir / cid / FRAME_NAME, gt.shape[0])
        mask = read_prediction_mask(pred_dir / cid / SEG_NAME, frame, gt.shape)
        per_sweep = frames_per_sweep or stack_frames_per_sweep(gt.shape[0])
        res = acouslic.evaluate_case(gt, mask, frame, refs[cid], fov, spacing_mm=spacing_mm,
                                     frames_per_sweep=per_sweep)
        results.append(res)
        rows.append({"case_id": cid, **res.as_dict()})
        quality = read_quality(pred_dir / cid / QUALITY_NAME, gt.shape[0])
        if quality is not None:
            gt_quality.append(acouslic.frame_labels(gt))
            pred_quality.append(quality)
    f1 = None
    if gt_quality:
        f1 = acouslic.frame_f1(np.concatenate(gt_quality), np.concatenate(pred_quality))
    summary = acouslic.summarize(results, f1)
    summary["n_cases_with_quality"] = len(gt_quality)
    summary["fov"] = str(fov_mask) if fov_mask is not None else "derived"
    return rows, summary
