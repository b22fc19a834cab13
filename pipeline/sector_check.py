"""How well the imaging sector is found on synthetic machine screens, and whether the pipeline on a screen
recording picks the same best frames as on the raw sector stack (`tools/check_sector.py`).

Box error: phantom sectors placed at several positions and sizes on 1920x1080 and 1280x1024 screens with
patient text, depth scale, grey and colour bars and a logo (pipeline.screens); the largest distance between
a detected box edge and the true one, in screen pixels.

Agreement: one phantom sweep with an optimal frame, as a raw sector stack (the frames cut to the sector's
box, .mha) and as a lossless recording of the whole screen (.mkv); the demo bundle scores both through the
whole pipeline (lossless transport, every frame scored) and the sweeps' final best frames are compared.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .config import DEFAULT_BUNDLE
from .phantom import PIXEL_MM, make_cases, render_case
from .screens import LAYOUTS, ScreenLayout, screen_frames, sector_box, write_recording
from .sector import SectorTracker, to_gray

FRAMES_PER_SWEEP = 40
TOP = 5  # highest-scoring frames compared besides the final pick
AGREEMENT_LAYOUTS = tuple(layout for layout in LAYOUTS if layout.scale == 1.0)  # the sector's own pixels


def box_error(found: tuple[int, ...], truth: tuple[int, ...]) -> int:
    """Largest distance between corresponding box edges (px)."""
    (x, y, w, h), (u, v, s, t) = found, truth
    return max(abs(x - u), abs(y - v), abs(x + w - u - s), abs(y + h - v - t))


def layout_error(layout: ScreenLayout, frames: int, seed: int = 7) -> dict:
    tracker = SectorTracker()
    for screen, _ in screen_frames(layout, seed, frames):
        tracker.update(to_gray(screen))
    found, truth = tracker.sector, layout.truth_box()
    return {"screen": list(layout.size), "origin": list(layout.origin), "scale": layout.scale,
            "truth": list(truth), "found": list(found.box) if found else None,
            "error_px": box_error(found.box, truth) if found else None}


def picks(source: Path, out: Path, bundle: Path) -> dict[str, list]:
    """A whole-pipeline run over `source`: the final best frame id of each sweep, and the TOP frames by
    score."""
    command = [sys.executable, "-m", "pipeline.cli", "--source", str(source), "--out", str(out), "--quiet",
               "--flood", "--bundle", str(bundle), "--events", "tcp://127.0.0.1:*", "--control", "none",
               "--set", "transport.policy=lossless",
               "--set", f"postprocess.pixel_spacing_mm={PIXEL_MM},{PIXEL_MM}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"check_sector: the run over {source} failed:\n{result.stderr[-2000:]}")
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if line]
    scored = sorted((e for e in events if e["type"] == "frame"), key=lambda e: -e["score"])
    return {"final": [e["frame_id"] for e in events if e["type"] == "best_frame" and e["final"]],
            "top": [e["frame_id"] for e in scored[:TOP]]}


def optimal_sweeps(first_seed: int) -> Iterator[tuple[int, int, np.ndarray, list[int]]]:
    """(seed, sweep, frames, optimal frame indices) of phantom sweeps that cross the optimal plane."""
    seed = first_seed
    while True:
        data = render_case(make_cases(seed, 1, FRAMES_PER_SWEEP)[0])
        labels = data.labels.reshape(-1, FRAMES_PER_SWEEP)
        sweep = next((k for k in range(len(labels)) if (labels[k] == 1).any()), None)
        if sweep is not None:
            frames = data.images[sweep * FRAMES_PER_SWEEP:(sweep + 1) * FRAMES_PER_SWEEP]
            yield seed, sweep, frames, np.flatnonzero(labels[sweep] == 1).tolist()
        seed += 1


def agreement_case(seed: int, sweep: int, frames: np.ndarray, layout: ScreenLayout, workdir: Path,
                   bundle: Path = DEFAULT_BUNDLE) -> dict:
    """Picks on the sweep's raw sector stack and on its screen recording."""
    import SimpleITK as sitk

    x, y, w, h = sector_box()
    stack = sitk.GetImageFromArray(np.ascontiguousarray(frames[:, y:y + h, x:x + w]))
    stack.SetSpacing((PIXEL_MM, PIXEL_MM, 1.0))
    workdir.mkdir(parents=True, exist_ok=True)
    stack_path = workdir / f"sweep{seed}.mha"
    sitk.WriteImage(stack, str(stack_path))
    background = layout.background()
    screens = (layout.compose(background, frame) for frame in frames)
    screen_path = write_recording(workdir / f"screen{seed}.mkv", screens)
    return {"seed": seed, "sweep": sweep, "screen_size": list(layout.size),
            "stack": picks(stack_path, workdir / f"stack{seed}.run", bundle),
            "screen": picks(screen_path, workdir / f"screen{seed}.run", bundle)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=40, help="screen frames the detector sees per layout")
    parser.add_argument("--agreement", type=int, default=3, metavar="N",
                        help="phantom sweeps run through the pipeline as stack and as screen (0: none)")
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="bundle scoring the sweeps")
    parser.add_argument("--workdir", type=Path, default=Path("runs/check_sector"),
                        help="where the stacks, recordings and runs go")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    boxes = [layout_error(layout, args.frames) for layout in tqdm(LAYOUTS, desc="layouts", leave=False)]
    for row in boxes:
        print(f"{row['screen'][0]}x{row['screen'][1]} at {row['origin']} x{row['scale']}: "
              f"truth {row['truth']} found {row['found']} error {row['error_px']} px")
    errors = [row["error_px"] for row in boxes]
    worst = None if None in errors else max(errors)
    print(f"sector box error, max over {len(boxes)} screens: {worst} px")
    cases = []
    sweeps = optimal_sweeps(7)
    for i in tqdm(range(args.agreement), desc="agreement", leave=False):
        layout = AGREEMENT_LAYOUTS[i % len(AGREEMENT_LAYOUTS)]
        seed, sweep, frames, optimal = next(sweeps)
        case = {**agreement_case(seed, sweep, frames, layout, args.workdir, args.bundle), "optimal": optimal}
        cases.append(case)
        print(f"phantom {seed} sweep {sweep} (optimal frames {optimal}) on "
              f"{layout.size[0]}x{layout.size[1]}: "
              f"stack final {case['stack']['final']} top {case['stack']['top']}, "
              f"screen final {case['screen']['final']} top {case['screen']['top']}")
    if cases:
        finals = sum(case["stack"]["final"] == case["screen"]["final"] for case in cases)
        tops = sum(case["stack"]["top"][0] == case["screen"]["top"][0] for case in cases)
        print(f"best-frame agreement screen vs raw stack: final picks {finals}/{len(cases)} sweeps, "
              f"highest-scoring frame {tops}/{len(cases)}")
    if args.json:
        figures = {"boxes": boxes, "max_error_px": worst, "agreement": cases}
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if worst is not None else 1
