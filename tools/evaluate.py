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

Without --predictions the pipeline itself runs in evaluation mode over CASES/images (all four processes,
flooded and lossless: every frame is scored, a drop is an error) with --bundle, and OUT gets:

    OUT/run/                       the pipeline's run folder (events.jsonl, summary.json, best/ PNGs)
    OUT/predictions/<id>/...       the prediction layout above, from the run: per case, the final best frame
                                   with the highest score over its sweeps and its full-resolution mask;
                                   frame-quality.json labels a frame "abdomen" when its quality >= 0.5 or
                                   its mask covers >= 0.1 % of the model input
    OUT/curves/<id>-sweep<k>.png   per sweep: raw and smoothed best-frame score over the sweep, the
                                   ground-truth labels shaded, the chosen frame marked

Bad input (missing file, wrong shape, frame number out of range) prints one error line naming the
file and exits with status 2. Metric rules: see pipeline/acouslic.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import acouslic  # noqa: E402
from pipeline.sources.stack import frames_per_sweep as stack_frames_per_sweep  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ABDOMEN_QUALITY = 0.5  # quality at or above which a frame counts as showing the abdomen (F1)
ABDOMEN_MASK_SHARE = 0.001  # ... or the share of the model input its mask covers

MASKS_DIR = Path("masks/stacked_fetal_abdomen")
IMAGES_DIR = Path("images/stacked_fetal_ultrasound")
CSV_PATH = Path("circumferences/fetal_abdominal_circumferences_per_sweep.csv")
SEG_NAME = "fetal-abdomen-segmentation.mha"
FRAME_NAME = "fetal-abdomen-frame-number.json"
QUALITY_NAME = "frame-quality.json"
N_SWEEPS = 6
PER_SWEEP_FIELDS = ["case_id", "sweep", "optimal_frames", "frame", "gt_label", "score", "ac_mm", "ref_ac_mm",
                    "nae", "confidence"]
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
        per_sweep = args.frames_per_sweep or stack_frames_per_sweep(gt.shape[0])
        res = acouslic.evaluate_case(gt, mask, frame, refs[cid], fov, spacing_mm=args.pixel_spacing,
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
    summary["fov"] = str(args.fov_mask) if args.fov_mask is not None else "derived"
    return rows, summary


def _stack_shapes(cases_dir: Path) -> dict[str, tuple[int, int, int]]:
    import SimpleITK as sitk

    folder = cases_dir / IMAGES_DIR
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


class _JournalTail:
    """Counts frame events appended to a growing journal, reading each byte once."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.frames = path, 0, 0

    def poll(self) -> int:
        if self.path.exists():
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
            complete = chunk.rfind(b"\n") + 1
            self.offset += complete
            self.frames += chunk[:complete].count(b'"type":"frame"')
        return self.frames


def run_pipeline(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """Every frame of every case through the real pipeline (flooded, lossless); writes OUT/predictions.
    Returns the run's figures and its events (the journal, read once)."""
    import subprocess

    shapes = _stack_shapes(args.cases)
    run_dir = args.out / "run"
    if run_dir.exists():
        raise InputError(run_dir, "already exists (choose a new --out)")
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "run_stream.py"), "--source", str(args.cases), "--flood", "--quiet",
           "--out", str(run_dir), "--engine", args.engine, "--events", "tcp://127.0.0.1:*",
           "--control", "none", "--set", "transport.policy=lossless"]
    if args.bundle is not None:
        cmd += ["--bundle", str(args.bundle)]
    for option in args.set:
        cmd += ["--set", option]
    tail = _JournalTail(run_dir / "events.jsonl")
    total = sum(shape[0] for shape in shapes.values())
    with (args.out / "pipeline.log").open("w") as log, \
            tqdm(total=total, desc="pipeline", unit="frame", disable=args.quiet) as progress:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        while process.poll() is None:
            time.sleep(0.5)
            progress.update(tail.poll() - progress.n)
        progress.update(tail.poll() - progress.n)
    if process.returncode != 0:
        lines = (args.out / "pipeline.log").read_text().strip().splitlines()
        raise InputError(args.out / "pipeline.log", f"pipeline failed: {lines[-1] if lines else '?'}")
    summary = json.loads((run_dir / "summary.json").read_text())
    frames = summary["frames"]
    if frames["scored"] != total or frames["dropped"]:
        raise InputError(run_dir / "summary.json", f"evaluation needs every frame scored: {frames['scored']} "
                         f"of {total} scored, {frames['dropped']} dropped")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    write_predictions(events, run_dir, args.out / "predictions", shapes)
    figures = {"frames": frames["scored"], "dropped": frames["dropped"], "fps": summary.get("throughput_fps"),
               "engine": summary["stages"]["infer"].get("engine"),
               "latency_ms": summary["latency_ms"].get("end_to_end")}
    return figures, events


