"""INT8 copies of a bundle's ONNX model, kept only if they pass an accuracy gate against the fp32 model.

Method: ONNX Runtime's dynamic quantization. Weights of MatMul/Gemm layers with constant
weights become int8, one scale per output channel (``per_channel``; a ViT's channels
differ in range by orders of magnitude, so one scale per matrix would crush the small
ones); activations are quantized to uint8 per batch at run time, so no calibration data
is needed. This covers the linear layers of every transformer block, about 96% of a
ViT-L/14's FLOPs. Left in float on purpose:

- attention's activation-by-activation products (``MatMulConstBOnly``): no weights to
  store, and their ranges change per frame;
- the layers nearest each output (the image projection, the class-embedding product that
  the planes softmax multiplies by 100, the quality and mask heads' layers): a negligible
  share of the work, and their errors would reach the outputs undamped;
- everything else, including the uint8 input, its cast and the in-graph normalisation,
  the patch-embedding Conv and LayerNorms.

The int8 file is written beside model.onnx and recorded in bundle.json (``model.int8``)
only if, on sample frames, every frame's embedding has cosine >= ``min_cosine`` with the
fp32 model's and every frame keeps its top-1 plane; the gate's numbers are stored with it.
On x86-64 CPUs without VNNI, ONNX Runtime's uint8 x int8 kernels saturate pairs of products
at int16 unless a session asks for its precise mode; the gate's sessions and the engine's
share :func:`engines.onnxruntime.session_options`, which does, so the gate's numbers hold on
every CPU (on this tiny-model test they fell from cosine 0.99997 to 0.990 without it). The
gate records the onnxruntime version.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic
from tqdm import tqdm

from engines.bundle import Bundle, BundleError, file_sha256, load_bundle, write_manifest
from engines.onnxruntime import run_session, session_options

INT8_NAME = "model.int8.onnx"
METHOD = "dynamic per-channel QInt8"
OP_TYPES = ("MatMul", "Gemm")
QUANTIZED_OPS = ("MatMulInteger", "DynamicQuantizeMatMul")
DEFAULT_MIN_COSINE = 0.999
MIN_TOP1_AGREEMENT = 1.0
GATE_FRAMES = 16
GATE_SEED = 0
GATE_BATCH = 8
_PREPROCESS_ADVICE = "Please consider to run pre-processing"


class QuantizationGateError(ValueError):
    """The int8 model misses the gate's thresholds against the fp32 model; ``gate`` holds the numbers."""

    def __init__(self, message: str, gate: dict[str, Any]) -> None:
        super().__init__(message)
        self.gate = gate


# --------------------------------------------------------------------------- sample frames


