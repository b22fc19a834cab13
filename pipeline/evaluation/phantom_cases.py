"""Write phantom blind-sweep cases in ACOUSLIC-AI's layout, to check the pipeline against exact truth.

    DIR/images/stacked_fetal_ultrasound/<uuid>.mha     6 sweeps x F frames of 562 x 744, uint8
    DIR/masks/stacked_fetal_abdomen/<uuid>.mha         same shape, 0 / 1 optimal / 2 suboptimal
    DIR/circumferences/fetal_abdominal_circumferences_per_sweep.csv
    DIR/videos/<uuid>.mp4                              the sweeps as H.264 at 30 fps (unless --no-video)

Output is deterministic per seed: the .mha files (zlib-compressed, no timestamps) and the CSV are
byte-identical across runs. Needs SimpleITK (``pip install .[mha]``) and scipy.

--stats prints the cases' statistics beside ACOUSLIC-AI's training set (cases with an optimal frame,
optimal-run lengths, frames with an abdomen mask, AC range), the textured share of the sector and the
generation time per frame, as a Markdown table; --grid PNG writes a picture of the six sweeps of the
first case with an optimal frame. Either works without --out (then no cases are written).
"""

from __future__ import annotations

import argparse
import csv
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from tqdm import tqdm

from pipeline.phantom import FRAMES_PER_SWEEP, SPACING, Case, CaseData, make_cases, render_case

from .layout import AC_COLUMNS, CSV_PATH, IMAGES_DIR, MASKS_DIR, write_mha
from .phantom_stats import first_with_optimal, phantom_stats, sweep_grid

VIDEOS_DIR = Path("videos")
VIDEO_FPS = 30


def write_mp4(frames: np.ndarray, path: Path) -> None:
    """Gray frames as H.264 (yuv420p) at 30 fps."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(VIDEO_FPS), options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_case(data: CaseData, out: Path, video: bool) -> list[str]:
    """Writes one case's stacks (and video); returns its CSV row."""
    uid = data.case.uid
    write_mha(data.images, out / IMAGES_DIR / f"{uid}.mha", SPACING)
    write_mha(data.masks, out / MASKS_DIR / f"{uid}.mha", SPACING)
    if video:
        write_mp4(data.images, out / VIDEOS_DIR / f"{uid}.mp4")
    acs = ["" if ac is None else f"{ac:.6f}" for ac in data.sweep_ac_mm]
    return [uid, str(data.case.subject_id), *acs]


def main(argv: list[str] | None = None) -> int:
    """The `sweepstream-make-phantom` command."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="output folder (ACOUSLIC-AI layout); needed unless --stats "
                        "or --grid")
    parser.add_argument("--cases", type=int, default=1, help="number of cases (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    parser.add_argument("--frames-per-sweep", type=int, default=FRAMES_PER_SWEEP,
                        help=f"frames per sweep (default {FRAMES_PER_SWEEP}, as ACOUSLIC-AI)")
    parser.add_argument("--no-video", action="store_true", help="skip the MP4s")
    parser.add_argument("--stats", action="store_true",
                        help="print the cases' statistics beside ACOUSLIC-AI's (Markdown table)")
    parser.add_argument("--grid", type=Path, metavar="PNG", help="write a PNG of the first case's sweeps")
    args = parser.parse_args(argv)
    if args.cases < 1 or args.frames_per_sweep < 2:
        parser.error("--cases must be >= 1 and --frames-per-sweep >= 2")
    if args.out is None and not (args.stats or args.grid):
        parser.error("give --out (write cases), --stats or --grid")
    if args.grid is not None and args.grid.suffix.lower() != ".png":
        parser.error(f"--grid {args.grid}: expected a .png path")

    cases = make_cases(args.seed, args.cases, args.frames_per_sweep)
    if args.grid is not None:
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(args.grid), sweep_grid(first_with_optimal(cases)),
                    [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if args.stats:
        stats = phantom_stats(cases)
        print(f"{args.cases} phantom cases of seed {args.seed}, {args.frames_per_sweep} frames per sweep")
        print(stats.table())
    if args.out is not None:
        write_cases(cases, args.out, not args.no_video)
    return 0


def write_cases(cases: list[Case], out: Path, video: bool) -> None:
    """All cases and their CSV in ACOUSLIC-AI's layout."""
    for folder in [IMAGES_DIR, MASKS_DIR, CSV_PATH.parent] + ([VIDEOS_DIR] if video else []):
        (out / folder).mkdir(parents=True, exist_ok=True)
    rows = [write_case(render_case(case), out, video)
            for case in tqdm(cases, desc="phantom cases", unit="case")]
    with open(out / CSV_PATH, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["uuid", "subject_id", *AC_COLUMNS])
        writer.writerows(rows)
