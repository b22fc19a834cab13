"""Evaluate saved ACOUSLIC-AI predictions with the challenge's metrics (WFSS, NAE of AC, soft Dice, score).

Cases (ACOUSLIC-AI layout, as sweepstream-make-phantom writes it):

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
import sys
from pathlib import Path

from pipeline import acouslic

from .challenge import score_predictions
from .layout import CaseLabels, InputError
from .pipeline_run import run_pipeline
from .sweeps import PER_SWEEP_FIELDS, per_sweep, plot_curves, summarize_sweeps

PER_CASE_FIELDS = ["case_id", "frame", "sweep", "gt_label", "wfss", "pred_ac_mm", "ref_ac_mm", "ac_status",
                   "nae", "dsc", "dsc_nearest", "nearest_frame", "dsc_soft", "score"]


def _fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    """Rows as CSV, floats to 6 decimals, None as an empty cell."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r[k]) for k in fields})


def print_table(rows: list[dict], summary: dict) -> None:
    """Per-case figures, their means, the F1 and (in evaluation mode) the per-sweep headline."""
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


def build_parser() -> argparse.ArgumentParser:
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
                        help="pipeline option for the run, as sweepstream --set (repeatable)")
    parser.add_argument("--fov-mask", type=Path, default=None,
                        help="FOV mask .mha (2-D) to use instead of deriving one per case from its images")
    parser.add_argument("--pixel-spacing", type=float, default=acouslic.PIXEL_SPACING_MM,
                        help=f"mm per pixel for the AC (default {acouslic.PIXEL_SPACING_MM})")
    parser.add_argument("--frames-per-sweep", type=int, default=None,
                        help=f"frames per sweep (default: a sixth of the stack; {acouslic.FRAMES_PER_SWEEP} "
                             "for the challenge's 840 frames)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or table")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `sweepstream-evaluate` command: 0 with OUT written, 2 with one line naming a bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.frames_per_sweep is not None and args.frames_per_sweep < 1) or not args.pixel_spacing > 0:
        parser.error("--frames-per-sweep must be >= 1 and --pixel-spacing > 0")
    try:
        run = None
        predictions = args.predictions
        if predictions is None:
            run, events = run_pipeline(args.cases, args.out, bundle=args.bundle, engine=args.engine,
                                       options=args.set, quiet=args.quiet)
            predictions = args.out / "predictions"
        rows, summary = score_predictions(args.cases, predictions, fov_mask=args.fov_mask,
                                          spacing_mm=args.pixel_spacing,
                                          frames_per_sweep=args.frames_per_sweep, quiet=args.quiet)
        if run is not None:
            summary["pipeline"] = run
            case_labels = CaseLabels(args.cases)
            sweeps = per_sweep(args.cases, events, case_labels, args.frames_per_sweep)
            summary["sweeps"] = summarize_sweeps(sweeps)
            write_csv(args.out / "per_sweep.csv", sweeps, PER_SWEEP_FIELDS)
            plot_curves(args.out, rows, events, case_labels, args.frames_per_sweep, args.quiet)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "per_case.csv", rows, PER_CASE_FIELDS)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not args.quiet:
        print_table(rows, summary)
    return 0
