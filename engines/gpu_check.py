"""The first run on a GPU machine, as one command: every GPU backend end to end, one JSON and Markdown report.

On the reference bundle and on a FetalCLIP ViT-L/14-architecture bundle with random weights, a quality
head and a mask decoder (built here by the real bundle builder), it runs the torch engine on CUDA and,
where TensorRT is installed, the trt engine, each at fp16 and fp32; compares every output with ONNX
Runtime fp32 on the CPU at the tolerances of :data:`engines.tensorrt.PARITY`; loads each TensorRT plan a
second time to check it comes from the plan cache with the same outputs; times batches of 1 and 8; and
adds the GPU rows of sweepstream-bench-engine. The report is rewritten after every check, so a run cut
short still leaves what it found.

Exit status: 0 every check passed, 1 a check failed (the report says which), 3 no CUDA GPU is usable here
(one line says why; nothing is checked).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import EngineOptions
from engines.bundle import Bundle, load_bundle
from engines.registry import nvidia_driver_present, select_engine
from engines.tensorrt import PARITY, TrtEngine, TrtOptions

NO_GPU = 3
FRAMES = 8
"""Frames every backend scores for parity (one batch; also the largest timed batch)."""
BATCHES = (1, FRAMES)
TIMED_CALLS = 10
PRECISIONS = ("fp16", "fp32")


def torch_cuda() -> tuple[bool, str]:
    """Whether torch sees a CUDA device, and which."""
    try:
        import torch
    except ModuleNotFoundError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA device"
    return True, f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}"


def gpu_backends() -> dict[str, tuple[bool, str]]:
    """Each GPU backend's availability and reason; empty without an NVIDIA driver (nothing is imported)."""
    if not nvidia_driver_present():
        return {}
    return {"torch": torch_cuda(), "trt": TrtEngine.available()}


def make_vit_l_bundle(out: Path) -> Path:
    """FetalCLIP's ViT-L/14 with random weights, a quality head and a mask decoder, through build_bundle (its
    own ORT-vs-torch parity check included), with the torch model the torch engine runs."""
    import torch

    from engines.export.build_bundle import build_bundle
    from engines.export.fetalclip import build_model, load_config
    from engines.export.heads import MaskDecoder, QualityHead, evenly_spaced_blocks, save_heads

    inputs = out.parent / f"{out.name}-inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = load_config("fetalclip")
    model = build_model(config)
    torch.save({"state_dict": model.state_dict()}, inputs / "weights.pt")
    visual = model.visual
    mask = MaskDecoder(width=visual.transformer.width, grid=visual.grid_size[0],
                       image_size=config["vision_cfg"]["image_size"],
                       blocks=evenly_spaced_blocks(len(visual.transformer.resblocks)), channels=32)
    save_heads(inputs / "heads.pt", quality=QualityHead(visual.output_dim), mask=mask)
    del model
    build_bundle(inputs / "weights.pt", out, config="fetalclip", heads=inputs / "heads.pt", check_frames=2,
                 name="fetalclip-vit-l-random")
    return out


def sample_batch(bundle: Bundle) -> np.ndarray:
    """The int8 gate's ultrasound-like frames, in the bundle's frame shape."""
    from engines.export.quantize import sample_frames

    grey = sample_frames(count=FRAMES, size=bundle.input.size)
    return grey if bundle.input.channels == 1 else np.repeat(grey[..., None], 3, axis=-1)


def compare(bundle: Bundle, got: dict[str, np.ndarray], want: dict[str, np.ndarray],
            precision: str) -> tuple[dict[str, float], list[str]]:
    """Each output against ORT fp32 at ``precision``'s parity: the measured figures and what missed."""
    from engines.export.quantize import row_cosines

    parity = PARITY[precision]
    figures: dict[str, float] = {}
    misses: list[str] = []
    for spec in bundle.outputs.values():
        mine, theirs = got[spec.name], want[spec.name]
        if spec.kind == "embedding":
            name, value = f"{spec.name}_cosine_min", float(row_cosines(mine, theirs).min())
            ok, bound = value >= parity.min_cosine, f">= {parity.min_cosine}"
        elif spec.kind == "mask":
            name, value = f"{spec.name}_agreement", float(np.mean(mine == theirs))
            ok, bound = value >= parity.min_mask_agreement, f">= {parity.min_mask_agreement}"
        else:
            name = f"{spec.name}_max_abs_diff"
            value = float(np.abs(mine.astype(np.float64) - theirs).max())
            ok, bound = value <= parity.score_atol, f"<= {parity.score_atol}"
        figures[name] = value
        if not ok:
            misses.append(f"{name} {value:.6g} (needs {bound})")
    return figures, misses


