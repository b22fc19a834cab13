"""Engine benchmark: batch latency of torch eager fp32, ONNX Runtime fp32 and ONNX Runtime INT8 on one bundle.

All rows are measured in one process run, in this fixed order (not interleaved):

1. torch eager fp32 on CPU (the bundle's torch model; skipped with a note if it has none),
2. ONNX Runtime fp32 on CPU (model.onnx),
3. ONNX Runtime INT8 on CPU (the gated model.int8.onnx; skipped with a note if it has none),
4. with CUDA: torch eager with fp16 autocast on the GPU.

Each backend is built through engines.registry.select_engine with the same EngineOptions the
pipeline uses (so this measures what the pipeline runs), loaded once (load() warms up on
zero batches), and then, for each --batches size in order, runs --warmup untimed and
--repeats timed ``engine.infer`` calls on the same frames; it is closed before the next
backend loads, so one model is in memory at a time. Frames are engines.export.quantize.sample_frames
(ultrasound-like, the int8 gate's kind of input). Latency is the median of the timed calls.
Accuracy is the lowest per-frame cosine between a row's embeddings (last timed call) and the
torch fp32 row's at the same batch (ORT fp32's when there is no torch row).

Target (the project's issue): ORT INT8 >= 3x faster than torch eager fp32 at cosine >= 0.999.
FLOPs per image are counted for the ViT image tower from the bundle's config (ViT-L/14 at
224: 162 GFLOP, the floor any backend must compute); GFLOP/s is that times frames per second.
Writes --json and a bar chart PNG next to it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from engines.base import EngineError, EngineOptions
from engines.bundle import Bundle, BundleError, load_bundle
from engines.export.quantize import row_cosines, sample_frames
from engines.plots import batch_bars
from engines.registry import engine_class, nvidia_driver_present, select_engine

TARGET_SPEEDUP = 3.0
TARGET_COSINE = 0.999
DEFAULT_MLP_RATIO = 4.0


@dataclass(frozen=True)
class Backend:
    """One benchmarked configuration: an engine key and the options that pick its device and model."""

    label: str
    engine: str
    device: str
    precision: str


TORCH_CPU = Backend("torch eager fp32", "torch", "cpu", "auto")
ORT_FP32 = Backend("ort fp32", "ort", "cpu", "fp32")
ORT_INT8 = Backend("ort int8", "ort", "cpu", "int8")
TORCH_CUDA = Backend("torch cuda fp16", "torch", "cuda", "auto")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--bundle", type=Path, required=True, help="bundle directory (ideally with torch and int8)"
    )
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default %(default)s)")
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed calls per row; median reported (default 7)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per row first (default 2)")
    parser.add_argument(
        "--threads", type=int, default=0, help="intra-op threads, 0 = backend default (default 0)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("bench_engine.json"),
        help="figures (default %(default)s); PNG beside it",
    )
    args = parser.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches: expected comma-separated integers, got {args.batches!r}")
    if min(args.batches) < 1 or len(set(args.batches)) != len(args.batches):
        parser.error("--batches: sizes must be distinct and >= 1")
    if args.repeats < 1 or args.warmup < 0 or args.threads < 0:
        parser.error("--repeats must be >= 1, --warmup and --threads >= 0")
    return args


def vit_gflop(cfg: dict[str, Any] | None, size: int) -> float | None:
    """Multiply-adds x 2 per ``size`` x ``size`` image of the ViT image tower of an open_clip config (patch
    embedding, blocks, projection), or None without a config or for a timm tower (a student's FastViT).
    Heads (quality, mask) are not counted."""
    if cfg is None or "vision_cfg" not in cfg or "timm_model_name" in cfg["vision_cfg"]:
        return None
    vision = cfg["vision_cfg"]
    width, layers, patch = vision["width"], vision["layers"], vision["patch_size"]
    mlp = vision.get("mlp_ratio", DEFAULT_MLP_RATIO)
    grid = size // patch
    tokens = grid * grid + 1
    linear = 2 * tokens * (4 + 2 * mlp) * width * width  # qkv + attention out, MLP up + down
    attention = 2 * 2 * tokens * tokens * width  # q @ k^T and attention @ v
    patch_embed = 2 * grid * grid * 3 * patch * patch * width
    projection = 2 * width * cfg["embed_dim"]
    return (layers * (linear + attention) + patch_embed + projection) / 1e9


def cpu_name() -> str:
    """The CPU model as the kernel reports it (platform.processor() is often empty on Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def plan(bundle: Bundle) -> tuple[list[Backend], list[str]]:
    """The backends to run, in the documented order, and a note for each one left out."""
    backends, notes = [], []
    try:
        engine_class("torch")
        torch_ok, why_not = True, ""
    except EngineError as exc:
        torch_ok, why_not = False, str(exc)
    if not torch_ok:
        notes.append(f"torch rows skipped: {why_not}")
    elif "torch" not in bundle.manifest["model"]:
        notes.append(
            "torch rows skipped: the bundle has no torch model (model.torch); cosines are vs ort fp32"
        )
    else:
        backends.append(TORCH_CPU)
    backends.append(ORT_FP32)
    if bundle.int8_path is None:
        notes.append(
            "ort int8 row skipped: the bundle has no gated int8 model; build it with tools/quantize_bundle.py"
        )
    else:
        backends.append(ORT_INT8)
    if TORCH_CPU in backends:
        import torch  # available: engine_class("torch") imported it

        if nvidia_driver_present() and torch.cuda.is_available():
            backends.append(TORCH_CUDA)
        else:
            notes.append("torch-CUDA fp16 rows skipped: no CUDA device")
    return backends, notes


def measure(
    bundle: Bundle, backends: list[Backend], frames: np.ndarray, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[tuple[str, int], np.ndarray | None]]:
    """Time every backend at every batch size; returns the rows and each row's embeddings."""
    embedding = next((spec.name for spec in bundle.outputs.values() if spec.kind == "embedding"), None)
    rows: list[dict[str, Any]] = []
    embeddings: dict[tuple[str, int], np.ndarray | None] = {}
    total = len(backends) * len(args.batches) * (args.warmup + args.repeats)
    with tqdm(total=total, desc="bench", unit="call") as progress:
        for backend in backends:
            progress.set_postfix_str(f"load {backend.label}")
            options = EngineOptions(
                threads=args.threads,
                device=backend.device,
                max_batch=max(args.batches),
                precision=backend.precision,
            )
            engine, _ = select_engine(backend.engine, bundle, options)
            engine.load()
            info = engine.describe()
            for n in args.batches:
                progress.set_postfix_str(f"{backend.label} batch {n}")
                batch = frames[:n]
                for _ in range(args.warmup):
                    engine.infer(batch)
                    progress.update()
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    outputs = engine.infer(batch)
                    times.append(time.perf_counter() - start)
                    progress.update()
                embeddings[(backend.label, n)] = outputs[embedding] if embedding is not None else None
                median_ms = float(np.median(times)) * 1e3
                rows.append(
                    {
                        "backend": backend.label,
                        "engine": backend.engine,
                        "device": info["device"],
                        "precision": info["precision"],
                        "model": info.get("model"),
                        "batch": n,
                        "median_ms": median_ms,
                        "ms_per_frame": median_ms / n,
                        "frames_per_s": n / (median_ms / 1e3),
                        "times_ms": [t * 1e3 for t in times],
                        "describe": info,
                    }
                )
            engine.close()
            del engine
            gc.collect()
    return rows, embeddings


def annotate(
    rows: list[dict[str, Any]], embeddings: dict[tuple[str, int], np.ndarray | None], gflop: float | None
) -> str:
    """Add speed-up vs torch fp32, min cosine vs the reference row and GFLOP/s; returns the reference."""
    labels = {row["backend"] for row in rows}
    reference = TORCH_CPU.label if TORCH_CPU.label in labels else ORT_FP32.label
    medians = {(row["backend"], row["batch"]): row["median_ms"] for row in rows}
    for row in rows:
        key = (row["backend"], row["batch"])
        torch_ms = medians.get((TORCH_CPU.label, row["batch"]))
        row["speedup_vs_torch_fp32"] = torch_ms / row["median_ms"] if torch_ms is not None else None
        mine, theirs = embeddings[key], embeddings[(reference, row["batch"])]
        row["min_cosine"] = (float(row_cosines(mine, theirs).min())
                             if mine is not None and theirs is not None else None)
        row["cosine_vs"] = reference
        row["gflop_per_s"] = gflop * row["frames_per_s"] if gflop is not None else None
    return reference


def target_check(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's target per batch size: ORT INT8 >= 3x torch eager fp32 at embedding cosine >= 0.999."""
    per_batch = {}
    for row in rows:
        if row["backend"] == ORT_INT8.label and row["speedup_vs_torch_fp32"] is not None:
            cosine = row["min_cosine"]
            met = (
                row["speedup_vs_torch_fp32"] >= TARGET_SPEEDUP
                and cosine is not None
                and cosine >= TARGET_COSINE
            )
            per_batch[str(row["batch"])] = {
                "speedup": row["speedup_vs_torch_fp32"],
                "min_cosine": cosine,
                "met": met,
            }
    return {"speedup": TARGET_SPEEDUP, "min_cosine": TARGET_COSINE, "per_batch": per_batch}


def table(rows: list[dict[str, Any]], reference: str) -> str:
    header = (
        f"{'backend':<18}{'precision':<15}{'batch':>5}{'median ms':>11}{'ms/frame':>10}{'frames/s':>10}"
        f"{'x torch':>9}{'min cos':>10}{'GFLOP/s':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        speedup = f"{row['speedup_vs_torch_fp32']:.2f}" if row["speedup_vs_torch_fp32"] is not None else "-"
        cosine = (
            "ref"
            if row["backend"] == reference
            else (f"{row['min_cosine']:.6f}" if row["min_cosine"] is not None else "-")
        )
        gflops = f"{row['gflop_per_s']:.0f}" if row["gflop_per_s"] is not None else "-"
        lines.append(
            f"{row['backend']:<18}{row['precision']:<15}{row['batch']:>5}{row['median_ms']:>11.1f}"
            f"{row['ms_per_frame']:>10.1f}{row['frames_per_s']:>10.2f}{speedup:>9}{cosine:>10}{gflops:>9}"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], batches: list[int], title: str, path: Path) -> None:
    """Grouped bars of ms/frame per batch size, one bar per backend, labelled with the speed-up vs torch."""
    labels = list(dict.fromkeys(row["backend"] for row in rows))
    by_key = {(row["backend"], row["batch"]): row for row in rows}
    with batch_bars(labels, batches, title, "median ms per frame (lower is better)", path) as (ax, xs, width):
        for i, label in enumerate(labels):
            cells = [by_key.get((label, n)) for n in batches]
            heights = [cell["ms_per_frame"] if cell else 0.0 for cell in cells]
            bars = ax.bar(xs(i), heights, width, label=label, color=f"C{i}")
            for bar, cell in zip(bars, cells, strict=True):
                if cell and cell["speedup_vs_torch_fp32"] is not None:
                    ax.annotate(f"x{cell['speedup_vs_torch_fp32']:.1f}",
                                (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                                va="bottom", fontsize=8)


def main(argv: list[str] | None = None) -> int:
    """The `sweepstream-bench-engine` command: every backend this machine has, one row per batch size;
    one error line and exit 1 on a bad bundle or an engine that fails."""
    args = parse_args(argv)
    try:
        bundle = load_bundle(args.bundle)
    except BundleError as exc:
        print(f"bench_engine: error: {exc}", file=sys.stderr)
        return 1
    if not bundle.min_batch <= min(args.batches) <= max(args.batches) <= bundle.max_batch:
        allowed = f"{bundle.min_batch}..{bundle.max_batch}"
        print(f"bench_engine: error: --batches must lie in the bundle's range {allowed}", file=sys.stderr)
        return 1
    backends, notes = plan(bundle)
    grey = sample_frames(count=max(args.batches), size=bundle.input.size)
    frames = grey if bundle.input.channels == 1 else np.repeat(grey[..., None], 3, axis=-1)
    gflop = vit_gflop(bundle.manifest["source"].get("config"), bundle.input.size)

    try:
        rows, embeddings = measure(bundle, backends, frames, args)
    except (BundleError, EngineError) as exc:
        print(f"bench_engine: error: {exc}", file=sys.stderr)
        return 1
    reference = annotate(rows, embeddings, gflop)
    target = target_check(rows)

    cpu = cpu_name()
    threads = args.threads or "backend default"
    print(f"\nbundle {bundle.name} {bundle.version} on {cpu} ({os.cpu_count()} CPUs), threads {threads}")
    print(f"median of {args.repeats} after {args.warmup} warm-up; cosine of embeddings vs {reference}")
    print(table(rows, reference))
    if gflop is not None:
        print(f"image tower: {gflop:.1f} GFLOP per image (floor for any backend; heads not counted)")
    for n, result in target["per_batch"].items():
        verdict = "met" if result["met"] else "NOT met"
        cosine = f"{result['min_cosine']:.6f}" if result["min_cosine"] is not None else "n/a"
        print(
            f"target ort int8 >= {TARGET_SPEEDUP:g}x torch eager fp32 at cosine >= {TARGET_COSINE}: "
            f"batch {n}: x{result['speedup']:.2f}, cosine {cosine} -> {verdict}"
        )
    for note in notes:
        print(f"note: {note}")

    report = {
        "bundle": {"name": bundle.name, "version": bundle.version, "path": str(bundle.path)},
        "machine": {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {
            "batches": args.batches,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "threads": args.threads,
        },
        "order": [backend.label for backend in backends],
        "order_note": "backends in this order, each loaded once; batches in --batches order; not interleaved",
        "frames": f"engines.export.quantize.sample_frames(count={len(frames)}, size={bundle.input.size})",
        "cosine_vs": reference,
        "gflop_per_image": gflop,
        "int8_gate": bundle.manifest["model"].get("int8", {}).get("gate"),
        "target": target,
        "notes": notes,
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    png = args.json.with_suffix(".png")
    plot(rows, args.batches, f"{bundle.name}: engine latency on {cpu}", png)
    print(f"wrote {args.json} and {png}")
    return 0

