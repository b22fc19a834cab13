"""TensorRT plan building: the bundle's ONNX parsed into a network, tuned for a batch profile and written
into the plan cache that the trt engine (:mod:`engines.tensorrt`) reads.

A build takes minutes and needs the GPU it is for; ``tools/build_engine.py`` runs it ahead of time, and
the engine runs it itself on a cache miss. tensorrt is imported only inside functions, like the engine.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from engines.base import EngineError
from engines.bundle import Bundle
from engines.tensorrt import (
    DEFAULT_PROFILE,
    PLAN_PRECISIONS,
    CachePaths,
    PlanKey,
    cache_key,
    import_tensorrt,
    trt_major,
)

log = logging.getLogger("sweepstream")

BUILD_RECIPE = 2
"""Version of what :func:`build_plan` asks of the builder: network flags, precision flags (TF32 cleared
for fp32 since recipe 2), the optimisation profile. Bump it with any change there: it is part of every plan
key (:func:`build_recipe`), so plans built the old way are rebuilt instead of silently reused."""


def build_recipe(precision: str, strongly_typed: bool) -> str:
    """How a plan of this precision and typing is made from the bundle's ONNX, for the plan key: the
    builder recipe, plus the fp16 conversion's recipe where a strongly typed fp16 build parses its copy."""
    recipe = f"build-{BUILD_RECIPE}"
    if strongly_typed and precision == "fp16":
        from engines.export.fp16 import recipe as fp16_recipe  # deferred: imports ONNX Runtime's converter

        recipe += f"+{fp16_recipe()}"
    return recipe


def _write_atomic(path: Path, data: Any) -> None:
    """Write bytes-like ``data`` so readers never see a partial file (another process may be loading it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(memoryview(data))
    os.replace(tmp, path)


def _progress_monitor(trt: Any) -> Any:
    """An IProgressMonitor showing each build phase as a tqdm bar, nested by phase depth."""
    from tqdm import tqdm

    class TqdmMonitor(trt.IProgressMonitor):
        """TensorRT calls this from several builder threads, hence the lock."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._bars: dict[str, Any] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                depth = len(self._bars)
                self._bars[phase_name] = tqdm(
                    total=num_steps, desc=phase_name, position=depth, leave=depth == 0, unit="step"
                )

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                bar = self._bars.get(phase_name)
                if bar is not None:
                    bar.update(step + 1 - bar.n)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                bar = self._bars.pop(phase_name, None)
                if bar is not None:
                    bar.close()

        def close(self) -> None:
            with self._lock:
                for bar in self._bars.values():
                    bar.close()
                self._bars.clear()

    return TqdmMonitor()


def _set_profile(trt: Any, builder: Any, network: Any, config: Any, profile: tuple[int, int, int]) -> None:
    """Give every input with a dynamic batch dim the (min, opt, max) batch profile."""
    lo, opt, hi = profile
    opt_profile = builder.create_optimization_profile()
    dynamic = False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(tensor.shape)
        if any(d < 0 for d in dims[1:]):
            raise EngineError(f"input '{tensor.name}' has dynamic dims {dims}; only the batch dim may vary")
        if dims[0] >= 0:
            if not lo == hi == dims[0]:
                raise EngineError(f"input '{tensor.name}' has fixed batch {dims[0]}, profile asks {profile}")
            continue
        frame = dims[1:]
        opt_profile.set_shape(tensor.name, (lo, *frame), (opt, *frame), (hi, *frame))
        dynamic = True
    if dynamic and config.add_optimization_profile(opt_profile) < 0:
        raise EngineError(f"TensorRT refused the batch profile {profile} for this network's inputs")