def choose_per_case(events: list[dict]) -> dict[str, dict]:
    """Per case, the final best_frame event with the highest score (earliest sweep on ties)."""
    chosen: dict[str, dict] = {}
    for event in events:
        if event["type"] != "best_frame" or not event["final"] or not event.get("source"):
            continue
        case = event["source"].get("case")
        if case not in chosen or event["score"] > chosen[case]["score"]:
            chosen[case] = event
    return chosen


def frame_quality(events: list[dict], case: str, depth: int) -> list[int]:
    """Per-frame abdomen yes/no (1/0) for the F1, from the frame events' quality and mask heads."""
    labels = [0] * depth
    for event in events:
        if event["type"] == "frame" and event["source"].get("case") == case:
            heads = event["heads"]
            quality, mask = heads.get("quality"), heads.get("mask")
            seen = (quality is not None and quality >= ABDOMEN_QUALITY) or (
                mask is not None and mask >= ABDOMEN_MASK_SHARE)
            labels[event["source"]["case_frame"]] = int(seen)
    return labels


def write_predictions(events: list[dict], run_dir: Path, pred_dir: Path,
                      shapes: dict[str, tuple[int, int, int]]) -> None:
    """The prediction layout for every case; a case without a chosen frame gets -1 and an empty mask."""
    import cv2
    import SimpleITK as sitk

    chosen = choose_per_case(events)
    for case, (depth, height, width) in shapes.items():
        folder = pred_dir / case
        folder.mkdir(parents=True, exist_ok=True)
        event = chosen.get(case)
        frame = -1 if event is None else int(event["source"]["case_frame"])
        mask = None
        if event is not None and event.get("mask_png"):
            mask = cv2.imread(str(run_dir / event["mask_png"]), cv2.IMREAD_GRAYSCALE)
        if mask is None or mask.shape != (height, width):
            mask, frame = np.zeros((height, width), np.uint8), -1
        image = sitk.GetImageFromArray((mask > 0).astype(np.uint8))
        sitk.WriteImage(image, str(folder / SEG_NAME), useCompression=True)
        (folder / FRAME_NAME).write_text(json.dumps(frame) + "\n")
        (folder / QUALITY_NAME).write_text(json.dumps(frame_quality(events, case, depth)) + "\n")


class CaseLabels:
    """Per-frame ground-truth labels of each case, read from its mask stack once."""

    def __init__(self, cases_dir: Path) -> None:
        self.cases_dir = cases_dir
        self._labels: dict[str, np.ndarray] = {}

    def __call__(self, case: str) -> np.ndarray:
        if case not in self._labels:
            self._labels[case] = acouslic.frame_labels(read_mha(self.cases_dir / MASKS_DIR / f"{case}.mha"))
        return self._labels[case]


def per_sweep(args: argparse.Namespace, events: list[dict], case_labels: CaseLabels) -> list[dict]:
    """What the pipeline said of each sweep, against the truth: the final best frame's label and the final
    (median top-k) AC against the sweep's reference AC. The live system's own per-sweep answer, which the
    challenge's one-frame-per-case metrics do not show."""
    refs = read_reference_acs(args.cases / CSV_PATH)
    finals = {}
    for e in events:
        if e["type"] in ("best_frame", "biometry") and e.get("final"):
            finals.setdefault(e["sweep_id"], {})[e["type"]] = e
    sweep_source = {e["sweep_id"]: e["source"] for e in events if e["type"] == "frame" and e.get("source")}
    rows = []
    for sweep_id, final in sorted(finals.items()):
        source = sweep_source.get(sweep_id, {})
        case, sweep = source.get("case"), source.get("sweep")
        if case is None or sweep is None:
            continue
        labels = case_labels(case)
        size = args.frames_per_sweep or stack_frames_per_sweep(len(labels))
        best, bio = final.get("best_frame", {}), final.get("biometry", {})
        frame = (best.get("source") or {}).get("case_frame")
        ref = refs.get(case, [None] * N_SWEEPS)[sweep] if sweep < N_SWEEPS else None
        ac = bio.get("ac_mm")
        rows.append({"case_id": case, "sweep": sweep + 1,
                     "optimal_frames": int((labels[sweep * size:(sweep + 1) * size] == 1).sum()),
                     "frame": frame, "gt_label": None if frame is None else int(labels[frame]),
                     "score": best.get("score"), "ac_mm": ac, "ref_ac_mm": ref,
                     # No AC where the sweep has a reference counts as a full miss, as the official NAE.
                     "nae": None if ref is None else acouslic.nae(ac, ref),
                     "confidence": bio.get("confidence")})
    return rows


def summarize_sweeps(rows: list[dict]) -> dict:
    with_optimal = [r for r in rows if r["optimal_frames"] > 0]
    picked = [r for r in with_optimal if r["gt_label"] == 1]
    naes = [r["nae"] for r in rows if r["nae"] is not None]
    return {"n_sweeps": len(rows), "n_sweeps_with_optimal": len(with_optimal),
            "pick_optimal_rate": len(picked) / len(with_optimal) if with_optimal else None,
            "n_sweeps_measured": len(naes),
            "median_ac_nae": float(np.median(naes)) if naes else None,
            "max_ac_nae": float(np.max(naes)) if naes else None}


