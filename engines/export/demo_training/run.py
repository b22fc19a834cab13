"""A whole training run (train, export, check, validate, write the bundle and metrics.json), and the
re-validation of a written bundle without retraining it."""

from __future__ import annotations

import copy
import json
import shlex
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import open_clip
import torch

from engines.bundle import load_bundle, write_manifest
from engines.export.build_bundle import MAX_BATCH, ONNX_NAME, check_parity, manifest_input, manifest_outputs
from engines.export.demo import DemoConfig, DemoModel
from engines.export.fetalclip import FetalClipExport, export_onnx
from engines.export.quantize import QuantizationGateError, quantize_bundle_int8
from pipeline.phantom import OPTIMAL_DISTANCE_MM

from .data import (
    EPOCH_SHARES,
    HARD_ANGLE_MAX,
    HARD_DISTANCE_MM,
    PAIR_DISTANCE_MM,
    PAIR_MIN_GAP_MM,
    RESIZE,
    SIZE,
    FramePool,
    build_pool,
)
from .options import MIN_TRAIN_SEED, TrainOptions
from .train import (
    ANGLE_CLIP_DEG,
    ANGLE_UNIT_DEG,
    DISTANCE_CLIP_MM,
    DISTANCE_UNIT_MM,
    GAIN_RANGE,
    GAMMA_RANGE,
    IN_BAND_FALLOFF,
    train,
)
from .validate import DEFINITIONS, MIN_SCORE, validate

TOOL = "tools/train_demo.py"
LICENSE_NOTE = (
    "Apache-2.0 (code, manifest and weights, trained here on synthetic phantom sweeps). A demonstration "
    "model for the pipeline, trained on a phantom: not a medical device, not for clinical use."
)
OPTION_NAMES = ("seed", "cases", "frames_per_sweep", "per_case", "val_seed", "val_cases",
                "val_frames_per_sweep", "epochs", "samples_per_epoch", "batch", "pairs_per_batch", "lr",
                "weight_decay", "threads")


def command_line(opts: TrainOptions, defaults: TrainOptions) -> str:
    """The exact command that rebuilds this bundle: the tool, --out, and every option not at its default."""
    parts = ["python", TOOL, "--out", str(opts.out)]
    for name in OPTION_NAMES:
        value = getattr(opts, name)
        if value != getattr(defaults, name):
            parts += [f"--{name.replace('_', '-')}", str(value)]
    return shlex.join(parts)


def export_checked(model: DemoModel, out: Path) -> tuple[FetalClipExport, Path, dict[str, float]]:
    """Export the runtime graph to ``out``/model.onnx and check it against torch (the FetalCLIP bundle
    builder's parity check); any old bundle.json goes first, so a half-rebuilt bundle never loads."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bundle.json").unlink(missing_ok=True)
    wrapper = model.export_module()
    onnx_path = export_onnx(wrapper, out / ONNX_NAME, max_batch=MAX_BATCH)
    return wrapper, onnx_path, check_parity(wrapper, onnx_path, 3)


def manifest_for(wrapper: FetalClipExport, config: DemoConfig, training: dict) -> dict:
    """bundle.json for the demo model: FetalCLIP bundle layout, area resize, best frame by ``quality``."""
    descriptions = {
        "embedding": "L2-normalised image embedding of the demo ViT",
        "planes": "plane class probabilities: softmax of 100 x cosine to learned, L2-normalised prototypes",
        "quality": "probability that the frame is an optimal abdominal (AC) plane, in [0, 1]",
        "mask": "abdomen segmentation at input resolution, 1 inside, 0 outside",
    }
    return {
        "format": "sweepstream-bundle",
        "format_version": 1,
        "name": "demo",
        "version": "1.0.0",
        "description": (
            f"Demo model of the FetalCLIP family trained on phantom blind sweeps: open_clip ViT (width "
            f"{config.width}, {config.layers} layers, patch {config.patch_size}) with a conv stem, a quality "
            "head, a mask decoder and learned plane prototypes. Not a medical model; not for clinical use."
        ),
        "license": LICENSE_NOTE,
        "source": {"built_by": TOOL, "checkpoint_sha256": None, "config": config.as_dict()},
        "model": {"onnx": ONNX_NAME, "sha256": "", "precision": "fp32"},
        "input": manifest_input(wrapper, RESIZE),
        "batch": {"min": 1, "max": MAX_BATCH},
        "outputs": manifest_outputs(wrapper, list(config.classes), descriptions),
        "best_frame": {"output": "quality", "min_score": MIN_SCORE},
        "pixel_spacing": {"source": "input"},
        "training": training,
    }


def metrics_record(validation: dict, frames_per_sweep: int) -> dict:
    """The manifest's ``training.metrics``: held-out figures (not the per-sweep rows) and what they mean."""
    return {
        "validation": {k: v for k, v in validation.items() if k != "sweeps"},
        "validation_frames_per_sweep": frames_per_sweep,
        "definitions": DEFINITIONS,
    }


