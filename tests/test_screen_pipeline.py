"""The whole pipeline on a recording of a machine's screen picks the same best frames as on the raw sector
stack: the demo bundle scores one phantom sweep both ways, every frame (lossless transport)."""

from __future__ import annotations

from pathlib import Path

from pipeline.screens import LAYOUTS
from pipeline.sector_check import agreement_case, optimal_sweeps


def test_screen_recording_and_raw_sector_stack_pick_the_same_best_frames(tmp_path: Path) -> None:
    seed, sweep, frames, optimal = next(optimal_sweeps(7))
    case = agreement_case(seed, sweep, frames, LAYOUTS[0], tmp_path)
    stack, screen = case["stack"], case["screen"]
    assert len(stack["final"]) == 1 and stack["final"][0] is not None  # one sweep, a best frame found
    assert screen["final"] == stack["final"]
    assert screen["top"] == stack["top"]  # the five highest-scoring frames, in order