def _box3(image: np.ndarray) -> np.ndarray:
    """3x3 mean filter (edges repeated): turns per-pixel noise into speckle grains a few pixels wide."""
    padded = np.pad(image, 1, mode="edge")
    rows = padded[:-2] + padded[1:-1] + padded[2:]
    return (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / 9.0


def _ellipse_radius(
    x: np.ndarray, y: np.ndarray, centre: tuple[float, float], axes: tuple[float, float], angle: float
) -> np.ndarray:
    """Normalised radius: < 1 inside the ellipse, 1 on its outline."""
    dx, dy = x - centre[0], y - centre[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    return np.sqrt((u / axes[0]) ** 2 + (v / axes[1]) ** 2)


def sample_frames(count: int = GATE_FRAMES, size: int = 224, seed: int = GATE_SEED) -> np.ndarray:
    """``count`` deterministic ultrasound-like uint8 frames [count, size, size]: the gate's default inputs.

    No real scans ship with the project, so these imitate what makes scans unlike random
    noise: black outside a fan-shaped field of view; speckle (Rayleigh-distributed
    multiplicative noise, smoothed to grains a few pixels wide) over tissue that darkens
    with depth; one large structure per frame with a bright rim (a skull or abdominal
    outline) around a darker interior; and one to three black, fluid-like regions. The
    structure's size steps through eight values from 8% to 48% of the frame, so small and
    large anatomy both appear. Drawn from numpy's seeded PCG64 generator; the gate also
    records the frames' sha256.
    """
    rng = np.random.default_rng(seed)
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
    frames = np.empty((count, size, size), dtype=np.uint8)
    for i in range(count):
        apex = rng.uniform(-0.15, 0.0)
        depth = np.hypot(x - 0.5, y - apex)
        fan = (np.abs(np.arctan2(x - 0.5, y - apex)) < rng.uniform(0.45, 0.75)) & (
            depth < rng.uniform(0.85, 1.05)
        )
        echo = rng.uniform(0.3, 0.5) * np.exp(-rng.uniform(0.5, 1.5) * depth)

        scale = 0.08 + 0.4 * (i % 8) / 7
        axes = (scale, scale * rng.uniform(0.6, 1.0))
        centre = (rng.uniform(0.35, 0.65), rng.uniform(0.4, 0.7))
        radius = _ellipse_radius(x, y, centre, axes, rng.uniform(0, np.pi))
        echo = np.where(radius < 1, echo * rng.uniform(0.15, 0.7), echo)
        echo = np.where(np.abs(radius - 1) < rng.uniform(0.008, 0.02) / scale, rng.uniform(0.75, 1.0), echo)
        for _ in range(rng.integers(1, 4)):
            fluid_axes = (rng.uniform(0.03, 0.15), rng.uniform(0.03, 0.15))
            fluid_centre = (rng.uniform(0.2, 0.8), rng.uniform(0.3, 0.9))
            fluid = _ellipse_radius(x, y, fluid_centre, fluid_axes, rng.uniform(0, np.pi)) < 1
            echo = np.where(fluid, 0.03, echo)

        speckle = _box3(rng.rayleigh(size=(size, size))) / np.sqrt(np.pi / 2)  # mean 1
        image = echo * speckle * fan * rng.uniform(200, 320)
        frames[i] = np.clip(image, 0, 255).astype(np.uint8)
    return frames


def _gate_frames(bundle: Bundle, frames: np.ndarray | None) -> tuple[np.ndarray, dict[str, Any]]:
    """The gate's inputs in the bundle's frame shape, and how to identify them in the manifest."""
    shape = bundle.input.frame_shape
    if frames is None:
        grey = sample_frames(GATE_FRAMES, bundle.input.size, GATE_SEED)
        frames = grey if bundle.input.channels == 1 else np.repeat(grey[..., None], 3, axis=-1)
        arguments = f"count={GATE_FRAMES}, size={bundle.input.size}, seed={GATE_SEED}"
        source = f"engines.export.quantize.sample_frames({arguments})"
    else:
        if (
            frames.dtype != np.uint8
            or frames.shape[1:] != shape
            or frames.ndim != 1 + len(shape)
            or not len(frames)
        ):
            raise ValueError(
                f"gate frames must be uint8 [N >= 1, {', '.join(map(str, shape))}], "
                f"got {frames.dtype} {list(frames.shape)}"
            )
        source = "supplied by the caller"
    frames = np.ascontiguousarray(frames)
    info = {"count": len(frames), "source": source, "sha256": hashlib.sha256(frames.tobytes()).hexdigest()}
    return frames, info


# --------------------------------------------------------------------------- quantization


def output_layers(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul/Gemm nodes nearest each graph output, found by walking back through other ops.

    The walk does not enter a Shape node's input: shape arithmetic (reshapes, resizes)
    does not carry values, and following it would reach deep into the encoder.
    """
    producer = {tensor: node for node in model.graph.node for tensor in node.output}
    found: set[str] = set()
    visited: set[str] = set()
    pending = [output.name for output in model.graph.output]
    while pending:
        node = producer.get(pending.pop())
        if node is None or node.name in visited:
            continue
        visited.add(node.name)
        if node.op_type in OP_TYPES:
            found.add(node.name)
        elif node.op_type != "Shape":
            pending.extend(node.input)
    return sorted(found)


class _DropPreprocessAdvice(logging.Filter):
    """Drops quantize_dynamic's generic advice to pre-process the model first: our exports already have
    single-node LayerNorms and known shapes, and quantize_model counts the layers actually quantized."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_PREPROCESS_ADVICE)


@contextmanager
def _without_preprocess_advice() -> Iterator[None]:
    root = logging.getLogger()
    advice = _DropPreprocessAdvice()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def quantize_model(src: Path, dst: Path) -> dict[str, Any]:
    """Write the int8 model of ``src`` to ``dst``; return what was quantized (the gate's ``quantization``)."""
    model = onnx.load(str(src))
    for index, node in enumerate(model.graph.node):
        if not node.name:  # quantize_dynamic matches exclusions by name, so every node needs one
            node.name = f"{node.op_type}_{index}"
    keep = output_layers(model)
    with _without_preprocess_advice():
        quantize_dynamic(
            model,
            dst,
            op_types_to_quantize=list(OP_TYPES),
            per_channel=True,
            reduce_range=False,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=keep,
            extra_options={"MatMulConstBOnly": True},
        )
    del model
    quantized = sum(node.op_type in QUANTIZED_OPS for node in onnx.load(str(dst)).graph.node)
    return {
        "op_types": list(OP_TYPES),
        "per_channel": True,
        "weight_type": "QInt8",
        "quantized_nodes": quantized,
        "fp32_nodes": keep,
    }


# --------------------------------------------------------------------------- gate


def _run_model(bundle: Bundle, path: Path, frames: np.ndarray, progress: tqdm, *, per_frame: bool,
               size: int = GATE_BATCH) -> dict[str, np.ndarray]:
    """All bundle outputs for ``frames`` from a CPU session of ``path``, in batches of ``size`` (within what
    the bundle accepts), run as the engine runs them (``per_frame``: see engines.onnxruntime.run_session)."""
    cpu = ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), sess_options=session_options(0), providers=cpu)
    names = list(bundle.outputs)
    size = max(bundle.min_batch, min(size, bundle.max_batch))
    parts: list[list[np.ndarray]] = []
    for start in range(0, len(frames), size):
        chunk = frames[start : start + size]
        short = bundle.min_batch - len(chunk)
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], short, axis=0)]) if short > 0 else chunk
        outputs = run_session(session, names, bundle.input.name, padded, per_frame)
        parts.append([value[: len(chunk)] for value in outputs])
        progress.update(len(chunk))
    return {name: np.concatenate([part[i] for part in parts]) for i, name in enumerate(names)}


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of `a` with the same row of `b` (in float64), e.g. two engines'
    embeddings of the same batch: the yardstick this gate, the export parity check and the engine
    benchmark all use."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def compare_outputs(
    bundle: Bundle, fp32: dict[str, np.ndarray], int8: dict[str, np.ndarray]
) -> dict[str, float]:
    """Gate numbers, worst case over outputs of a kind: embedding cosine (min, mean), planes top-1
    agreement and max |diff|, and, where those heads exist, quality max |diff| and mask pixel agreement."""
    cosines, top1, planes_diff, quality_diff, mask_agree = [], [], [], [], []
    for name, spec in bundle.outputs.items():
        got, want = int8[name], fp32[name]
        if spec.kind == "embedding":
            cosines.append(row_cosines(want, got))
        elif spec.kind == "planes":
            top1.append(float(np.mean(got.argmax(axis=1) == want.argmax(axis=1))))
            planes_diff.append(float(np.abs(got.astype(np.float64) - want).max()))
        elif spec.kind == "quality":
            quality_diff.append(float(np.abs(got.astype(np.float64) - want).max()))
        elif spec.kind == "mask":
            mask_agree.append(float(np.mean(got == want)))
    every = np.concatenate(cosines)
    results = {
        "embedding_cosine_min": float(every.min()),
        "embedding_cosine_mean": float(min(c.mean() for c in cosines)),
        "planes_top1_agreement": min(top1),
        "planes_max_abs_diff": max(planes_diff),
    }
    if quality_diff:
        results["quality_max_abs_diff"] = max(quality_diff)
    if mask_agree:
        results["mask_agreement"] = min(mask_agree)
    return results


