"""Evaluation mode: every frame of every case through the real pipeline (all four processes, flooded and
lossless: a drop is an error), then the prediction layout written from the run's own final events."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..events import read_journal
from .layout import FRAME_NAME, QUALITY_NAME, SEG_NAME, InputError, stack_shapes, write_mha

ABDOMEN_QUALITY = 0.5  # quality at or above which a frame counts as showing the abdomen (F1)
ABDOMEN_MASK_SHARE = 0.001  # ... or the share of the model input its mask covers


class JournalTail:
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


def run_pipeline(cases_dir: Path, out: Path, *, bundle: Path | None = None, engine: str = "auto",
                 options: Sequence[str] = (), quiet: bool = False) -> tuple[dict, list[dict]]:
    """Runs the `sweepstream` command over the cases into OUT/run and writes OUT/predictions; returns the
    run's figures and its events (the journal, read once). ``options``: SECTION.KEY=VALUE overrides."""
    shapes = stack_shapes(cases_dir)
    run_dir = out / "run"
    if run_dir.exists():
        raise InputError(run_dir, "already exists (choose a new --out)")
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pipeline.cli", "--source", str(cases_dir), "--flood", "--quiet",
           "--out", str(run_dir), "--engine", engine, "--events", "tcp://127.0.0.1:*",
           "--control", "none", "--set", "transport.policy=lossless"]
    if bundle is not None:
        cmd += ["--bundle", str(bundle)]
    for option in options:
        cmd += ["--set", option]
    tail = JournalTail(run_dir / "events.jsonl")
    total = sum(shape[0] for shape in shapes.values())
    with (out / "pipeline.log").open("w") as log, \
            tqdm(total=total, desc="pipeline", unit="frame", disable=quiet) as progress:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            time.sleep(0.5)
            progress.update(tail.poll() - progress.n)
        progress.update(tail.poll() - progress.n)
    if process.returncode != 0:
        lines = (out / "pipeline.log").read_text().strip().splitlines()
        raise InputError(out / "pipeline.log", f"pipeline failed: {lines[-1] if lines else '?'}")
    summary = json.loads((run_dir / "summary.json").read_text())
    frames = summary["frames"]
    if frames["scored"] != total or frames["dropped"]:
        raise InputError(run_dir / "summary.json", f"evaluation needs every frame scored: {frames['scored']} "
                         f"of {total} scored, {frames['dropped']} dropped")
    events = read_journal(run_dir / "events.jsonl")
    write_predictions(events, run_dir, out / "predictions", shapes)
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
        write_mha((mask > 0).astype(np.uint8), folder / SEG_NAME)
        (folder / FRAME_NAME).write_text(json.dumps(frame) + "\n")
        (folder / QUALITY_NAME).write_text(json.dumps(frame_quality(events, case, depth)) + "\n")
