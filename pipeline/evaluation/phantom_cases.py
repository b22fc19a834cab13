"""Write phantom blind-sweep cases in ACOUSLIC-AI's layout, to check the pipeline against exact truth.

    DIR/images/stacked_fetal_ultrasound/<uuid>.mha     6 sweeps x F frames of 562 x 744, uint8
    DIR/masks/stacked_fetal_abdomen/<uuid>.mha         same shape, 0 / 1 optimal / 2 suboptimal
    DIR/circumferences/fetal_abdominal_circumferences_per_sweep.csv
    DIR/videos/<uuid>.mp4                              the sweeps as H.264 at 30 fps (unless --no-video)

Output is deterministic per seed: the .mha files (zlib-compressed, no timestamps) and the CSV are
byte-identical across runs. Needs SimpleITK (``pip install .[mha]``) and scipy.
"""

from __future__ import annotations

import argparse
import csv
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

from pipeline.phantom import FRAMES_PER_SWEEP, SPACING, CaseData, make_cases, render_case

from .layout import AC_COLUMNS, CSV_PATH, IMAGES_DIR, MASKS_DIR, write_mha

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
    parser.add_argument("--out", type=Path, required=True, help="output folder (ACOUSLIC-AI layout)")
    parser.add_argument("--cases", type=int, default=1, help="number of cases (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    parser.add_argument("--frames-per-sweep", type=int, default=FRAMES_PER_SWEEP,
                        help=f"frames per sweep (default {FRAMES_PER_SWEEP}, as ACOUSLIC-AI)")
    parser.add_argument("--no-video", action="store_true", help="skip the MP4s")
    args = parser.parse_args(argv)
    if args.cases < 1 or args.frames_per_sweep < 2:
        parser.error("--cases must be >= 1 and --frames-per-sweep >= 2")

    out: Path = args.out
    for folder in [IMAGES_DIR, MASKS_DIR, CSV_PATH.parent] + ([] if args.no_video else [VIDEOS_DIR]):
        (out / folder).mkdir(parents=True, exist_ok=True)
    rows = [write_case(render_case(case), out, not args.no_video)
            for case in tqdm(make_cases(args.seed, args.cases, args.frames_per_sweep), desc="phantom cases",
                             unit="case")]
    with open(out / CSV_PATH, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["uuid", "subject_id", *AC_COLUMNS])
        writer.writerows(rows)
    return 0