def plot_curves(args: argparse.Namespace, rows: list[dict], events: list[dict], case_labels: CaseLabels
                ) -> None:
    """One PNG per sweep: raw and smoothed score, ground-truth labels shaded, chosen frame marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir, curves = args.out / "run", args.out / "curves"
    curves.mkdir(parents=True, exist_ok=True)
    window = int(json.loads((run_dir / "summary.json").read_text())["config"]["sweep"]["smoothing_frames"])
    chosen = {r["case_id"]: r["frame"] for r in rows}
    scores: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for e in events:
        if e["type"] == "frame":
            src = e["source"]
            scores.setdefault((src["case"], src["sweep"]), []).append((src["sweep_frame"], e["score"]))
    colours = {1: "tab:green", 2: "tab:orange"}
    for (case, sweep), points in tqdm(sorted(scores.items()), desc="curves", unit="sweep",
                                      disable=args.quiet):
        labels = case_labels(case)
        per_sweep = args.frames_per_sweep or stack_frames_per_sweep(len(labels))
        x, y = (np.array(v) for v in zip(*sorted(points), strict=True))
        smooth = np.array([y[max(0, i - window + 1):i + 1].mean() for i in range(len(y))])
        fig, ax = plt.subplots(figsize=(8, 3))
        for i, label in enumerate(labels[sweep * per_sweep:(sweep + 1) * per_sweep]):
            if label in colours:
                ax.axvspan(i - 0.5, i + 0.5, color=colours[label], alpha=0.25, lw=0)
        ax.plot(x, y, lw=0.8, color="0.5", label="score")
        ax.plot(x, smooth, lw=1.5, color="tab:blue", label=f"smoothed ({window} frames)")
        pick = chosen.get(case, -1)
        if pick >= 0 and pick // per_sweep == sweep:
            ax.axvline(pick % per_sweep, color="tab:red", lw=1.2, label="chosen frame")
        ax.set(xlabel="frame in sweep", ylabel="best-frame score", ylim=(-0.02, 1.02),
               title=f"{case} sweep {sweep + 1} (green: optimal, orange: suboptimal)")
        ax.legend(loc="upper right", fontsize=7)
        fig.tight_layout()
        fig.savefig(curves / f"{case}-sweep{sweep + 1}.png", dpi=100)
        plt.close(fig)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)


def write_outputs(out: Path, rows: list[dict], summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "per_case.csv", rows, PER_CASE_FIELDS)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r[k]) for k in fields})


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
    sweeps = summary.get("sweeps")
    if sweeps and sweeps["pick_optimal_rate"] is not None:
        nae = "n/a" if sweeps["median_ac_nae"] is None else f"{sweeps['median_ac_nae']:.4f}"
        print(f"per sweep: optimal frame picked in {sweeps['pick_optimal_rate']:.1%} of "
              f"{sweeps['n_sweeps_with_optimal']} sweeps with one; median AC NAE {nae} over "
              f"{sweeps['n_sweeps_measured']} measured sweeps")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=Path, required=True, help="folder of cases in ACOUSLIC-AI layout")
    parser.add_argument("--predictions", type=Path, default=None,
                        help="folder of saved predictions, PRED/<case id>/...; without it the pipeline runs "
                             "over the cases and writes OUT/predictions")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder (per_case.csv, summary.json; run/, predictions/, curves/)")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="model bundle for the pipeline run (default: the pipeline's default bundle)")
    parser.add_argument("--engine", default="auto", help="inference backend for the pipeline run")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="pipeline option for the run, as run_stream.py --set (repeatable)")
    parser.add_argument("--fov-mask", type=Path, default=None,
                        help="FOV mask .mha (2-D) to use instead of deriving one per case from its images")
    parser.add_argument("--pixel-spacing", type=float, default=acouslic.PIXEL_SPACING_MM,
                        help=f"mm per pixel for the AC (default {acouslic.PIXEL_SPACING_MM})")
    parser.add_argument("--frames-per-sweep", type=int, default=None,
                        help=f"frames per sweep (default: a sixth of the stack; {acouslic.FRAMES_PER_SWEEP} "
                             "for the challenge's 840 frames)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or table")
    args = parser.parse_args(argv)
    if (args.frames_per_sweep is not None and args.frames_per_sweep < 1) or not args.pixel_spacing > 0:
        parser.error("--frames-per-sweep must be >= 1 and --pixel-spacing > 0")
    try:
        run = None
        if args.predictions is None:
            run, events = run_pipeline(args)
            args.predictions = args.out / "predictions"
        rows, summary = evaluate(args)
        if run is not None:
            summary["pipeline"] = run
            case_labels = CaseLabels(args.cases)
            sweeps = per_sweep(args, events, case_labels)
            summary["sweeps"] = summarize_sweeps(sweeps)
            write_csv(args.out / "per_sweep.csv", sweeps, PER_SWEEP_FIELDS)
            plot_curves(args, rows, events, case_labels)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_outputs(args.out, rows, summary)
    if not args.quiet:
        print_table(rows, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
