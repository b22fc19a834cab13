#!/usr/bin/env python3
"""Evaluate saved ACOUSLIC-AI predictions with the challenge's metrics (WFSS, NAE of AC, soft Dice, score).

Cases (ACOUSLIC-AI layout, as tools/make_phantom.py writes it):

    CASES/masks/stacked_fetal_abdomen/<id>.mha     ground truth (frames, H, W): 0 / 1 optimal / 2 suboptimal
    CASES/images/stacked_fetal_ultrasound/<id>.mha   images (only read to derive the FOV mask)
    CASES/circumferences/fetal_abdominal_circumferences_per_sweep.csv
                                                     uuid, subject_id, sweep_1_ac_mm .. sweep_6_ac_mm

Predictions, one folder per case id (every case must have one):

    PRED/<id>/fetal-abdomen-segmentation.mha   the chosen frame's binary mask: 2-D (H, W), or the
                                               (frames, H, W) stack of which only that frame is read
    PRED/<id>/fetal-abdomen-frame-number.json  an integer, -1 for none
    PRED/<id>/frame-quality.json               optional: per-frame quality labels, a list of
                                               length frames (0 background, 1/2 or true = abdomen)

Outputs: OUT/per_case.csv and OUT/summary.json with score, wfss, nae, dsc_soft (case means; score =
0.5 (1 - NAE) + 0.25 WFSS + 0.25 DSC_soft) and f1: the frame-level F1 of the quality classifier
(optimal or suboptimal vs background), pooled over all frames of the cases that have frame-quality.json,
null when no case has one.

The field-of-view mask is derived per case from its image stack (pixels non-zero in any frame,
opened, closed, largest component) unless --fov-mask gives one (e.g. the challenge's fov_mask.mha,
so that the numbers equal the official ones).

--predictions is required for now: running the pipeline in evaluation mode is not implemented yet.
Bad input (missing file, wrong shape, frame number out of range) prints one error line naming the
file and exits with status 2. Metric rules: see pipeline/acouslic.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import acouslic  # noqa: E402

MASKS_DIR = Path("masks/stacked_fetal_abdomen")
IMAGES_DIR = Path("images/stacked_fetal_ultrasound")
CSV_PATH = Path("circumferences/fetal_abdominal_circumferences_per_sweep.csv")
SEG_NAME = "fetal-abdomen-segmentation.mha"
FRAME_NAME = "fetal-abdomen-frame-number.json"
QUALITY_NAME = "frame-quality.json"
N_SWEEPS = 6
PER_CASE_FIELDS = ["case_id", "frame", "sweep", "gt_label", "wfss", "pred_ac_mm", "ref_ac_mm", "ac_status",
                   "nae", "dsc", "dsc_nearest", "nearest_frame", "dsc_soft", "score"]


class InputError(Exception):
    """Bad input: ``path`` is the offending file."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"{path}: {message}")


def read_mha(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    if not path.is_file():
        raise InputError(path, "missing file")
    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as exc:
        raise InputError(path, f"cannot read image ({str(exc).strip().splitlines()[-1]})") from None


def read_json(path: Path):
    if not path.is_file():
        raise InputError(path, "missing file")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"invalid JSON ({exc})") from None


