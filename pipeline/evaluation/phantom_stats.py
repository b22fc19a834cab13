"""What a set of phantom cases looks like next to ACOUSLIC-AI's training set: the statistics its labels
give (share of cases with an optimal frame, optimal-run lengths, share of frames with an abdomen mask, AC
range), how much of the sector is tissue, what a frame costs to generate, and a picture of the sweeps."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.phantom import HEIGHT, SWEEPS, WIDTH, Case, Renderer

ACOUSLIC_CASES_WITH_OPTIMAL = (187, 300)
ACOUSLIC_RUN_MEAN, ACOUSLIC_RUN_MAX = 9.2, 26
NOT_PUBLISHED = "not published"
TEXTURE_EVERY = 10  # frames between the ones whose tissue share and generation time are measured


@dataclass(frozen=True)
class PhantomStats:
    cases: int
    cases_with_optimal: int
    run_lengths: tuple[int, ...]  # every maximal run of consecutive optimal frames in a sweep
    abdomen_frame_share: float  # frames labelled 1 or 2, of all frames
    ac_mm: tuple[float, ...]  # reference AC of the cases with an optimal frame
    ga_weeks: tuple[float, ...]
    textured_share: float  # mean share of the sector that is tissue (not fluid, not out of contact)
    ms_per_frame: float  # render + truth, this machine

    def rows(self) -> list[tuple[str, str, str]]:
        """(figure, phantom, ACOUSLIC-AI) rows of the comparison table."""
        runs = np.asarray(self.run_lengths)
        have, total = ACOUSLIC_CASES_WITH_OPTIMAL
        acs = f"{min(self.ac_mm):.0f}-{max(self.ac_mm):.0f}" if self.ac_mm else "-"
        return [
            ("cases with an optimal frame", f"{self.cases_with_optimal}/{self.cases} "
             f"({self.cases_with_optimal / self.cases:.0%})", f"{have}/{total} ({have / total:.0%})"),
            ("optimal-run length, mean (frames)", f"{runs.mean():.1f}" if len(runs) else "-",
             f"{ACOUSLIC_RUN_MEAN}"),
            ("optimal-run length, max (frames)", f"{runs.max()}" if len(runs) else "-",
             f"{ACOUSLIC_RUN_MAX}"),
            ("frames with an abdomen mask", f"{self.abdomen_frame_share:.1%}", NOT_PUBLISHED),
            ("reference AC range (mm)", acs, NOT_PUBLISHED),
            ("gestational age range (weeks)", f"{min(self.ga_weeks):.1f}-{max(self.ga_weeks):.1f}",
             NOT_PUBLISHED),
            ("textured (non-fluid) share of the sector", f"{self.textured_share:.0%}", NOT_PUBLISHED),
            ("generation, render + truth (ms/frame)", f"{self.ms_per_frame:.1f}", "-"),
        ]

    def table(self) -> str:
        """The rows as a Markdown table."""
        lines = ["| figure | phantom | ACOUSLIC-AI |", "|---|---|---|"]
        return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in self.rows()])


def optimal_runs(labels: np.ndarray) -> list[int]:
    """Lengths of the maximal runs of consecutive optimal (1) labels."""
    edges = np.diff(np.concatenate([[0], (np.asarray(labels) == 1).astype(np.int8), [0]]))
    return (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).tolist()


def first_with_optimal(cases: Sequence[Case]) -> Case:
    """The first case with an optimal frame in some sweep (the first case when none has one)."""
    for case in cases:
        renderer = Renderer(case)
        frames = range(case.frames_per_sweep)
        if any(renderer.truth(s, f)["label"] == 1 for s in range(SWEEPS) for f in frames):
            return case
    return cases[0]


def phantom_stats(cases: Sequence[Case], progress: bool = True) -> PhantomStats:
    """Labels of every frame from the geometry; the tissue share and the generation time on every
    ``TEXTURE_EVERY``-th frame (its render and truth timed together)."""
    runs: list[int] = []
    with_optimal, abdomen, frames, spent, timed = 0, 0, 0, 0.0, 0
    textured: list[float] = []
    acs = []
    for case in tqdm(cases, desc="phantom statistics", unit="case", disable=not progress):
        renderer = Renderer(case)
        has_optimal = False
        for sweep in range(SWEEPS):
            labels = []
            for frame in range(case.frames_per_sweep):
                if frame % TEXTURE_EVERY == 0:
                    start = time.perf_counter()
                    renderer.render(sweep, frame)
                    labels.append(renderer.truth(sweep, frame)["label"])
                    spent += time.perf_counter() - start
                    timed += 1
                    textured.append(renderer.textured_share(sweep, frame))
                else:
                    labels.append(renderer.truth(sweep, frame)["label"])
            labels = np.asarray(labels)
            runs += optimal_runs(labels)
            has_optimal |= bool((labels == 1).any())
            abdomen += int(np.count_nonzero(labels))
            frames += len(labels)
        with_optimal += has_optimal
        if has_optimal:
            acs.append(case.fetus.ac_mm)
    return PhantomStats(len(cases), with_optimal, tuple(runs), abdomen / frames, tuple(acs),
                        tuple(c.fetus.ga_weeks for c in cases), float(np.mean(textured)),
                        1e3 * spent / max(timed, 1))


def sweep_grid(case: Case, columns: int = 6, tile_width: int = 186, grey_levels: int = 32) -> np.ndarray:
    """A BGR picture of one case: a row per sweep (1-3 transverse, 4-6 sagittal), ``columns`` frames
    evenly through it with the sweep's most central optimal frame (else its middle labelled one) last;
    abdomen masks outlined (red optimal, green suboptimal), each tile captioned. Grey is quantized to
    ``grey_levels`` so the PNG stays small enough to commit."""
    renderer = Renderer(case)
    tile_height = round(tile_width * HEIGHT / WIDTH)
    rows = []
    for sweep in range(SWEEPS):
        labels = np.array([renderer.truth(sweep, f)["label"] for f in range(case.frames_per_sweep)])
        picks = np.linspace(0, case.frames_per_sweep - 1, columns - 1).round().astype(int).tolist()
        optimal, labelled = np.flatnonzero(labels == 1), np.flatnonzero(labels > 0)
        chosen = optimal if len(optimal) else labelled
        picks.append(int(chosen[len(chosen) // 2]) if len(chosen) else case.frames_per_sweep // 2)
        tiles = []
        for frame in picks:
            truth = renderer.truth(sweep, frame)
            step = 256 // grey_levels
            grey = cv2.resize(renderer.render(sweep, frame), (tile_width, tile_height),
                              interpolation=cv2.INTER_AREA) // step * step
            tile = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
            small = cv2.resize(truth["mask"], (tile_width, tile_height), interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours((small > 0).astype(np.uint8), cv2.RETR_EXTERNAL,
                                           cv2.CHAIN_APPROX_SIMPLE)
            colour = (0, 0, 255) if truth["label"] == 1 else (0, 200, 0)
            cv2.drawContours(tile, contours, -1, colour, 1)
            kind = "transverse" if sweep < 3 else "sagittal"
            caption = f"{sweep + 1} {kind} f{frame} L{truth['label']}"
            cv2.putText(tile, caption, (3, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (255, 255, 255), 1,
                        cv2.LINE_AA)
            tiles.append(tile)
        rows.append(np.hstack(tiles))
    return np.vstack(rows)