def median_ms(engine: Any, batch: np.ndarray) -> float:
    """Median wall time of one ``infer`` of ``batch``, after one untimed call."""
    engine.infer(batch)
    times = []
    for _ in range(TIMED_CALLS):
        start = time.perf_counter()
        engine.infer(batch)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def open_engine(bundle: Bundle, backend: str, precision: str, cache: Path) -> Any:
    """The engine as the pipeline builds it, on CUDA, taking the whole parity batch."""
    options = EngineOptions(device="cuda", max_batch=FRAMES, precision=precision)
    own = {"trt": TrtOptions(cache_dir=str(cache))} if backend == "trt" else {}
    engine, _ = select_engine(backend, bundle, options, own)
    return engine


def run_case(bundle: Bundle, backend: str, precision: str, want: dict[str, np.ndarray], cache: Path) -> dict:
    """Load, score, compare, time; for trt also a second load that must hit the plan cache."""
    row: dict[str, Any] = {"bundle": bundle.name, "backend": backend, "precision": precision}
    frames = sample_batch(bundle)
    engine = open_engine(bundle, backend, precision, cache)
    start = time.perf_counter()
    engine.load()
    row["load_s"] = round(time.perf_counter() - start, 1)
    try:
        row["describe"] = engine.describe()
        got = engine.infer(frames)
        row["parity"], failures = compare(bundle, got, want, precision)
        row["latency_ms"] = {str(n): round(median_ms(engine, frames[:n]), 3) for n in BATCHES}
    finally:
        engine.close()
    if backend == "trt":
        again = open_engine(bundle, backend, precision, cache)
        start = time.perf_counter()
        again.load()
        try:
            second = again.infer(frames)
            row["second_load"] = {"cache": again.describe()["cache"],
                                  "load_s": round(time.perf_counter() - start, 1),
                                  "same_outputs": all(np.array_equal(second[k], got[k]) for k in got)}
        finally:
            again.close()
        if row["second_load"]["cache"] != "hit":
            failures.append(f"second load was a plan cache {row['second_load']['cache']}, not a hit")
        if not row["second_load"]["same_outputs"]:
            failures.append("the cached plan's outputs differ from the first load's")
    row["failures"], row["passed"] = failures, not failures
    return row


def bench_rows(bundle: Path, out: Path) -> tuple[list[dict], list[str]]:
    """sweepstream-bench-engine on ``bundle``; its rows on a CUDA device, and a failure if it failed."""
    from engines.benchmark import main as bench_main

    path = out / "bench_engine.json"
    batches = ",".join(map(str, BATCHES))
    code = bench_main(["--bundle", str(bundle), "--batches", batches, "--repeats", "5", "--warmup", "1",
                       "--json", str(path)])
    if code != 0:
        return [], [f"sweepstream-bench-engine exited {code}"]
    rows = json.loads(path.read_text())["rows"]
    keep = ("backend", "precision", "batch", "median_ms", "ms_per_frame", "frames_per_s", "min_cosine")
    return [{k: row.get(k) for k in keep} for row in rows if str(row["device"]).startswith("cuda")], []


