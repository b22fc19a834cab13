"""Soak test: a long run through the whole pipeline with stage restarts injected (kill -9 of a random
stage every `--kill-every` seconds), sampling each stage's resident memory and open file descriptors at
the start and at the end, so that leaks show as growth. A tool, not a unit test: it takes minutes."""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from tqdm import tqdm

from .config import REFERENCE_BUNDLE

STAGES = ("capture", "preprocess", "infer", "postprocess")
SETTLE_S = 10.0  # after the start (and after each restart) before a stage is sampled


def _stages(supervisor: psutil.Process) -> dict[str, psutil.Process]:
    found = {}
    for child in supervisor.children():
        try:
            title = " ".join(child.cmdline()).strip()
        except psutil.Error:
            continue
        if title.startswith("sweepstream: "):
            found[title.removeprefix("sweepstream: ")] = child
    return found


def _sample(supervisor: psutil.Process) -> dict[str, dict[str, float]]:
    """Every process's memory and descriptors, or nothing while a stage is missing (restarting, or the run
    shutting down): a partial sample would read as a leak or a cure."""
    out = {}
    for name, process in {"supervisor": supervisor, **_stages(supervisor)}.items():
        try:
            out[name] = {"rss_mib": process.memory_info().rss / 2**20, "fds": process.num_fds()}
        except psutil.Error:
            continue
    complete = set(out) == {"supervisor", *STAGES} and all(v["rss_mib"] > 0 for v in out.values())
    return out if complete else {}


class _FrameCount:
    """Frame events in the journal so far, read incrementally (a 100 000-frame journal is ~50 MB)."""

    def __init__(self, journal: Path) -> None:
        self.journal, self.offset, self.count = journal, 0, 0

    def update(self) -> int:
        if self.journal.exists():
            with open(self.journal, "rb") as file:
                file.seek(self.offset)
                chunk = file.read()
            whole = chunk.rfind(b"\n") + 1  # a line being written is counted next time
            self.count += chunk[:whole].count(b'"type":"frame"')
            self.offset += whole
        return self.count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=100_000, help="frames to run (default 100000)")
    parser.add_argument("--source", default="synthetic://320x240?fps=30",
                        help="source URI; a live-paced synthetic one by default (--flood runs it flat out)")
    parser.add_argument("--flood", action="store_true",
                        help="as fast as the pipeline goes, every frame scored (lossless)")
    parser.add_argument("--bundle", default=str(REFERENCE_BUNDLE), help="bundle (default: the reference)")
    parser.add_argument("--kill-every", type=float, default=60.0,
                        help="seconds between injected kill -9s of a random stage (0: none)")
    parser.add_argument("--out", type=Path, required=True, help="run folder (must not hold a run)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--seed", type=int, default=0, help="which stages get killed, in order")
    args = parser.parse_args(argv)
    command = [sys.executable, "-m", "pipeline.cli", "--source", args.source, "--bundle", args.bundle,
               "--out", str(args.out), "--quiet", "--events", "tcp://127.0.0.1:*", "--control",
               "tcp://127.0.0.1:*", "--set", f"source.max_frames={args.frames}",
               "--set", "run.max_restarts=1000",
               *(["--flood", "--set", "transport.policy=lossless"] if args.flood else [])]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    supervisor = psutil.Process(process.pid)
    rng = random.Random(args.seed)
    started = time.monotonic()
    first: dict[str, dict[str, float]] | None = None
    last: dict[str, dict[str, float]] = {}
    kills: list[str] = []
    killed_at = started
    next_kill = started + SETTLE_S + args.kill_every if args.kill_every else float("inf")
    counted = _FrameCount(args.out / "events.jsonl")
    with tqdm(total=args.frames, unit="frame", desc="soak") as bar:
        while process.poll() is None:
            time.sleep(1.0)
            now = time.monotonic()
            bar.update(counted.update() - bar.n)
            if first is None and now - started > SETTLE_S:
                first = _sample(supervisor) or None
            if now >= next_kill:
                stage = rng.choice(STAGES)
                victim = _stages(supervisor).get(stage)
                if victim is not None:
                    victim.send_signal(signal.SIGKILL)
                    kills.append(stage)
                killed_at, next_kill = now, now + args.kill_every
            elif now - killed_at > SETTLE_S:  # every stage settled since the last kill
                last = _sample(supervisor) or last
    stderr = process.stderr.read() if process.stderr else ""
    summary_path = args.out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    figures = {"frames": summary.get("frames"), "restarts": summary.get("restarts", {}).get("by_stage"),
               "kills": kills, "exit_code": process.returncode, "start": first, "end": last,
               "duration_s": round(time.monotonic() - started, 1)}
    print(f"exit {process.returncode}; {len(kills)} kills; restarts {figures['restarts']}")
    print(f"{'process':<12}{'RSS start MiB':>14}{'RSS end MiB':>13}{'growth':>8}{'fds start':>11}"
          f"{'fds end':>9}")
    for name in (first or {}):
        if name in last:
            a, b = first[name], last[name]
            growth = 100 * (b["rss_mib"] / a["rss_mib"] - 1)
            print(f"{name:<12}{a['rss_mib']:>14.1f}{b['rss_mib']:>13.1f}{growth:>7.1f}%"
                  f"{a['fds']:>11.0f}{b['fds']:>9.0f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if process.returncode:
        print(stderr.strip().splitlines()[-1] if stderr.strip() else "the run failed", file=sys.stderr)
    return 0 if process.returncode == 0 else 1