def _attach_timing_cache(config: Any, path: Path | None) -> Any:
    """Give the build the timing cache stored at ``path`` when this TensorRT and GPU accept it, else a fresh
    one (a cache from another device or version, or a damaged file, is refused, not fatal); returns it."""
    blob = path.read_bytes() if path is not None and path.is_file() else b""
    if blob:
        cache = config.create_timing_cache(blob)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
        log.warning("trt: timing cache %s does not fit this TensorRT and GPU; starting a fresh one", path)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise EngineError("TensorRT could not create an empty timing cache; its log above says why")
    return cache


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    *,
    precision: str,
    profile: tuple[int, int, int] = DEFAULT_PROFILE,
    timing_cache: Path | None = None,
    progress: bool = False,
    strongly_typed: bool | None = None,
) -> Path:
    """Build a TensorRT plan from ``onnx_path`` and write it atomically to ``plan_path``.

    ``strongly_typed`` None means: strongly typed on TensorRT >= 11 (its only mode), weakly
    typed with ``BuilderFlag.FP16`` on 10.x. A strongly typed fp16 build parses an fp16 copy
    of the model made by :func:`engines.export.fp16.convert_to_fp16`. An fp32 plan is true fp32
    (TF32 cleared), held to :data:`engines.tensorrt.PARITY`. ``timing_cache`` is read if it exists
    and fits, and rewritten after the build, so later builds skip kernel timing they already did.
    """
    if precision not in PLAN_PRECISIONS:
        raise EngineError(f"precision must be one of {', '.join(PLAN_PRECISIONS)}, got {precision!r}")
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise EngineError(f"ONNX model {onnx_path} not found")
    trt = import_tensorrt()
    major = trt_major(trt)
    typed = major >= 11 if strongly_typed is None else strongly_typed
    if major >= 11 and not typed:
        raise EngineError(f"TensorRT {trt.__version__} builds only strongly typed networks")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 11 is always strongly typed and deprecates the flag; 10.x needs it to opt in.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if typed and major < 11 else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    config = builder.create_builder_config()
    if precision == "fp16" and not typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "fp32":
        # TF32 is on by default: fp32 matmuls and convolutions would round their inputs to 10-bit mantissas.
        config.clear_flag(trt.BuilderFlag.TF32)

    plan_path.parent.mkdir(parents=True, exist_ok=True)
    monitor = _progress_monitor(trt) if progress else None
    # The fp16 copy must outlive the build: the parser may still read its weights.
    with tempfile.TemporaryDirectory(prefix=".onnx-", dir=plan_path.parent) as tmp:
        source = onnx_path
        if typed and precision == "fp16":
            from engines.export.fp16 import convert_to_fp16  # deferred: pulls in ONNX Runtime's converter

            source = convert_to_fp16(onnx_path, Path(tmp) / "model.fp16.onnx")
        if not parser.parse_from_file(str(source)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT could not parse {onnx_path}: {errors or 'no details reported'}")
        _set_profile(trt, builder, network, config, profile)

        cache = _attach_timing_cache(config, timing_cache)
        if monitor is not None:
            config.progress_monitor = monitor
        try:
            serialized = builder.build_serialized_network(network, config)
        finally:
            if monitor is not None:
                monitor.close()
    if serialized is None:
        raise EngineError(
            f"TensorRT could not build the {precision} plan from {onnx_path} for batch profile {profile}; "
            "its log above says why"
        )
    _write_atomic(plan_path, serialized)
    if timing_cache is not None:
        _write_atomic(timing_cache, cache.serialize())  # the builder added this build's timings to it
    return plan_path


def build_into_cache(bundle: Bundle, key: PlanKey, paths: CachePaths, *, progress: bool = False) -> float:
    """Build the plan ``key`` describes for ``bundle`` into ``paths``, with the key file beside it that
    tells a later load the plan is valid; returns the build time in seconds."""
    log.info(
        "trt: building %s plan for bundle %s, batch profile %s, on %s (sm_%d%d); this can take minutes",
        key.precision, bundle.name, key.profile, key.gpu_name, *key.compute_capability,
    )
    start = time.monotonic()
    build_plan(
        bundle.model_path,
        paths.plan,
        precision=key.precision,
        profile=key.profile,
        timing_cache=paths.timing_cache,
        progress=progress,
        strongly_typed=key.strongly_typed,
    )
    seconds = time.monotonic() - start
    meta = {
        "key": cache_key(key),
        "key_fields": key.fields(),
        "bundle": bundle.name,
        "bundle_version": bundle.version,
        "onnx": str(bundle.model_path),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build_seconds": round(seconds, 1),
    }
    _write_atomic(paths.meta, (json.dumps(meta, indent=2) + "\n").encode())
    return seconds
