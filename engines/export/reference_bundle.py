"""Build the reference model bundle (a small real ONNX model, no torch needed).

The reference bundle computes intensity statistics rather than anything clinical; it
is the pipeline's default bundle so the whole system can run and be tested on a cart
or laptop without FetalCLIP weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from engines.bundle import load_bundle
from engines.export.reference import make_reference_bundle


def main(argv: list[str] | None = None) -> int:
    """The `sweepstream-make-reference-bundle` command: write the bundle, print its path and model sha256."""
    parser = argparse.ArgumentParser(
        description=(
            "Write a sweepstream reference bundle: a tiny real ONNX model whose outputs are "
            "quality = mean intensity / 255, mask = pixels brighter than the frame mean, and "
            "planes = softmax of fixed intensity statistics. For pipeline tests and benchmarks; "
            "not a medical model."
        )
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bundles/reference"), help="bundle directory (default %(default)s)"
    )
    parser.add_argument("--size", type=int, default=224, help="square input size in pixels (default 224)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1, help="input channels (default 1)")
    parser.add_argument(
        "--work",
        type=int,
        default=0,
        help="extra 256x256 MatMul+Relu layers that cost time without changing outputs, "
        "for overload tests (default 0)",
    )
    parser.add_argument("--name", default="reference-intensity", help="bundle name (default %(default)s)")
    args = parser.parse_args(argv)
    if args.size < 1 or args.work < 0:
        parser.error("--size must be >= 1 and --work >= 0")

    bundle_dir = make_reference_bundle(
        args.out, size=args.size, channels=args.channels, work=args.work, name=args.name
    )
    bundle = load_bundle(bundle_dir)
    print(f"bundle: {bundle.path}")
    print(f"sha256: {bundle.sha256}")
    return 0

