"""Add a gated INT8 model to an existing bundle: model.onnx -> model.int8.onnx, recorded in bundle.json.

Needs onnxruntime only (no torch). The int8 model is kept only if it passes the gate;
see engines/export/quantize.py for the method and what stays in float.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engines.bundle import BundleError
from engines.export.quantize import (
    DEFAULT_MIN_COSINE,
    GATE_FRAMES,
    INT8_NAME,
    QuantizationGateError,
    gate_table,
    quantize_bundle_int8,
)


def main(argv: list[str] | None = None) -> int:
    """The `sweepstream-quantize-bundle` command: quantize, gate, print the gate table; exit 1 with a
    one-line reason when the gate fails."""
    parser = argparse.ArgumentParser(
        description=(
            f"Quantize a bundle's model.onnx to {INT8_NAME} with ONNX Runtime dynamic quantization "
            "(int8 weights with one scale per output channel for the MatMul/Gemm layers of the "
            "transformer blocks; activations quantized at run time; the uint8 input path, attention "
            "products and output layers stay float). Then gate it: run both models on CPU on "
            f"{GATE_FRAMES} fixed ultrasound-like frames and keep the int8 model only if every frame's "
            "embedding has cosine >= --min-cosine with the fp32 one and every frame keeps its top-1 "
            "plane. On a pass the int8 file and the gate's numbers are recorded in bundle.json "
            "(model.int8), and the ort engine then runs it on CPU by default (infer.precision auto). "
            "On a failure the int8 file is deleted and bundle.json is left as it was."
        ),
        epilog="example: python tools/quantize_bundle.py --bundle bundles/fetalclip",
    )
    parser.add_argument(
        "--bundle", type=Path, required=True, help="bundle directory (bundle.json + model.onnx)"
    )
    parser.add_argument(
        "--min-cosine",
        type=float,
        default=DEFAULT_MIN_COSINE,
        help="lowest per-frame embedding cosine (int8 vs fp32) the gate accepts (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if not 0.0 < args.min_cosine <= 1.0:
        parser.error("--min-cosine must be in (0, 1]")

    try:
        gate = quantize_bundle_int8(args.bundle, min_cosine=args.min_cosine)
    except QuantizationGateError as exc:
        print(gate_table(exc.gate))
        print(f"quantize_bundle: error: {exc}", file=sys.stderr)
        return 1
    except BundleError as exc:
        print(f"quantize_bundle: error: {exc}", file=sys.stderr)
        return 1
    print(gate_table(gate))
    print(f"wrote {args.bundle / INT8_NAME} and recorded it in {args.bundle / 'bundle.json'}")
    return 0

