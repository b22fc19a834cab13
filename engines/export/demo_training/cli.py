"""Train the demo model (a small FetalCLIP-family ViT) on phantom blind sweeps and export it as a bundle.

Runs on a 2-core CPU in well under 30 minutes, reproducibly: fixed phantom seeds (never below 1000, which
are left to evaluation), fixed torch / numpy seeds, 2 threads, deterministic data. The bundle is written by
the same code as FetalCLIP bundles (FetalClipExport, export_onnx, the parity check of the FetalCLIP bundle
builder, write_manifest), and its manifest records the seeds, the validation metrics and the command that
rebuilds it. --revalidate re-runs only the validation of an existing bundle and rewrites its recorded
metrics (the model files stay byte-identical).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from engines.bundle import BundleError
from engines.export.build_bundle import ParityError

from .options import MIN_TRAIN_SEED, TrainError, TrainOptions
from .run import TOOL, command_line, revalidate, run


def build_parser() -> argparse.ArgumentParser:
    """Every TrainOptions field as an option (defaults are the committed bundles/demo's settings)."""
    d = TrainOptions(out=Path("bundles/demo"))
    parser = argparse.ArgumentParser(
        description=(
            "Train the demo model (open_clip ViT with a conv stem, quality head, mask decoder, learned plane "
            "prototypes) on phantom blind sweeps and write a bundle (bundle.json + model.onnx, and "
            "model.int8.onnx when it passes the int8 gate of sweepstream-quantize-bundle) and metrics.json. "
            "Deterministic for given options; about 27 minutes on 2 CPU cores by default."
        ),
        epilog=f"example: python {TOOL} --out bundles/demo",
    )
    parser.add_argument("--out", type=Path, required=True, help="bundle directory (created if needed)")
    parser.add_argument("--revalidate", action="store_true",
                        help="do not train: re-run the validation of the bundle in --out on the validation "
                        "seeds its manifest records and rewrite its recorded metrics (bundle.json "
                        "training.metrics, metrics.json); the other options are not used")
    options = (
        ("--seed", int, d.seed, f"first training phantom seed; torch/numpy seed (>= {MIN_TRAIN_SEED})"),
        ("--cases", int, d.cases, "training cases, one per seed from --seed"),
        ("--frames-per-sweep", int, d.frames_per_sweep, "frames per training sweep (denser than the 140 "
         "of evaluation sweeps finds more optimal frames)"),
        ("--per-case", int, d.per_case, "frames per training case besides the candidate optimal frames"),
        ("--val-seed", int, d.val_seed, "first validation phantom seed"),
        ("--val-cases", int, d.val_cases, "validation cases (whole cases, scored by the exported model)"),
        ("--val-frames-per-sweep", int, d.val_frames_per_sweep, "frames per validation sweep"),
        ("--epochs", int, d.epochs, "epochs"),
        ("--samples-per-epoch", int, d.samples_per_epoch, "frames drawn per epoch from the pool"),
        ("--batch", int, d.batch, "batch size"),
        ("--pairs-per-batch", int, d.pairs_per_batch, "ranking pairs (two frames of one sweep crossing) "
         "per batch; 0: none"),
        ("--lr", float, d.lr, "peak AdamW learning rate"),
        ("--weight-decay", float, d.weight_decay, "AdamW weight decay"),
        ("--threads", int, d.threads, "torch and ONNX Runtime threads"),
    )
    for flag, kind, default, text in options:
        parser.add_argument(flag, type=kind, default=default, help=f"{text} (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `sweepstream-train-demo` command; one error line and exit 1 on bad options, a bad bundle or a
    failed export check."""
    args = vars(build_parser().parse_args(argv))
    again = args.pop("revalidate")
    opts = TrainOptions(**args)
    try:
        if again:
            command = shlex.join(["python", TOOL, "--out", str(opts.out), "--revalidate"])
            validation = revalidate(opts.out, command)
        else:
            metrics = run(opts, command_line(opts, TrainOptions(out=opts.out)))
            validation = metrics["validation"]
    except (TrainError, BundleError, ParityError) as exc:
        print(f"train_demo: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in validation.items() if k != "sweeps"}, indent=2))
    print(f"bundle: {opts.out}" + ("" if again else f" ({metrics['seconds']['total']:.0f} s)"))
    return 0