def markdown(report: dict) -> str:
    """The report as a page: machine, one line per check, the bench's GPU rows, the verdict."""
    lines = ["# sweepstream GPU check", "", f"- {report['verdict']}"]
    lines += [f"- {name}: {'yes' if ok else 'no'}, {why}" for name, (ok, why) in report["backends"].items()]
    lines += [f"- {note}" for note in report["notes"]]
    lines += ["", "| bundle | backend | precision | load s | parity vs ORT fp32 | ms b1 / b8 | plan cache "
              "| result |", "|---|---|---|---|---|---|---|---|"]
    for row in report["checks"]:
        parity = ", ".join(f"{k} {v:.6g}" for k, v in row.get("parity", {}).items())
        latency = " / ".join(f"{v:.2f}" for v in row.get("latency_ms", {}).values())
        second = row.get("second_load")
        cache = f"{second['cache']} ({second['load_s']} s)" if second else "-"
        result = "pass" if row["passed"] else "FAIL: " + "; ".join(row["failures"])
        lines.append(f"| {row['bundle']} | {row['backend']} | {row['precision']} | "
                     f"{row.get('load_s', '-')} | {parity} | {latency} | {cache} | {result} |")
    if report["bench_gpu_rows"]:
        lines += ["", "sweepstream-bench-engine, GPU rows:", "",
                  "| backend | precision | batch | median ms | ms/frame | frames/s | min cos |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['backend']} | {r['precision']} | {r['batch']} | {r['median_ms']:.2f} | "
                  f"{r['ms_per_frame']:.2f} | {r['frames_per_s']:.1f} | {r['min_cosine']} |"
                  for r in report["bench_gpu_rows"]]
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    """Both report files, with the verdict so far."""
    report["failed"] = sum(not row["passed"] for row in report["checks"]) + len(report["failures"])
    report["verdict"] = f"{len(report['checks'])} checks, {report['failed']} failed" + (
        "" if report["finished"] else " (still running)")
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


def check(out: Path, vit_l: bool, bench: bool, backends: dict[str, tuple[bool, str]]) -> dict:
    """Every check on every bundle; the report, written after each step."""
    from engines.export.reference import make_reference_bundle
    from engines.onnxruntime import OrtEngine

    report: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "backends": backends, "parity": {k: dataclasses.asdict(v) for k, v in PARITY.items()},
        "checks": [], "bench_gpu_rows": [], "failures": [], "notes": [], "finished": False,
    }
    usable = [name for name, (ok, _) in backends.items() if ok]
    bundles = [make_reference_bundle(out / "bundles" / "reference")]
    if vit_l:
        bundles.append(make_vit_l_bundle(out / "bundles" / "vit-l-random"))
    for path in bundles:
        bundle = load_bundle(path)
        reference = OrtEngine(bundle, EngineOptions(device="cpu", precision="fp32", max_batch=FRAMES))
        reference.load()
        want = reference.infer(sample_batch(bundle))
        reference.close()
        for backend in usable:
            if backend == "torch" and "torch" not in bundle.manifest["model"]:
                report["notes"].append(f"{bundle.name}: no torch rows (the bundle has no torch model)")
                continue
            for precision in PRECISIONS:
                try:
                    report["checks"].append(run_case(bundle, backend, precision, want, out / "plans"))
                except Exception as exc:  # recorded and counted: one failed backend must not hide the others
                    report["checks"].append({"bundle": bundle.name, "backend": backend,
                                             "precision": precision, "passed": False,
                                             "failures": [f"{type(exc).__name__}: {exc}"]})
                write(report, out)
    if bench and vit_l:
        report["bench_gpu_rows"], failures = bench_rows(bundles[-1], out)
        report["failures"] += failures
    report["finished"] = True
    write(report, out)
    return report


def main(argv: list[str] | None = None) -> int:
    """The `sweepstream-gpu-check` command (tools/gpu_check.py)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check"),
                        help="folder for gpu_check.json, gpu_check.md, the bundles and the plan cache "
                        "(default %(default)s)")
    parser.add_argument("--skip-vit-l", action="store_true",
                        help="only the reference bundle (minutes less: no ViT-L export, no bench rows)")
    parser.add_argument("--no-bench", action="store_true", help="leave out sweepstream-bench-engine's rows")
    args = parser.parse_args(argv)
    backends = gpu_backends()
    if not any(ok for ok, _ in backends.values()):
        why = "; ".join(f"{name}: {reason}" for name, (_, reason) in backends.items()) or (
            "no NVIDIA driver (/proc/driver/nvidia/version is absent)")
        print(f"gpu_check: no CUDA GPU is usable here: {why}; nothing was checked", file=sys.stderr)
        return NO_GPU
    args.out.mkdir(parents=True, exist_ok=True)
    report = check(args.out, vit_l=not args.skip_vit_l, bench=not args.no_bench, backends=backends)
    print(report["verdict"])
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    return 0 if report["failed"] == 0 else 1
