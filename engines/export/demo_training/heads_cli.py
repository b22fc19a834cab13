"""`sweepstream-train-heads` (tools/train_heads.py): the heads trainer's command line."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from engines.export.fetalclip import CheckpointError, ConfigError
from engines.export.heads import HeadsError

from .finetune import HEADS, LORA_TARGETS, HeadsOptions, run
from .options import TrainError

TOOL = "tools/train_heads.py"


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def block_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in comma_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma list of 0-based block indices") from None


def build_parser() -> argparse.ArgumentParser:
    d = HeadsOptions(weights=Path("CKPT"), cases=Path("DIR"), out=Path("heads.pt"))
    parser = argparse.ArgumentParser(
        description=(
            "Train FetalCLIP's quality head (LoRA on the ViT blocks, the FetalCLIP-IQA recipe: rank 8, alpha "
            "16 on c_fc, c_proj, out_proj; linear head on the image features; BCE; AdamW 3e-4; batch 32; 5 "
            "epochs; a frame is positive when it shows the abdomen, optimal or suboptimal) and the abdomen "
            "mask decoder (FetalCLIP's probe depths: blocks 6, 8, 12, 24 of 24) on ACOUSLIC-format cases, "
            "split by subject. Frames are prepared by the pipeline's own letterbox for the bundle "
            "(bicubic for FetalCLIP) and cached once. Writes the heads file of the best validation epoch "
            "to --out, for tools/build_bundle.py --heads; the run folder holds a checkpoint per epoch "
            "(--resume), metrics.json and curves.png."
        ),
        epilog=f"example: python {TOOL} --weights FetalCLIP_weights.pt --cases acouslic/train "
        "--out heads/fetalclip.pt",
    )
    parser.add_argument("--weights", type=Path, required=True,
                        help="checkpoint of --config (FetalCLIP_weights.pt): {'state_dict': ...} or bare")
    parser.add_argument("--cases", type=Path, required=True,
                        help="ACOUSLIC-AI layout: images/stacked_fetal_ultrasound, "
                        "masks/stacked_fetal_abdomen, circumferences/*.csv (subject_id for the split; "
                        "without it a case is its own subject)")
    parser.add_argument("--out", type=Path, required=True, help="heads file to write")
    parser.add_argument("--config", default=d.config,
                        help="model config as tools/build_bundle.py takes it: fetalclip, tiny or an "
                        "open_clip JSON (default %(default)s)")
    parser.add_argument("--heads", type=comma_list, default=d.heads,
                        help=f"heads to train, comma list of {', '.join(HEADS)} "
                        f"(default {','.join(d.heads)})")
    numbers = (
        ("--epochs", int, d.epochs, "epochs"),
        ("--batch", int, d.batch, "batch size"),
        ("--lr", float, d.lr, "peak AdamW learning rate (warm-up, then cosine to 0)"),
        ("--weight-decay", float, d.weight_decay, "AdamW weight decay"),
        ("--lora-rank", int, d.lora_rank, "LoRA rank; 0: no LoRA, heads on the frozen backbone"),
        ("--lora-alpha", float, d.lora_alpha, "LoRA alpha (update scale alpha / rank)"),
        ("--mask-channels", int, d.mask_channels, "mask decoder channels at the patch grid"),
        ("--samples-per-epoch", int, None, "frames per epoch, drawn half with the abdomen, half without "
         "(default: twice the training frames that show the abdomen)"),
        ("--val-fraction", float, d.val_fraction, "share of subjects held out for validation"),
        ("--folds", int, d.folds, "k-fold split by subject instead of --val-fraction (1: off)"),
        ("--fold", int, d.fold, "which fold validates, 0..folds-1"),
        ("--seed", int, d.seed, "seed of the split, the heads' initialisation and the sampling"),
        ("--threads", int, None, "torch CPU threads (default: torch's)"),
    )
    for flag, kind, default, text in numbers:
        parser.add_argument(flag, type=kind, default=default, help=f"{text} (default %(default)s)")
    parser.add_argument("--lora-targets", type=comma_list, default=d.lora_targets,
                        help=f"ViT block layers LoRA adapts: c_fc, c_proj, out_proj, in_proj "
                        f"(default {','.join(LORA_TARGETS)})")
    parser.add_argument("--mask-blocks", type=block_list, default=None,
                        help="0-based ViT blocks the mask decoder reads (default: FetalCLIP's probe depths, "
                        "5,7,11,23 on ViT-L/14)")
    parser.add_argument("--train-backbone", action="store_true",
                        help="from-scratch mode: train every image-tower weight (no LoRA) and also write the "
                        "tuned checkpoint next to --out as <name>.weights.pt (build_bundle --weights)")
    parser.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"),
                        help="auto: CUDA when torch sees one; bf16 mixed precision on CUDA "
                        "(default %(default)s)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="checkpoints, metrics.json, curves.png (default: <out without suffix>.run)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="prepared-frame cache (default: frame-cache next to --out)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run folder's last checkpoint")
    return parser


def main(argv: list[str] | None = None) -> int:
    """One error line and exit 1 on bad options or inputs, before training starts."""
    args = vars(build_parser().parse_args(argv))
    opts = HeadsOptions(**args)
    command = shlex.join(["python", TOOL, *(sys.argv[1:] if argv is None else argv)])
    try:
        summary = run(opts, command)
    except (TrainError, CheckpointError, ConfigError, HeadsError) as exc:
        print(f"train_heads: error: {exc}", file=sys.stderr)
        return 1
    best = summary["best"]
    shown = summary["history"][best["epoch"] - 1]["validation"]
    print(json.dumps({"best_epoch": best["epoch"], **shown}, indent=2))
    print(f"heads: {opts.out} (run folder {opts.run_folder}, {summary['seconds']:.0f} s)")
    return 0