def read_reference_acs(path: Path) -> dict[str, list[float | None]]:
    if not path.is_file():
        raise InputError(path, "missing file")
    out: dict[str, list[float | None]] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        cols = [f"sweep_{i}_ac_mm" for i in range(1, N_SWEEPS + 1)]
        missing = [c for c in ["uuid", *cols] if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(path, f"missing columns {missing}")
        for row in reader:
            acs: list[float | None] = []
            for c in cols:
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
    if not path.exists():
        return None
    value = read_json(path)
    if not isinstance(value, list) or len(value) != n_frames:
        raise InputError(path, f"expected a list of {n_frames} per-frame labels")
    try:
        return np.array([int(v) for v in value])
    except (TypeError, ValueError):
        raise InputError(path, "labels must be integers or booleans") from None


def evaluate(args: argparse.Namespace) -> tuple[list[dict], dict]:
    cases_dir: Path = args.cases
    pred_dir: Path = args.predictions
    if not (cases_dir / MASKS_DIR).is_dir():
        raise InputError(cases_dir / MASKS_DIR, "missing folder (not an ACOUSLIC-AI case folder)")
    if not pred_dir.is_dir():
        raise InputError(pred_dir, "missing predictions folder")
    case_ids = sorted(p.name[: -len(".mha")] for p in (cases_dir / MASKS_DIR).glob("*.mha"))
    if not case_ids:
        raise InputError(cases_dir / MASKS_DIR, "no .mha cases")
    refs = read_reference_acs(cases_dir / CSV_PATH)
    given_fov = None
    if args.fov_mask is not None:
        given_fov = read_mha(args.fov_mask)
        if given_fov.ndim == 3 and given_fov.shape[0] == 1:
            given_fov = given_fov[0]
        if given_fov.ndim != 2:
            raise InputError(args.fov_mask, f"FOV mask must be 2-D, got shape {given_fov.shape}")

    rows: list[dict] = []
    results: list[acouslic.CaseResult] = []
    gt_quality: list[np.ndarray] = []
    pred_quality: list[np.ndarray] = []
    for cid in tqdm(case_ids, desc="evaluate", unit="case", disable=args.quiet):
        gt_path = cases_dir / MASKS_DIR / f"{cid}.mha"
        gt = read_mha(gt_path)
        if gt.ndim != 3:
            raise InputError(gt_path, f"mask stack must be (frames, H, W), got shape {gt.shape}")
        if cid not in refs:
            raise InputError(cases_dir / CSV_PATH, f"no row for case {cid}")
        if given_fov is not None:
            fov = given_fov
            if fov.shape != gt.shape[1:]:
                raise InputError(args.fov_mask, f"FOV shape {fov.shape} != frame shape {gt.shape[1:]}")
        else:
            img_path = cases_dir / IMAGES_DIR / f"{cid}.mha"
            images = read_mha(img_path)
            if images.shape[-2:] != gt.shape[1:]:
                raise InputError(img_path, f"image shape {images.shape} does not match masks {gt.shape}")
            fov = acouslic.derive_fov_mask(images)
        frame = read_frame_number(pred_dir / cid / FRAME_NAME, gt.shape[0])
        mask = read_prediction_mask(pred_dir / cid / SEG_NAME, frame, gt.shape)
        res = acouslic.evaluate_case(gt, mask, frame, refs[cid], fov, spacing_mm=args.pixel_spacing,
                                     frames_per_sweep=args.frames_per_sweep)
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
    summary["fov"] = str(args.fov_mask) if args.fov_mask is not None else "derived"
    return rows, summary


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)


def write_outputs(out: Path, rows: list[dict], summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "per_case.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=PER_CASE_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r[k]) for k in PER_CASE_FIELDS})
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def print_table(rows: list[dict], summary: dict) -> None:
    head = f"{'case':<38} {'frame':>6} {'WFSS':>6} {'NAE':>7} {'DSCsoft':>8} {'score':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['case_id']:<38} {r['frame']:>6} {r['wfss']:>6.3f} {r['nae']:>7.4f} "
              f"{r['dsc_soft']:>8.4f} {r['score']:>7.4f}")
    print("-" * len(head))
    f1 = "n/a (no frame-quality.json)" if summary["f1"] is None else f"{summary['f1']:.4f}"
    print(f"{'mean (' + str(summary['n_cases']) + ' cases)':<38} {'':>6} {summary['wfss']:>6.3f} "
          f"{summary['nae']:>7.4f} {summary['dsc_soft']:>8.4f} {summary['score']:>7.4f}")
    print(f"frame-level F1: {f1}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=Path, required=True, help="folder of cases in ACOUSLIC-AI layout")
    parser.add_argument("--predictions", type=Path, required=True,
                        help="folder of saved predictions, PRED/<case id>/... (required for now: "
                             "evaluation mode of the pipeline is not implemented)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder (per_case.csv, summary.json)")
    parser.add_argument("--fov-mask", type=Path, default=None,
                        help="FOV mask .mha (2-D) to use instead of deriving one per case from its images")
    parser.add_argument("--pixel-spacing", type=float, default=acouslic.PIXEL_SPACING_MM,
                        help=f"mm per pixel for the AC (default {acouslic.PIXEL_SPACING_MM})")
    parser.add_argument("--frames-per-sweep", type=int, default=acouslic.FRAMES_PER_SWEEP,
                        help=f"frames per sweep (default {acouslic.FRAMES_PER_SWEEP}, as the challenge)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or table")
    args = parser.parse_args(argv)
    if args.frames_per_sweep < 1 or not args.pixel_spacing > 0:
        parser.error("--frames-per-sweep must be >= 1 and --pixel-spacing > 0")
    try:
        rows, summary = evaluate(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_outputs(args.out, rows, summary)
    if not args.quiet:
        print_table(rows, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
