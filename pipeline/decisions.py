"""How timely and how right a run's decisions were, from its journal, against the same bundle scoring every
frame (the benchmark's in-process baseline) on a source with ground truth (phantom sweeps carry each
frame's `gt_label`: 1 = optimal plane). Pure: journals in, figures out.

Per sweep: the final pick, whether it is optimal and equals the baseline's pick, `decision_ms` (sweep end
to the final best_frame), and the time from the capture of the sweep's first optimal frame to the first
best_frame event naming an optimal frame.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

OPTIMAL = 1


def _sweep_keys(events: list[dict]) -> dict[int, tuple[Any, Any]]:
    """Run sweep id -> the source's (case, sweep), from the frame events."""
    keys: dict[int, tuple[Any, Any]] = {}
    for e in events:
        if e["type"] == "frame" and e["sweep_id"] is not None and e.get("source"):
            keys.setdefault(e["sweep_id"], (e["source"].get("case"), e["source"].get("sweep")))
    return keys


def _finals(events: list[dict]) -> dict[tuple[Any, Any], dict]:
    keys = _sweep_keys(events)
    return {keys[e["sweep_id"]]: e for e in events
            if e["type"] == "best_frame" and e.get("final") and e["sweep_id"] in keys}


def has_ground_truth(events: Iterable[dict]) -> bool:
    return any(e["type"] == "frame" and "gt_label" in (e.get("source") or {}) for e in events)


def decisions(run: list[dict], every_frame: list[dict], fps: float) -> dict[str, Any]:
    """Per-sweep rows and their summary. `every_frame` is the journal of the same bundle scoring every frame
    (for the ground truth of every frame and the reference pick); `fps` places unscored frames in time."""
    labels: dict[tuple[Any, Any], dict[int, int]] = {}
    for e in every_frame:
        if e["type"] == "frame":
            source = e["source"]
            sweep = labels.setdefault((source.get("case"), source.get("sweep")), {})
            sweep[e["frame_id"]] = source["gt_label"]
    captured = {e["frame_id"]: e["t_capture"] for e in run if e["type"] == "frame"}
    keys = _sweep_keys(run)
    first_optimal_named: dict[tuple[Any, Any], float] = {}
    for e in run:
        key = keys.get(e["sweep_id"]) if e["type"] == "best_frame" else None
        if key is not None and labels.get(key, {}).get(e["frame_id"]) == OPTIMAL:
            first_optimal_named.setdefault(key, e["t_event"])
    finals, reference = _finals(run), _finals(every_frame)
    rows = []
    for key, frames in labels.items():
        optimal = sorted(i for i, label in frames.items() if label == OPTIMAL)
        final, ref = finals.get(key), reference.get(key)
        pick, ref_pick = (None if e is None else e["frame_id"] for e in (final, ref))
        row: dict[str, Any] = {
            "case": key[0], "sweep": key[1], "optimal_frames": len(optimal), "pick": pick,
            "pick_optimal": pick in optimal, "every_frame_pick": ref_pick,
            "every_frame_pick_optimal": ref_pick in optimal,
            "same_pick": pick == ref_pick, "decision_ms": None if final is None else final.get("decision_ms"),
            "first_optimal_to_best_ms": None}
        if optimal and key in first_optimal_named and captured:
            nearest = min(captured, key=lambda i: abs(i - optimal[0]))
            t_first = captured[nearest] + (optimal[0] - nearest) / fps
            row["first_optimal_to_best_ms"] = round((first_optimal_named[key] - t_first) * 1e3, 1)
        rows.append(row)
    return {"sweeps": rows, "summary": _summary(rows)}


def _summary(rows: list[dict]) -> dict[str, Any]:
    with_optimal = [r for r in rows if r["optimal_frames"]]

    def spread(values: list[float]) -> dict[str, float | None]:
        return {"p50": round(float(np.median(values)), 1) if values else None,
                "max": round(max(values), 1) if values else None}
    return {
        "sweeps": len(rows),
        "sweeps_with_optimal": len(with_optimal),
        "same_pick_rate": _rate(r["same_pick"] for r in with_optimal),
        "optimal_pick_rate": _rate(r["pick_optimal"] for r in with_optimal),
        "every_frame_optimal_pick_rate": _rate(r["every_frame_pick_optimal"] for r in with_optimal),
        "decision_ms": spread([r["decision_ms"] for r in rows if r["decision_ms"] is not None]),
        "first_optimal_to_best_ms": spread([r["first_optimal_to_best_ms"] for r in with_optimal
                                            if r["first_optimal_to_best_ms"] is not None]),
        "optimal_never_named": sum(1 for r in with_optimal if r["first_optimal_to_best_ms"] is None),
    }


def _rate(flags: Iterable[bool]) -> float | None:
    values = list(flags)
    return round(sum(values) / len(values), 4) if values else None