def training_record(opts: TrainOptions, command: str, pool: FramePool, history: list[dict],
                    validation: dict, seconds: float) -> dict:
    """The manifest's ``training`` section: command, seeds, data, schedule, held-out metrics, software."""
    last_train, first_val = opts.seed + opts.cases - 1, opts.val_seed
    return {
        "command": command,
        "seeds": {
            "torch": opts.seed,
            "numpy": opts.seed,
            "phantom_train": [opts.seed, last_train],
            "phantom_validation": [first_val, first_val + opts.val_cases - 1],
            "note": f"one phantom case per seed (make_cases(seed, 1)); seeds below {MIN_TRAIN_SEED} are "
            "never trained on and are left for evaluation",
        },
        "data": {
            "frames": len(pool.labels),
            "per_stratum": pool.counts(),
            "frames_per_sweep": opts.frames_per_sweep,
            "per_case": opts.per_case,
            "preprocess": f"pipeline.letterbox.Letterbox({SIZE}, 1, interpolation='{RESIZE}')",
            "augmentation": f"left-right flip; per frame gain U{GAIN_RANGE} and gamma U{GAMMA_RANGE}",
            "quality_target": f"0 outside the optimal band; inside, 1 - {IN_BAND_FALLOFF} * (distance / "
            f"{OPTIMAL_DISTANCE_MM} mm)^2",
            "sampling": f"fresh stratified draw per epoch, shares {EPOCH_SHARES}; hard = not optimal, within "
            f"{HARD_DISTANCE_MM} mm and {HARD_ANGLE_MAX} deg of the standard plane; lookalike = "
            f"background within {HARD_ANGLE_MAX} deg of transverse (head, thorax, pelvis); each batch "
            f"starts with {opts.pairs_per_batch} ranking pairs: two frames of one sweep within "
            f"{PAIR_DISTANCE_MM} mm of the standard plane, at least {PAIR_MIN_GAP_MM} mm apart in distance",
            "auxiliary": f"training-only geometry head (not exported): smooth L1 on min(distance, "
            f"{DISTANCE_CLIP_MM} mm) / {DISTANCE_UNIT_MM} and min(angle, {ANGLE_CLIP_DEG} deg) / "
            f"{ANGLE_UNIT_DEG}",
        },
        "schedule": {
            "epochs": opts.epochs,
            "samples_per_epoch": opts.samples_per_epoch,
            "batch": opts.batch,
            "ranking_pairs_per_batch": opts.pairs_per_batch,
            "optimizer": "AdamW",
            "lr": opts.lr,
            "weight_decay": opts.weight_decay,
            "lr_schedule": "linear warm-up, cosine to 0",
            "threads": opts.threads,
            "losses_per_epoch": history,
        },
        "metrics": metrics_record(validation, opts.val_frames_per_sweep),
        "software": {
            "torch": torch.__version__, "open_clip": open_clip.__version__, "onnxruntime": ort.__version__
        },
        "wall_seconds": round(seconds, 1),
    }


def add_int8(out: Path) -> dict:
    """Quantizes the bundle through the same gate as `sweepstream-quantize-bundle`: a cart runs the int8 model
    on CPU by default (about 15 % less inference time for the demo model, which shortens the tail latency on a
    2-core machine). A model the gate refuses is left fp32 only; that is not a failed run."""
    try:
        return quantize_bundle_int8(out)
    except QuantizationGateError as exc:
        print(f"train_demo: int8 model not kept: {exc}", file=sys.stderr)
        return exc.gate


def run(opts: TrainOptions, command: str) -> dict:
    """Train, export, validate, write the bundle and ``metrics.json``; returns the metrics."""
    opts.check()
    started = time.perf_counter()
    torch.manual_seed(opts.seed)
    np.random.seed(opts.seed)
    torch.set_num_threads(opts.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    cv2.setNumThreads(1)
    pool = build_pool(opts.train_seeds, opts.frames_per_sweep, opts.per_case, opts.seed)
    print(f"training pool: {len(pool.labels)} frames {pool.counts()}", flush=True)
    data_seconds = time.perf_counter() - started
    model = DemoModel(opts.config)
    history = train(model, pool, opts)
    train_seconds = time.perf_counter() - started - data_seconds

    wrapper, onnx_path, parity = export_checked(model, opts.out)
    validation = validate(onnx_path, opts.val_seeds, opts.threads, opts.val_frames_per_sweep)
    record = training_record(opts, command, pool, history, validation, time.perf_counter() - started)
    bundle = write_manifest(opts.out, manifest_for(wrapper, opts.config, record))
    int8 = add_int8(opts.out)
    metrics = {
        "bundle": str(bundle.path),
        "sha256": bundle.sha256,
        "command": command,
        "validation": validation,
        "definitions": DEFINITIONS,
        "parity": parity,
        "int8": {"kept": int8["passed"], "results": int8["results"]},
        "seconds": {
            "data": round(data_seconds, 1),
            "train": round(train_seconds, 1),
            "total": round(time.perf_counter() - started, 1),
        },
    }
    (opts.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def revalidate(out: Path, command: str) -> dict:
    """Re-runs the validation of the bundle in ``out`` on the validation seeds, frames per sweep and threads
    its manifest records, and rewrites the recorded metrics (bundle.json ``training.metrics``, metrics.json
    ``validation``) with the current definitions; the model files are not touched, so their sha256 stay.
    Returns the new validation."""
    started = time.perf_counter()
    bundle = load_bundle(out)
    training = bundle.manifest["training"]
    first, last = training["seeds"]["phantom_validation"]
    frames_per_sweep = training["metrics"]["validation_frames_per_sweep"]
    threads = training["schedule"]["threads"]
    cv2.setNumThreads(1)
    validation = validate(bundle.model_path, range(first, last + 1), threads, frames_per_sweep)
    manifest = copy.deepcopy(bundle.manifest)
    record = metrics_record(validation, frames_per_sweep)
    manifest["training"]["metrics"] = {**record, "revalidated_by": command}
    write_manifest(out, manifest)
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    metrics.update(validation=validation, definitions=DEFINITIONS,
                   revalidation={"command": command, "seconds": round(time.perf_counter() - started, 1)})
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return validation
