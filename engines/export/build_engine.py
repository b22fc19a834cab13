"""Build (or find in the cache) the TensorRT plan a run will load, on this machine's GPU.

A plan only runs on the TensorRT version and GPU model that built it, and building one takes minutes, so
run this once on the target machine before starting the pipeline with ``--engine trt`` (or auto). It reads
the run configuration the pipeline reads (``--config``, ``--set``) and builds through the trt engine
itself, so the plan is keyed by the very bundle, precision, batch profile and max batch the infer stage
asks for, and that stage loads it in seconds instead of rebuilding.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from engines.base import EngineError, EngineOptions
from engines.bundle import BundleError, load_bundle
from engines.export.trt_constraints import check_tensorrt_onnx
from engines.tensorrt import CACHE_ENV, DEFAULT_CACHE_DIR, DEFAULT_PROFILE, TrtEngine
from pipeline.config import Config, ConfigError, load_config

SHORTCUTS = {
    "bundle": "infer.bundle",
    "precision": "infer.precision",
    "profile": "infer.trt.profile",
    "max_batch": "infer.max_batch",
    "cache": "infer.trt.cache_dir",
}
"""Flags that are shortcuts for run config keys, as the pipeline's own flags are."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Build the TensorRT plan a sweepstream run will load, on this machine's GPU, and store it in "
            "the plan cache, where the trt engine looks for it. Give it the run's own configuration "
            "(--config, --set, or the shortcuts below): plans are keyed by TensorRT version, GPU model, "
            "compute capability, precision, batch profile, build recipe and the bundle's model sha256, "
            "and the profile is resolved as the engine resolves it (clipped to the bundle, min lowered to "
            "its min batch, max raised to infer.max_batch), so a cached plan is the one the run asks for. "
            "Checks the bundle's ONNX against the TensorRT ONNX parser's documented constraints first. "
            "Needs TensorRT 10+, cuda-python and an NVIDIA GPU."
        )
    )
    parser.add_argument("--config", metavar="FILE", help="the run's TOML config ([infer], [infer.trt])")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config option, as the pipeline's --set does (repeatable)")
    parser.add_argument("--bundle", type=Path, help="bundle directory (infer.bundle)")
    parser.add_argument("--precision", choices=("auto", "fp16", "fp32"),
                        help="plan precision (infer.precision; auto builds fp16, as the engine does)")
    parser.add_argument("--profile", metavar="MIN,OPT,MAX",
                        help=f"batch profile the plan is tuned for (infer.trt.profile, default "
                        f"{','.join(map(str, DEFAULT_PROFILE))})")
    parser.add_argument("--max-batch", metavar="N", help="largest batch the run sends (infer.max_batch)")
    parser.add_argument("--cache", type=Path,
                        help=f"plan cache directory (infer.trt.cache_dir; default ${CACHE_ENV}, "
                        f"else {DEFAULT_CACHE_DIR})")
    parser.add_argument("--gpu", type=int, default=0, help="CUDA device index to build on (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a valid plan is cached")
    return parser


def read_config(args: argparse.Namespace) -> Config:
    """The run config from ``--config``, the shortcut flags and ``--set``, as the pipeline builds it."""
    overrides = {key: str(getattr(args, flag)) for flag, key in SHORTCUTS.items()
                 if getattr(args, flag) is not None}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item}: expected SECTION.KEY=VALUE")
        overrides[key.strip()] = value.strip()
    return load_config(args.config, overrides)


def plan_engine(config: Config, gpu: int = 0) -> TrtEngine:
    """The trt engine the infer stage would build from ``config`` (not loaded): same bundle, precision,
    max_batch and ``[infer.trt]`` options, hence the same plan key."""
    infer = config.infer
    options = EngineOptions(device=f"cuda:{gpu}", max_batch=infer.max_batch, precision=infer.precision)
    return TrtEngine(load_bundle(infer.bundle), options, infer.backends["trt"])


def main(argv: list[str] | None = None) -> int:
    """The `sweepstream-build-engine` command: build or reuse the plan, print its path, cache key and build
    time; exit 2 on a bad configuration or without TensorRT, 1 on a bad bundle or a failed build."""
    args = build_parser().parse_args(argv)
    try:
        config = read_config(args)
    except ConfigError as exc:
        print(f"build_engine: error: {exc}", file=sys.stderr)
        return 2
    try:
        engine = plan_engine(config, args.gpu)
        problems = check_tensorrt_onnx(engine.bundle.model_path)
    except (BundleError, EngineError) as exc:
        print(f"build_engine: {exc}", file=sys.stderr)
        return 1
    if problems:
        print(f"build_engine: {engine.bundle.model_path} breaks the TensorRT ONNX parser's documented "
              f"constraints:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    ok, reason = TrtEngine.available()
    if not ok:
        print(f"build_engine: TensorRT is not available here: {reason}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    requested = engine.backend_options.profile
    if engine.profile != requested:
        print(f"batch profile {requested} -> {engine.profile}: bundle batch "
              f"{engine.bundle.min_batch}..{engine.bundle.max_batch}, max batch {engine.max_batch}")
    try:
        info = engine.ensure_plan(force=args.force)
    except EngineError as exc:
        print(f"build_engine: {exc}", file=sys.stderr)
        return 1
    print(f"plan: {info.path}")
    print(f"key: {info.digest} ({info.key.precision}, batch {info.key.profile}, {info.key.gpu_name}, "
          f"tensorrt {info.key.tensorrt_version}, {info.key.recipe})")
    print(f"build: {info.seconds:.1f} s" if info.built else "build: cached plan reused (--force rebuilds)")
    return 0
