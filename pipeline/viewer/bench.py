"""`sweepstream-bench-viewer`: does the live viewer cost the pipeline anything? The demo runs twice back to
back on the same source, viewer off and then on with the page open in headless Chromium; it prints both
runs' end-to-end latency (p50, p99, max) and drops from their summary.json, and the previews' latency as
the page measured it (capture to drawn, and the viewer's send to drawn)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .browser import PipelineRun, find_chromium, open_page, preview_latency

FINISHED = re.compile(r"^viewer: serving the finished run")


def _pipeline_args(source: str, out: Path, extra: list[str]) -> list[str]:
    return ["--source", source, "--out", str(out), "--events", "tcp://127.0.0.1:*",
            "--control", "tcp://127.0.0.1:*", *extra]


def _figures(out: Path) -> dict[str, Any]:
    summary = json.loads((out / "summary.json").read_text())
    e2e = summary["latency_ms"]["end_to_end"]
    frames = summary["frames"]
    return {"outcome": summary["outcome"], "read": frames["read"], "scored": frames["scored"],
            "dropped": frames["dropped"], "e2e_p50_ms": e2e.get("p50"), "e2e_p99_ms": e2e.get("p99"),
            "e2e_max_ms": e2e.get("max")}


def run_off(source: str, out: Path, extra: list[str]) -> dict[str, Any]:
    run = PipelineRun(_pipeline_args(source, out, ["--set", "run.viewer=none", *extra]))
    try:
        run.process.wait()
    finally:
        run.close()
    return _figures(out)


def run_on(source: str, out: Path, extra: list[str], chromium: str) -> dict[str, Any]:
    run = PipelineRun(_pipeline_args(source, out, ["--set", "run.viewer=127.0.0.1:0",
                                                   "--set", "run.viewer_linger=60", *extra]))
    try:
        with open_page(run.url(), chromium) as page:
            run.wait_for_line(FINISHED, timeout_s=3600)
            previews = preview_latency(page)
        run.interrupt()
    finally:
        run.close()
    return {**_figures(out), "preview_ms": previews}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="phantom://7?cases=1", help="the source (default: the demo's)")
    parser.add_argument("--out", default="runs/bench-viewer", help="folder for the two runs")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="passed to both runs")
    args = parser.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("bench_viewer: no system Chromium (apt-get install chromium)", file=sys.stderr)
        return 1
    stamp = time.strftime("%Y%m%d-%H%M%S")
    extra = [item for pair in (("--set", s) for s in args.set) for item in pair]
    results = {}
    for name in tqdm(("viewer_off", "viewer_on"), desc="bench_viewer", unit="run"):
        out = Path(args.out) / f"{stamp}-{name}"
        tqdm.write(f"bench_viewer: {name} -> {out}", file=sys.stderr)
        results[name] = (run_off(args.source, out, extra) if name == "viewer_off"
                         else run_on(args.source, out, extra, chromium))
    print(f"{'run':<12}{'read':>7}{'scored':>8}{'dropped':>9}{'e2e p50':>10}{'p99':>10}{'max':>10}  (ms)")
    for name, r in results.items():
        print(f"{name:<12}{r['read']:>7}{r['scored']:>8}{r['dropped']:>9}{r['e2e_p50_ms']:>10.1f}"
              f"{r['e2e_p99_ms']:>10.1f}{r['e2e_max_ms']:>10.1f}")
    previews = results["viewer_on"]["preview_ms"]
    for part in ("capture", "transport"):
        if part in previews:
            p = previews[part]
            print(f"preview {part} -> drawn: p50 {p['p50']} ms, p95 {p['p95']} ms, max {p['max']} ms "
                  f"({previews['count']} previews)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0