def run_gate(bundle: Bundle, int8_path: Path, frames: np.ndarray) -> dict[str, float]:
    """Run ``frames`` through the bundle's fp32 model and ``int8_path`` on CPU and compare the outputs; and
    the int8 model once more one frame per batch, which must give exactly the same outputs: a frame's
    score may not depend on its batch-mates (`int8_batch_max_abs_diff`, required 0)."""
    with tqdm(total=3 * len(frames), desc="int8 gate", unit="frame") as progress:
        progress.set_postfix_str("fp32")
        fp32 = _run_model(bundle, bundle.model_path, frames, progress, per_frame=False)
        progress.set_postfix_str("int8")
        int8 = _run_model(bundle, int8_path, frames, progress, per_frame=True)
        progress.set_postfix_str("int8, alone")
        alone = _run_model(bundle, int8_path, frames, progress, per_frame=True, size=1)
    results = compare_outputs(bundle, fp32, int8)
    results["int8_batch_max_abs_diff"] = max(
        float(np.abs(int8[name].astype(np.float64) - alone[name]).max()) for name in bundle.outputs)
    return results


def gate_table(gate: dict[str, Any]) -> str:
    """The gate as a small table, for tools and logs."""
    results, threshold, quant = gate["results"], gate["threshold"], gate["quantization"]
    frames = gate["frames"]
    rows = [
        ("embedding cosine min", results["embedding_cosine_min"], threshold["embedding_cosine_min"]),
        ("embedding cosine mean", results["embedding_cosine_mean"], None),
        ("planes top-1 agreement", results["planes_top1_agreement"], threshold["planes_top1_agreement"]),
        ("planes max |diff|", results["planes_max_abs_diff"], None),
    ]
    if "quality_max_abs_diff" in results:
        rows.append(("quality max |diff|", results["quality_max_abs_diff"], None))
    if "mask_agreement" in results:
        rows.append(("mask agreement", results["mask_agreement"], None))
    if "int8_batch_max_abs_diff" in results:  # gates recorded before batch invariance was checked lack it
        rows.append(("batch vs alone max |diff|", results["int8_batch_max_abs_diff"], None))
    lines = [
        f"int8 gate ({gate['method']}, onnxruntime {gate['onnxruntime']}) on {frames['count']} frames "
        f"({frames['source']}): {'PASSED' if gate['passed'] else 'FAILED'}",
        f"  {'check':<24}{'int8 vs fp32':>14}{'needs':>12}  ok",
    ]
    for label, value, bound in rows:
        needs, ok = ("", "") if bound is None else (f">= {bound:g}", "yes" if value >= bound else "NO")
        lines.append(f"  {label:<24}{value:>14.6f}{needs:>12}  {ok}")
    kept = ", ".join(quant["fp32_nodes"]) or "none"
    ops = "/".join(quant["op_types"])
    lines.append(f"  quantized {quant['quantized_nodes']} {ops} layers; kept fp32: {kept}")
    return "\n".join(lines)


