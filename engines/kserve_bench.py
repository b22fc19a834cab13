"""Latency per frame through a KServe v2 server (the kserve engine over gRPC and over HTTP) against the
same model run in-process by ONNX Runtime, in one run.

tools/serve_bundle.py is started here on loopback with the bundle's fp32 model (ONNX Runtime, --threads as
the local engine's), so each remote call costs the same model run plus the protocol: encoding, the loopback
transfer both ways, the server's request handling. The three engines are called in turn, round after round,
on the same frames (engines.export.quantize.sample_frames): on a shared machine whose load drifts, a
round's calls see the same load, and the per-round difference remote - local is the protocol's own cost.
The server shares this machine's cores with the cart, as it would not in a hospital.

Prints per batch size the median (p10, p90) per frame of each engine and the median per-round overhead over
local ORT; the largest output difference from local ORT says the remote outputs are the same. Writes --json
and a bar chart PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from engines.base import Engine, EngineError, EngineOptions
from engines.bundle import Bundle, BundleError, load_bundle
from engines.export.quantize import sample_frames
from engines.kserve import KserveOptions
from engines.plots import batch_bars
from engines.registry import select_engine
from engines.serve import serving

LOCAL = "ort fp32 (local)"
TIMEOUT_S = 120.0  # a timed-out call would leave no figure: generous


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("bundles/demo"),
                        help="bundle (default %(default)s)")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per batch size (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime threads, local and in the server (default %(default)s)")
    parser.add_argument("--json", type=Path, default=Path("bench_kserve.json"),
                        help="figures (default %(default)s); PNG beside it")
    args = parser.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches: expected comma-separated integers, got {args.batches!r}")
    if min(args.batches) < 1 or args.rounds < 1 or args.warmup < 0 or args.threads < 0:
        parser.error("--batches and --rounds must be >= 1, --warmup and --threads >= 0")
    return args


def engines_for(bundle: Bundle, grpc_port: int, http_port: int, threads: int, max_batch: int
                ) -> dict[str, Engine]:
    """Local ORT fp32 and the kserve engine over gRPC and HTTP, built as the pipeline builds them."""
    options = EngineOptions(threads=threads, device="cpu", max_batch=max_batch, precision="fp32")
    local, _ = select_engine("ort", bundle, options)
    found = {LOCAL: local}
    for scheme, port in (("grpc", grpc_port), ("http", http_port)):
        own = {"kserve": KserveOptions(url=f"{scheme}://127.0.0.1:{port}", timeout_s=TIMEOUT_S)}
        remote = EngineOptions(max_batch=max_batch)
        found[f"kserve {scheme}"], _ = select_engine("kserve", bundle, remote, own)
    return found


def measure(engines: dict[str, Engine], frames: np.ndarray, args: argparse.Namespace
            ) -> list[dict[str, Any]]:
    """Every engine once per round, in turn; rows of per-frame figures per engine and batch size."""

    rows = []
    total = len(args.batches) * (args.warmup + args.rounds) * len(engines)
    with tqdm(total=total, desc="bench", unit="call") as progress:
        for n in args.batches:
            batch = frames[:n]
            times: dict[str, list[float]] = {name: [] for name in engines}
            outputs: dict[str, dict[str, np.ndarray]] = {}
            for round_index in range(args.warmup + args.rounds):
                for name, engine in engines.items():
                    started = time.perf_counter()
                    outputs[name] = engine.infer(batch)
                    if round_index >= args.warmup:
                        times[name].append((time.perf_counter() - started) / n * 1e3)
                    progress.update()
            local = np.asarray(times[LOCAL])
            for name, ms in times.items():
                ms_array = np.asarray(ms)
                diff = max(float(np.abs(outputs[name][k].astype(np.float64) - outputs[LOCAL][k]).max())
                           for k in outputs[LOCAL])
                rows.append({"engine": name, "batch": n, "ms_per_frame_median": float(np.median(ms_array)),
                             "ms_per_frame_p10": float(np.percentile(ms_array, 10)),
                             "ms_per_frame_p90": float(np.percentile(ms_array, 90)),
                             "overhead_ms_per_frame_median": float(np.median(ms_array - local)),
                             "max_abs_diff_vs_local": diff, "ms_per_frame": ms})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    header = (f"{'engine':<18}{'batch':>6}{'ms/frame p50':>14}{'p10':>9}{'p90':>9}{'vs local p50':>14}"
              f"{'max |diff|':>12}")
    lines = [header, "-" * len(header)]
    for row in rows:
        overhead = "-" if row["engine"] == LOCAL else f"{row['overhead_ms_per_frame_median']:+.1f}"
        lines.append(f"{row['engine']:<18}{row['batch']:>6}{row['ms_per_frame_median']:>14.1f}"
                     f"{row['ms_per_frame_p10']:>9.1f}{row['ms_per_frame_p90']:>9.1f}{overhead:>14}"
                     f"{row['max_abs_diff_vs_local']:>12.2g}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], batches: list[int], title: str, path: Path) -> None:
    """Bars of the median ms per frame per batch size, one per engine, with p10-p90 whiskers."""
    names = list(dict.fromkeys(row["engine"] for row in rows))
    by_key = {(row["engine"], row["batch"]): row for row in rows}
    with batch_bars(names, batches, title, "ms per frame, median (p10-p90), lower is better", path) as (
            ax, xs, width):
        for i, name in enumerate(names):
            cells = [by_key[(name, n)] for n in batches]
            medians = [cell["ms_per_frame_median"] for cell in cells]
            spread = [[m - cell["ms_per_frame_p10"] for m, cell in zip(medians, cells, strict=True)],
                      [cell["ms_per_frame_p90"] - m for m, cell in zip(medians, cells, strict=True)]]
            ax.bar(xs(i), medians, width, yerr=spread, capsize=3, label=name, color=f"C{i}")


def main(argv: list[str] | None = None) -> int:
    """The `sweepstream-bench-kserve` command; one error line and exit 1 on a bad bundle, a server that
    does not start or an engine that fails."""
    args = parse_args(argv)
    try:
        bundle = load_bundle(args.bundle)
        if not bundle.min_batch <= min(args.batches) <= max(args.batches) <= bundle.max_batch:
            allowed = f"{bundle.min_batch}..{bundle.max_batch}"
            raise EngineError(f"--batches must lie in the bundle's range {allowed}")
        grey = sample_frames(count=max(args.batches), size=bundle.input.size)
        frames = grey if bundle.input.channels == 1 else np.repeat(grey[..., None], 3, axis=-1)
        with serving(bundle.path, precision="fp32", threads=args.threads) as (_, grpc_port, http_port):
            engines = engines_for(bundle, grpc_port, http_port, args.threads, max(args.batches))
            for engine in engines.values():
                engine.load()
            try:
                rows = measure(engines, frames, args)
            finally:
                for engine in engines.values():
                    engine.close()
    except (BundleError, EngineError, RuntimeError) as exc:
        print(f"bench_kserve: error: {exc}", file=sys.stderr)
        return 1
    print(f"\nbundle {bundle.name} {bundle.version}: {args.rounds} rounds after {args.warmup} warm-up, "
          f"engines in turn each round; server and cart share this machine; ONNX Runtime threads "
          f"{args.threads}")
    print(table(rows))
    report = {"bundle": {"name": bundle.name, "version": bundle.version, "path": str(bundle.path)},
              "settings": {"batches": args.batches, "rounds": args.rounds, "warmup": args.warmup,
                           "threads": args.threads},
              "method": "interleaved rounds; overhead = per-round remote minus local ms per frame, median",
              "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    png = args.json.with_suffix(".png")
    plot(rows, args.batches, f"{bundle.name}: per-frame latency, KServe v2 on loopback vs local ORT", png)
    print(f"wrote {args.json} and {png}")
    return 0
