"""What the pipeline said of each sweep, against the truth, and one score curve per sweep: the live
system's own per-sweep answer, which the challenge's one-frame-per-case metrics do not show."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import acouslic
from pipeline.sources.stack import frames_per_sweep as stack_frames_per_sweep

from .layout import CSV_PATH, N_SWEEPS, CaseLabels, read_reference_acs

PER_SWEEP_FIELDS = ["case_id", "sweep", "optimal_frames", "frame", "gt_label", "score", "ac_mm", "ref_ac_mm",
                    "nae", "confidence"]


def per_sweep(cases_dir: Path, events: list[dict], case_labels: CaseLabels,
              frames_per_sweep: int | None = None) -> list[dict]:
    """One row per sweep the pipeline finished: the final best frame's label and the final (median top-k)
    AC against the sweep's reference AC."""
    refs = read_reference_acs(cases_dir / CSV_PATH)
    finals: dict[int, dict[str, dict]] = {}
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
        size = frames_per_sweep or stack_frames_per_sweep(len(labels))
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
    """How often a sweep with an optimal frame got one picked, and the AC NAE over measured sweeps."""
    with_optimal = [r for r in rows if r["optimal_frames"] > 0]
    picked = [r for r in with_optimal if r["gt_label"] == 1]
    naes = [r["nae"] for r in rows if r["nae"] is not None]
    return {"n_sweeps": len(rows), "n_sweeps_with_optimal": len(with_optimal),
            "pick_optimal_rate": len(picked) / len(with_optimal) if with_optimal else None,
            "n_sweeps_measured": len(naes),
            "median_ac_nae": float(np.median(naes)) if naes else None,
            "max_ac_nae": float(np.max(naes)) if naes else None}


def plot_curves(out: Path, rows: list[dict], events: list[dict], case_labels: CaseLabels,
                frames_per_sweep: int | None = None, quiet: bool = False) -> None:
    """OUT/curves/<case>-sweep<k>.png: raw and smoothed score, ground-truth labels shaded, chosen frame
    marked (the smoothing window is the run's own, from OUT/run/summary.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir, curves = out / "run", out / "curves"
    curves.mkdir(parents=True, exist_ok=True)
    window = int(json.loads((run_dir / "summary.json").read_text())["config"]["sweep"]["smoothing_frames"])
    chosen = {r["case_id"]: r["frame"] for r in rows}
    scores: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for e in events:
        if e["type"] == "frame":
            src = e["source"]
            scores.setdefault((src["case"], src["sweep"]), []).append((src["sweep_frame"], e["score"]))
    colours = {1: "tab:green", 2: "tab:orange"}
    for (case, sweep), points in tqdm(sorted(scores.items()), desc="curves", unit="sweep", disable=quiet):
        labels = case_labels(case)
        size = frames_per_sweep or stack_frames_per_sweep(len(labels))
        x, y = (np.array(v) for v in zip(*sorted(points), strict=True))
        smooth = np.array([y[max(0, i - window + 1):i + 1].mean() for i in range(len(y))])
        fig, ax = plt.subplots(figsize=(8, 3))
        for i, label in enumerate(labels[sweep * size:(sweep + 1) * size]):
            if label in colours:
                ax.axvspan(i - 0.5, i + 0.5, color=colours[label], alpha=0.25, lw=0)
        ax.plot(x, y, lw=0.8, color="0.5", label="score")
        ax.plot(x, smooth, lw=1.5, color="tab:blue", label=f"smoothed ({window} frames)")
        pick = chosen.get(case, -1)
        if pick >= 0 and pick // size == sweep:
            ax.axvline(pick % size, color="tab:red", lw=1.2, label="chosen frame")
        ax.set(xlabel="frame in sweep", ylabel="best-frame score", ylim=(-0.02, 1.02),
               title=f"{case} sweep {sweep + 1} (green: optimal, orange: suboptimal)")
        ax.legend(loc="upper right", fontsize=7)
        fig.tight_layout()
        fig.savefig(curves / f"{case}-sweep{sweep + 1}.png", dpi=100)
        plt.close(fig)
