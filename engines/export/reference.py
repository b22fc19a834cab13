"""Small, real ONNX bundles for pipeline tests and benchmarks, built without torch.

The reference model computes simple intensity statistics, so every output can be
checked exactly against numpy, yet it runs through the same bundle loading, session
and batching code paths as FetalCLIP. It is not a medical model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engines.bundle import write_manifest

OPSET = 17
IR_VERSION = 9  # ONNX Runtime 1.17 (the oldest we support) reads IR <= 9
PLANE_CLASSES = ("abdomen", "brain", "other")
WORK_DIM = 256
WORK_SEED = 20240611
WORK_LEAK = 1e-30  # weight of the work chain in "quality": far below float32 resolution of any quality value

# Fixed plane logits = W_MEAN * mean + W_SQUARE * mean_of_squares + BIAS (both statistics in [0, 1]).
_W_MEAN = np.array([4.0, -2.0, 0.0], dtype=np.float32)
_W_SQUARE = np.array([-1.0, 3.0, 0.0], dtype=np.float32)
_BIAS = np.array([0.0, 0.0, 0.5], dtype=np.float32)


def _work_weight() -> np.ndarray:
    """Seeded column-stochastic matrix: rows of non-negative inputs stay bounded through any chain length."""
    weight = np.random.default_rng(WORK_SEED).random((WORK_DIM, WORK_DIM), dtype=np.float32)
    return (weight / weight.sum(axis=0, keepdims=True)).astype(np.float32)


def build_reference_model(size: int = 224, channels: int = 1, work: int = 0) -> onnx.ModelProto:
    """Build the reference graph; see :func:`make_reference_bundle` for what it computes."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size < 1 or work < 0:
        raise ValueError(f"size must be >= 1 and work >= 0, got size={size} work={work}")

    scale = 255.0 * channels  # largest brightness: channels are summed, not averaged, to stay exact
    inits = [
        numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale"),
        numpy_helper.from_array(np.array(scale * scale, dtype=np.float32), "scale_sq"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(_W_MEAN, "w_mean"),
        numpy_helper.from_array(_W_SQUARE, "w_square"),
        numpy_helper.from_array(_BIAS, "bias"),
    ]
    nodes = [helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT)]
    if channels == 1:
        brightness = "pixels"
    else:
        inits.append(numpy_helper.from_array(np.array([3], dtype=np.int64), "channel_axis"))
        nodes.append(helper.make_node("ReduceSum", ["pixels", "channel_axis"], ["brightness"], keepdims=0))
        brightness = "brightness"

    quality_base = "quality" if work == 0 else "quality_base"
    nodes += [
        helper.make_node("ReduceMean", [brightness], ["mean_keep"], axes=[1, 2], keepdims=1),
        helper.make_node("Greater", [brightness, "mean_keep"], ["mask_bool"]),
        # Through FLOAT: TensorRT converts UINT8 only from or to FLOAT/FLOAT16, never from BOOL.
        helper.make_node("Cast", ["mask_bool"], ["mask_float"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["mask_float"], ["mask"], to=TensorProto.UINT8),
        helper.make_node("ReduceMean", [brightness], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("Div", ["mean", "scale"], [quality_base]),
        helper.make_node("Mul", [brightness, brightness], ["squares"]),
        helper.make_node("ReduceMean", ["squares"], ["mean_sq_raw"], axes=[1, 2], keepdims=0),
        helper.make_node("Div", ["mean_sq_raw", "scale_sq"], ["mean_sq"]),
        helper.make_node("Unsqueeze", [quality_base, "axis1"], ["mean_col"]),
        helper.make_node("Unsqueeze", ["mean_sq", "axis1"], ["mean_sq_col"]),
        helper.make_node("Mul", ["mean_col", "w_mean"], ["logit_mean"]),
        helper.make_node("Mul", ["mean_sq_col", "w_square"], ["logit_square"]),
        helper.make_node("Add", ["logit_mean", "logit_square"], ["logit_sum"]),
        helper.make_node("Add", ["logit_sum", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["planes"], axis=1),
    ]

    if work > 0:
        # A [N, 256, 256] tensor from the runtime mean, pushed through `work` MatMul+Relu layers.
        # Its reduction enters quality scaled by WORK_LEAK: the optimizer must keep the chain
        # (it depends on the image) but the sum rounds back to quality_base exactly.
        inits += [
            numpy_helper.from_array(np.array([1, WORK_DIM, WORK_DIM], dtype=np.int64), "work_shape"),
            numpy_helper.from_array(_work_weight(), "work_weight"),
            numpy_helper.from_array(np.array(WORK_LEAK, dtype=np.float32), "work_leak"),
        ]
        nodes += [
            helper.make_node("Div", ["mean_keep", "scale"], ["work_seed"]),
            helper.make_node("Expand", ["work_seed", "work_shape"], ["work_0"]),
        ]
        for layer in range(work):
            nodes += [
                helper.make_node("MatMul", [f"work_{layer}", "work_weight"], [f"work_mm_{layer}"]),
                helper.make_node("Relu", [f"work_mm_{layer}"], [f"work_{layer + 1}"]),
            ]
        nodes += [
            helper.make_node("ReduceMean", [f"work_{work}"], ["work_mean"], axes=[1, 2], keepdims=0),
            helper.make_node("Mul", ["work_mean", "work_leak"], ["work_term"]),
            helper.make_node("Add", ["quality_base", "work_term"], ["quality"]),
        ]

    frame_dims = [size, size] if channels == 1 else [size, size, channels]
    graph = helper.make_graph(
        nodes,
        "reference_intensity",
        inputs=[helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", *frame_dims])],
        outputs=[
            helper.make_tensor_value_info("quality", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("mask", TensorProto.UINT8, ["N", size, size]),
            helper.make_tensor_value_info("planes", TensorProto.FLOAT, ["N", len(PLANE_CLASSES)]),
        ],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="sweepstream.engines.reference",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def make_reference_bundle(
    out_dir: str | os.PathLike[str],
    *,
    size: int = 224,
    channels: int = 1,
    work: int = 0,
    name: str = "reference-intensity",
) -> Path:
    """Write a reference bundle to ``out_dir`` and return its path.

    Outputs per frame: ``quality`` = mean intensity / 255; ``mask`` = pixels brighter
    than the frame mean (for 3 channels, brightness is the channel sum); ``planes`` =
    softmax over (abdomen, brain, other) of a fixed linear map of mean and mean of
    squares. Best frame is ranked by quality.

    ``work`` > 0 adds that many 256x256 MatMul+Relu layers on a [N, 256, 256] tensor
    derived from the frame, leaving every output unchanged: a real, tunable "slow
    engine" for overload tests. Each layer is 2 * 256**3 = 33.6 MFLOP per frame. Measured
    with ONNX Runtime 1.32 on the 2-core AMD EPYC development VM: about 0.18 ms per layer
    per frame with default threads (0.32 ms with threads=1), e.g. ~1.5 ms per layer for a
    batch of 8, against ~0.3 ms for the whole work=0 model; a shared host adds up to 2x noise.
    """
    model = build_reference_model(size=size, channels=channels, work=work)
    bundle_dir = Path(out_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(bundle_dir / "model.onnx"))

    layout = "NHW" if channels == 1 else "NHWC"
    work_note = f" Includes {work} no-op MatMul+Relu layers to cost time." if work else ""
    manifest = {
        "format": "sweepstream-bundle",
        "format_version": 1,
        "name": name,
        "version": "1.1.0",  # 1.1: the mask leaves the graph as BOOL -> FLOAT -> UINT8 (TensorRT-documented)
        "description": (
            "Reference bundle for sweepstream pipeline tests, not a medical model: quality is mean "
            "intensity / 255, mask marks pixels brighter than the frame mean, planes is a softmax of "
            f"fixed intensity statistics.{work_note}"
        ),
        "license": "Apache-2.0",
        "source": {
            "checkpoint_sha256": None,
            "built_by": (
                "engines.export.reference.make_reference_bundle("
                f"size={size}, channels={channels}, work={work})"
            ),
        },
        "model": {"onnx": "model.onnx", "sha256": ""},
        "input": {
            "name": "image",
            "size": size,
            "channels": channels,
            "dtype": "uint8",
            "layout": layout,
            "pad_to_square": True,
            # A test model has no trained input distribution to match, so it takes the fast filter;
            # FetalCLIP bundles say "bicubic" and get open_clip's exact one.
            "resize": "area",
            "normalization": "in_graph",
        },
        "batch": {"min": 1, "max": 32},
        "outputs": {
            "quality": {
                "kind": "quality",
                "shape": [],
                "dtype": "float32",
                "description": "mean intensity / 255, in [0, 1]",
            },
            "mask": {
                "kind": "mask",
                "shape": [size, size],
                "dtype": "uint8",
                "description": "1 where a pixel is brighter than the frame mean, else 0",
            },
            "planes": {
                "kind": "planes",
                "shape": [len(PLANE_CLASSES)],
                "dtype": "float32",
                "classes": list(PLANE_CLASSES),
                "description": "softmax of a fixed linear map of intensity statistics (not a classifier)",
            },
        },
        "best_frame": {"output": "quality"},
        "pixel_spacing": {"source": "input"},
    }
    write_manifest(bundle_dir, manifest)
    return bundle_dir