def quantize_bundle_int8(
    bundle_dir: str | os.PathLike[str],
    *,
    frames: np.ndarray | None = None,
    min_cosine: float = DEFAULT_MIN_COSINE,
) -> dict[str, Any]:
    """Quantize a bundle's model.onnx to ``model.int8.onnx`` and record it in bundle.json if the gate passes.

    ``frames`` (uint8, the bundle's frame shape) replace the default :func:`sample_frames`.
    Returns the gate as stored under ``model.int8.gate``. On failure raises
    :class:`QuantizationGateError` and leaves the bundle as it was: the new int8 file is
    deleted and bundle.json is untouched (an int8 model an earlier gate passed stays in place).
    """
    if not 0.0 < min_cosine <= 1.0:
        raise ValueError(f"min_cosine must be in (0, 1], got {min_cosine}")
    bundle = load_bundle(bundle_dir)
    kinds = {spec.kind for spec in bundle.outputs.values()}
    if not {"embedding", "planes"} <= kinds:
        raise BundleError.at(bundle.path, "the int8 gate needs an embedding and a planes output to compare")
    frames, frames_info = _gate_frames(bundle, frames)
    target = bundle.path / INT8_NAME
    scratch = bundle.path / f".{INT8_NAME}.tmp"
    try:
        with tqdm(total=1, desc="quantize int8", unit="model") as progress:
            quantization = quantize_model(bundle.model_path, scratch)
            progress.update()
        if quantization["quantized_nodes"] == 0:
            problem = f"{bundle.model_path.name} has no MatMul/Gemm layer with constant weights to quantize"
            raise BundleError.at(bundle.path, problem)
        results = run_gate(bundle, scratch, frames)
        passed = (
            results["embedding_cosine_min"] >= min_cosine
            and results["planes_top1_agreement"] >= MIN_TOP1_AGREEMENT
            and results["int8_batch_max_abs_diff"] == 0.0
        )
        gate = {
            "passed": passed,
            "method": METHOD,
            "onnxruntime": ort.__version__,
            "fp32_sha256": bundle.sha256,
            "frames": frames_info,
            "quantization": quantization,
            "threshold": {"embedding_cosine_min": min_cosine, "planes_top1_agreement": MIN_TOP1_AGREEMENT,
                          "int8_batch_max_abs_diff": 0.0},
            "results": results,
        }
        if not passed:
            if bundle.int8_path is None:
                target.unlink(missing_ok=True)  # a stray file no gate vouches for
            raise QuantizationGateError(
                f"bundle {bundle.path}: int8 gate failed on {frames_info['count']} frames: "
                f"embedding cosine min {results['embedding_cosine_min']:.6f} "
                f"(mean {results['embedding_cosine_mean']:.6f}, needs >= {min_cosine:g}), "
                f"planes top-1 agreement {results['planes_top1_agreement']:.4f} "
                f"(needs {MIN_TOP1_AGREEMENT:g}), batch invariance max |diff| "
                f"{results['int8_batch_max_abs_diff']:g} (needs 0); {INT8_NAME} not kept",
                gate,
            )
        os.replace(scratch, target)
    finally:
        scratch.unlink(missing_ok=True)

    manifest = copy.deepcopy(bundle.manifest)
    manifest["model"]["int8"] = {"onnx": INT8_NAME, "sha256": file_sha256(target), "gate": gate}
    write_manifest(bundle.path, manifest)
    return gate
