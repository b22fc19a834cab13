"""The per-frame steps after preparation (`letterbox.Letterbox`): the engine, a batch through it, the frame's
best-frame score, and the scored frame as sweep analysis takes it. The stages, the benchmarks' in-process
baseline and the evaluation all call these, so a figure measured one way means the same in the others."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from engines.base import Engine, EngineOptions
from engines.registry import select_engine

from .analysis import AnalyzedFrame
from .messages import Result
from .sweep import FrameInfo


def default_threads() -> int:
    """One core fewer than the process may use: capture, preprocess and postprocess need one between them,
    and an engine that spreads over every core stalls behind them (measured on 2 cores with the demo:
    end-to-end p99 32.0 ms with 2 ORT threads, 27.6 ms with 1)."""
    return max(1, _cores() - 1)


def _cores() -> int:
    return len(os.sched_getaffinity(0))


# A model slower than this many frame periods of a live source (30 fps) scores 1 frame in several: the
# other stages then have little to do, and the engine gets every core (ViT-L/14 int8 on 2 cores: 239 ms a
# frame with 1 thread, 132 ms with 2).
SLOW_MODEL_PERIODS = 2
NOMINAL_PERIOD_S = 1 / 30


def load_engine(infer: Any, bundle: Any, max_batch: int | str | None = None) -> tuple[Engine, str]:
    """The engine the run's `[infer]` section asks for, loaded, and a line saying what was chosen and why.
    With `infer.threads = 0` a CPU engine gets one core fewer than there are, unless one frame costs it
    more than SLOW_MODEL_PERIODS frame periods (measured here): then it gets them all."""
    engine, reason = _open(infer, bundle, max_batch, infer.threads or default_threads())
    engine.load()
    threads = engine.options.threads
    if infer.threads == 0 and engine.on_cpu() and _cores() > threads:
        cost = frame_cost_s(engine, bundle)
        if cost > SLOW_MODEL_PERIODS * NOMINAL_PERIOD_S:
            engine.close()
            engine, reason = _open(infer, bundle, max_batch, _cores())
            engine.load()
            reason += (f"; {cost * 1e3:.0f} ms a frame on {threads} thread(s) is over {SLOW_MODEL_PERIODS} "
                       f"frame periods, so it gets all {_cores()} cores")
    return engine, f"{reason}; batch up to {engine.max_batch}, {engine.options.threads} thread(s)"


def preflight_engine(infer: Any, bundle: Any) -> None:
    """Build the engine the run asks for (not `auto`, which would import every backend) and run its checks
    that need no model load, so a wrong option or a remote model that does not fit the bundle is one error
    before any stage starts (EngineError)."""
    if infer.engine == "auto":
        return
    engine, _ = _open(infer, bundle, None, infer.threads or default_threads())
    try:
        engine.preflight()
    finally:
        engine.close()


def _open(infer: Any, bundle: Any, max_batch: int | str | None, threads: int) -> tuple[Engine, str]:
    options = EngineOptions(threads=threads, device=infer.device, max_batch=max_batch or infer.max_batch,
                            precision=infer.precision)
    return select_engine(infer.engine, bundle, options, infer.backends)


def frame_cost_s(engine: Engine, bundle: Any, repeats: int = 3) -> float:
    """Median seconds of one frame through a loaded engine (after its warm-up)."""
    frame = np.zeros((bundle.min_batch, *bundle.input.frame_shape), np.uint8)
    costs = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.infer(frame)
        costs.append(time.perf_counter() - started)
    return float(np.median(costs)) / bundle.min_batch


def infer_batch(engine: Any, bundle: Any, inputs: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Prepared inputs as one batch through `engine`, one output map per input. A bundle built for a fixed
    batch gets copies of the last input as padding; only the real rows come back."""
    batch = np.stack(inputs)
    short = bundle.min_batch - len(inputs)
    if short > 0:
        batch = np.concatenate([batch, np.repeat(batch[-1:], short, axis=0)])
    outputs = engine.infer(batch)
    return [{name: outputs[name][i] for name in bundle.outputs} for i in range(len(inputs))]


def output_problem(bundle: Any, outputs: dict[str, np.ndarray]) -> str | None:
    """What is wrong with one frame's outputs against the bundle's manifest (names, shapes, dtypes, finite
    values), or None: a result from another process is checked before anything reads it."""
    if list(outputs) != list(bundle.outputs):
        return f"outputs {list(outputs)}, expected {list(bundle.outputs)}"
    for name, spec in bundle.outputs.items():
        value = outputs[name]
        if value.shape != tuple(spec.shape) or value.dtype != np.dtype(spec.dtype):
            return (f"output {name!r} is {value.dtype}{list(value.shape)}, expected "
                    f"{spec.dtype}{list(spec.shape)}")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return f"output {name!r} holds NaN or infinity"
    return None


def frame_score(bundle: Any, outputs: dict[str, np.ndarray]) -> float:
    """The output the bundle says drives best-frame selection, as one number."""
    return float(bundle.best_frame.score({k: v[None] for k, v in outputs.items()})[0])


def analyzed_frame(result: Result, score: float, mask_output: str | None,
                   spacing_fallback: tuple[float, float] | None) -> AnalyzedFrame:
    """A scored frame as sweep analysis takes it. Time is the source's own when it has one (a flooded
    recording keeps its real pacing for the gap rules), else the capture time; pixel spacing is the
    source's, else the configured fallback, else none (biometry in pixels, flagged uncalibrated)."""
    frame = result.frame
    pts = frame.source.get("pts")
    t = pts if isinstance(pts, (int, float)) else frame.stamps["cap"] / 1e9
    spacing = frame.source.get("pixel_spacing_mm") or spacing_fallback
    return AnalyzedFrame(
        info=FrameInfo(frame.id, t, score, result.content, frame.source),
        t_capture_ns=frame.stamps["cap"],
        mask=None if mask_output is None else result.outputs[mask_output],
        geometry=result.geometry, frame_shape=frame.shape,
        spacing_mm=None if spacing is None else (float(spacing[0]), float(spacing[1])))
