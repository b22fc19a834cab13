"""Build (or find in the cache) the TensorRT plan for a bundle on this machine's GPU.

A plan only runs on the TensorRT version and GPU model that built it, and building one
takes minutes, so run this once on the target machine before starting the pipeline with
``--engine trt`` (or auto): the infer stage then loads the cached plan in seconds.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from engines.base import EngineError
from engines.bundle import BundleError, load_bundle
from engines.tensorrt import (
    CACHE_ENV,
    DEFAULT_CACHE_DIR,
    DEFAULT_PROFILE,
    PLAN_PRECISIONS,
    TrtEngine,
    clip_profile,
    ensure_plan,
)


def main(argv: list[str] | None = None) -> int:
    """The `sweepstream-build-engine` command: build or reuse the plan, print its path, cache key and build
    time; exit 2 without TensorRT, 1 on a bad bundle or a failed build."""
    parser = argparse.ArgumentParser(
        description=(
            "Build the TensorRT plan for a sweepstream bundle on this machine's GPU and store it in the "
            "plan cache, where the trt engine looks for it. Plans are keyed by TensorRT version, GPU "
            "model, compute capability, precision, batch profile and the bundle's model sha256, so a "
            "cached plan is reused only where it is valid. Needs TensorRT 10+, cuda-python and an "
            "NVIDIA GPU."
        )
    )
    parser.add_argument("--bundle", type=Path, required=True, help="bundle directory (with bundle.json)")
    parser.add_argument(
        "--precision", choices=PLAN_PRECISIONS, default="fp16",
        help="compute precision (default %(default)s); fp16 is what the trt engine loads by default",
    )
    for flag, default, meaning in zip(
        ("--min-batch", "--opt-batch", "--max-batch"),
        DEFAULT_PROFILE,
        ("smallest batch the plan accepts", "batch the plan is tuned for", "largest batch the plan accepts"),
        strict=True,
    ):
        parser.add_argument(flag, type=int, default=default, help=f"{meaning} (default %(default)s)")
    parser.add_argument(
        "--cache", type=Path, default=None,
        help=f"plan cache directory (default ${CACHE_ENV}, else {DEFAULT_CACHE_DIR})",
    )
    parser.add_argument("--gpu", type=int, default=0, help="CUDA device index to build for (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a valid plan is cached")
    args = parser.parse_args(argv)
    if not 1 <= args.min_batch <= args.opt_batch <= args.max_batch:
        parser.error("batch sizes must satisfy 1 <= --min-batch <= --opt-batch <= --max-batch")

    ok, reason = TrtEngine.available()
    if not ok:
        print(f"build_engine: TensorRT is not available here: {reason}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        bundle = load_bundle(args.bundle)
        requested = (args.min_batch, args.opt_batch, args.max_batch)
        profile = clip_profile(requested, bundle.min_batch, bundle.max_batch)
        if profile != requested:
            batch_range = f"{bundle.min_batch}..{bundle.max_batch}"
            print(f"batch profile {requested} clipped to {profile} to fit bundle batch {batch_range}")
        info = ensure_plan(
            bundle, precision=args.precision, profile=profile, cache_dir=args.cache, force=args.force,
            progress=True, device=args.gpu,
        )
    except (BundleError, EngineError) as exc:
        print(f"build_engine: {exc}", file=sys.stderr)
        return 1
    print(f"plan: {info.path}")
    print(f"key: {info.digest} ({info.key.precision}, batch {info.key.profile}, {info.key.gpu_name}, "
          f"tensorrt {info.key.tensorrt_version})")
    print(f"build: {info.seconds:.1f} s" if info.built else "build: cached plan reused (--force rebuilds)")
    return 0

