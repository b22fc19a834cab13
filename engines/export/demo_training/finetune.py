"""The heads trainer: a quality head (LoRA, the FetalCLIP-IQA recipe) and a mask decoder on a pretrained
open_clip backbone, fitted on ACOUSLIC-format cases, written as the heads file `build_bundle --heads` reads.

It shares the demo trainer's pieces: frames prepared by ``data.prepare`` through the pipeline's letterbox
of the bundle to be built, the stratified draw, the mask loss, the optimizer step and the warm-up/cosine
schedule, and the challenge's metric definitions (``pipeline.acouslic``). ``--train-backbone`` is its
from-scratch mode: every image-tower weight trains (no LoRA) and the tuned checkpoint is written too.

LoRA is the project's own (``engines.export.heads.attach_lora``, a parametrization), not peft: it is the
implementation the heads file and ``build_bundle`` already merge, and FetalCLIP-IQA's attention target,
``out_proj``, sits inside ``nn.MultiheadAttention``, whose fused forward reads ``out_proj.weight`` directly
and so bypasses a wrapped module's forward (peft's ``Linear`` there would train a no-op); a
parametrization changes the weight itself.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from engines.export.fetalclip import (
    build_model,
    input_preprocessing,
    is_timm_tower,
    load_checkpoint,
    load_config,
    pixel_affine,
    tower_outputs,
)
from engines.export.heads import MaskDecoder, QualityHead, attach_lora, read_torch_file, save_heads
from pipeline import acouslic
from pipeline.letterbox import BUNDLE_RESIZE, Letterbox

from .cases import CacheStats, CasePool, find_cases, link_cases, load_cases, split_by_subject
from .data import stratified_draw
from .options import TrainError
from .train import lr_at, mask_loss, optimizer_step, warmup

HEADS = ("quality", "mask")
LORA_TARGETS = ("c_fc", "c_proj", "out_proj")
"""FetalCLIP-IQA's LoRA targets: both MLP layers and the attention output projection of every ViT block;
``in_proj`` (the fused q, k, v projection) may be added."""
PROBE_FRACTIONS = (6 / 24, 8 / 24, 12 / 24, 1.0)
"""FetalCLIP's segmentation probe taps blocks 6, 8, 12 and 24 of its 24: the same depths of any ViT."""
SHARES = {"optimal": 0.25, "suboptimal": 0.25, "background": 0.5}
"""Each epoch's draw: half the frames show the abdomen (most of a blind sweep does not)."""
VALIDATION_DEFINITIONS = (
    "pipeline.acouslic on every frame of the validation cases: quality_f1 = frame_f1(label > 0, quality >= "
    "0.5); seg_f1 = frame_f1(label > 0, mask area > seg_area_threshold_px), the threshold with the best F1 "
    "on these frames; dice_positive = mean dice(mask, truth) over frames labelled 1 or 2, at model "
    "resolution; score = mean of the trained heads' quality_f1 / dice_positive (picks the best epoch)"
)
CHECKPOINT = "checkpoint.pt"
BEST = "best_heads.pt"
FINGERPRINT_KEYS = ("weights", "config", "cases", "heads", "batch", "lr", "weight_decay", "lora_rank",
                    "lora_alpha", "lora_targets", "train_backbone", "mask_blocks", "mask_channels",
                    "samples_per_epoch", "val_fraction", "folds", "fold", "seed")


@dataclass(frozen=True)
class HeadsOptions:
    """One heads-training run; every field is a command-line option of tools/train_heads.py."""

    weights: Path
    cases: Path
    out: Path
    config: str = "fetalclip"
    heads: tuple[str, ...] = HEADS
    epochs: int = 5
    batch: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.01
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    train_backbone: bool = False
    mask_blocks: tuple[int, ...] | None = None
    mask_channels: int = 256
    samples_per_epoch: int | None = None
    val_fraction: float = 0.2
    folds: int = 1
    fold: int = 0
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    run_dir: Path | None = None
    cache: Path | None = None
    resume: bool = False

    def check(self) -> None:
        """Raise TrainError with one line naming the first bad option."""
        if not self.heads or set(self.heads) - set(HEADS) or len(set(self.heads)) != len(self.heads):
            raise TrainError(f"--heads {','.join(self.heads)}: a comma list of {', '.join(HEADS)}")
        for name in ("epochs", "batch", "mask_channels", "folds"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < self.batch:
            raise TrainError(f"--samples-per-epoch {self.samples_per_epoch}: under a batch ({self.batch})")
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise TrainError("--lr must be > 0 and --weight-decay >= 0")
        if self.lora_rank < 0 or not self.lora_alpha > 0:
            raise TrainError("--lora-rank must be >= 0 (0: no LoRA) and --lora-alpha > 0")
        if not 0 < self.val_fraction < 1:
            raise TrainError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 <= self.fold < self.folds:
            raise TrainError(f"--fold {self.fold}: must be in 0..{self.folds - 1} for --folds {self.folds}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise TrainError(f"--device {self.device}: one of auto, cpu, cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise TrainError("--device cuda: no CUDA device is available to torch")
        if self.threads is not None and self.threads < 1:
            raise TrainError(f"--threads must be >= 1, got {self.threads}")
        if not self.cases.is_dir():
            raise TrainError(f"--cases {self.cases}: not a folder")

    @property
    def run_folder(self) -> Path:
        return self.run_dir or self.out.with_name(self.out.stem + ".run")

    @property
    def cache_folder(self) -> Path:
        return self.cache or self.out.parent / "frame-cache"

    @property
    def weights_out(self) -> Path:
        """Where --train-backbone writes the tuned checkpoint: next to --out."""
        return self.out.with_name(self.out.stem + ".weights.pt")

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one."""
        return {key: str(value) if isinstance(value, Path) else value
                for key, value in asdict(self).items() if key in FINGERPRINT_KEYS}


def probe_blocks(layers: int) -> tuple[int, ...]:
    """0-based blocks the mask decoder reads: FetalCLIP's probe depths (6, 8, 12, 24 of 24) for any depth."""
    return tuple(sorted({max(0, round(layers * f) - 1) for f in PROBE_FRACTIONS}))


def lora_parameter_names(clip: nn.Module, targets: Sequence[str]) -> list[str]:
    """The image tower's 2-D weights in every block whose layer is one of ``targets`` (``c_fc``, ``c_proj``,
    ``out_proj``, ``in_proj``): CLIP parameter names, as the heads file keys LoRA."""
    pattern = re.compile(r"visual\.transformer\.resblocks\.\d+\.(?:attn|mlp)\.(\w+?)(?:\.weight|_weight)$")
    found: dict[str, list[str]] = {target: [] for target in targets}
    for name, param in clip.named_parameters():
        match = pattern.match(name)
        if match and match.group(1) in found and param.ndim == 2:
            found[match.group(1)].append(name)
    missing = [target for target, names in found.items() if not names]
    if missing:
        raise TrainError(f"--lora-targets: the image tower has no {', '.join(missing)} layers")
    return [name for names in found.values() for name in names]


def fresh_lora(clip: nn.Module, names: Sequence[str], rank: int, alpha: float) -> dict[str, dict[str, Any]]:
    """LoRA that starts as a no-op: A Kaiming-uniform, B zero (W is unchanged until B learns)."""
    params = dict(clip.named_parameters())
    lora = {}
    for name in names:
        out_features, in_features = params[name].shape
        a = torch.empty(rank, in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        lora[name] = {"A": a, "B": torch.zeros(out_features, rank), "alpha": float(alpha)}
    return lora


class HeadsModel(nn.Module):
    """A pretrained CLIP with the heads to train: grey uint8 frames [N, S, S] -> quality logit [N] and mask
    logit [N, S, S] (None for a head not trained), normalised and encoded as the export graph does."""

    def __init__(self, clip: nn.Module, quality: QualityHead | None, mask: MaskDecoder | None,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.clip, self.quality, self.mask = clip, quality, mask
        scale, shift = pixel_affine(mean, std)
        self.register_buffer("pixel_scale", scale, persistent=False)
        self.register_buffer("pixel_shift", shift, persistent=False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x = image.to(torch.float32).unsqueeze(1) * self.pixel_scale + self.pixel_shift
        features, tokens = tower_outputs(self.clip.visual, x, None if self.mask is None else self.mask.blocks)
        quality = self.quality.linear(features).squeeze(-1) if self.quality is not None else None
        return quality, self.mask(tokens) if self.mask is not None else None


def build_heads(clip: nn.Module, opts: HeadsOptions) -> tuple[QualityHead | None, MaskDecoder | None]:
    """Fresh heads sized to the image tower (seeded by --seed)."""
    visual = clip.visual
    quality = QualityHead(visual.output_dim) if "quality" in opts.heads else None
    mask = None
    if "mask" in opts.heads:
        layers = len(visual.transformer.resblocks)
        blocks = opts.mask_blocks or probe_blocks(layers)
        if blocks[-1] >= layers:
            raise TrainError(f"--mask-blocks {blocks}: the image tower has blocks 0..{layers - 1}")
        mask = MaskDecoder(width=visual.transformer.width, grid=visual.grid_size[0],
                           image_size=visual.image_size[0], blocks=blocks, channels=opts.mask_channels)
    return quality, mask


def losses(model: HeadsModel, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
           autocast: bool) -> dict:
    """Quality BCE against "the frame shows the abdomen" (FetalCLIP-IQA's label: optimal or suboptimal)
    and the demo trainer's mask loss (BCE + soft Dice) on every frame, so background frames ask for an
    empty mask."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        quality, mask = model(images)
    parts = {}
    if quality is not None:
        parts["quality"] = F.binary_cross_entropy_with_logits(quality.float(), (labels > 0).float())
    if mask is not None:
        parts["mask"] = mask_loss(mask.float(), masks)
    return parts


def best_area_threshold(areas: np.ndarray, positive: np.ndarray) -> tuple[float, int]:
    """The "SEG" classifier: a frame is positive when its mask covers more than the threshold (pixels);
    the threshold with the best F1 on these frames, and that F1."""
    candidates = np.unique(np.concatenate([[-1], areas]))
    best = (0.0, -1)
    for threshold in candidates:
        f1 = acouslic.frame_f1(positive, areas > threshold).f1
        if f1 > best[0]:
            best = (f1, int(threshold))
    return best


@torch.no_grad()
def validate(model: HeadsModel, pool: CasePool, batch: int, device: torch.device, autocast: bool) -> dict:
    """Every frame of the validation cases, measured as users compare: frame F1 of the quality head at 0.5
    (FetalCLIP-IQA's definition: optimal or suboptimal is positive), F1 of the mask used as a classifier
    (area above a threshold chosen on these frames), and mean Dice on the labelled frames (model
    resolution, ``pipeline.acouslic.dice``)."""
    model.eval()
    quality, areas, dice = [], [], []
    for start in tqdm(range(0, len(pool.labels), batch), desc="validate", unit="batch", leave=False):
        indices = np.arange(start, min(start + batch, len(pool.labels)))
        images, masks, _ = pool.batch(indices)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            q, m = model(torch.from_numpy(images).to(device))
        if q is not None:
            quality.append(torch.sigmoid(q.float()).cpu().numpy())
        if m is not None:
            predicted = (m.float() > 0).cpu().numpy()
            areas.append(predicted.sum((1, 2)))
            dice += [acouslic.dice(predicted[k], masks[k] >= 128) for k in range(len(indices))
                     if pool.labels[indices[k]] > 0]
    model.train()
    positive = pool.labels > 0
    out: dict[str, Any] = {"frames": len(positive), "positive_frames": int(positive.sum())}
    if quality:
        f1 = acouslic.frame_f1(positive, np.concatenate(quality) >= 0.5)
        out.update(quality_f1=f1.f1, quality_precision=f1.precision, quality_recall=f1.recall)
    if areas:
        seg_f1, threshold = best_area_threshold(np.concatenate(areas), positive)
        out.update(seg_f1=seg_f1, seg_area_threshold_px=threshold, dice_positive=float(np.mean(dice)))
    return out


def selection_score(metrics: dict) -> float:
    """What picks the best epoch: the quality F1, the positive-frame Dice, or their mean when both train
    (one LoRA serves both heads, so they must come from the same epoch)."""
    return float(np.mean([metrics[k] for k in ("quality_f1", "dice_positive") if k in metrics]))


def plot_curves(history: list[dict], path: Path) -> None:
    """Training losses and validation metrics per epoch, as a PNG next to metrics.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key in history[0]["train_loss"]:
        left.plot(epochs, [row["train_loss"][key] for row in history], marker="o", label=f"{key} loss")
    for key in ("quality_f1", "seg_f1", "dice_positive"):
        if key in history[0]["validation"]:
            right.plot(epochs, [row["validation"][key] for row in history], marker="o", label=key)
    left.set(xlabel="epoch", ylabel="training loss", title="training")
    right.set(xlabel="epoch", ylabel="validation", ylim=(0, 1), title="validation (held-out subjects)")
    for axis in (left, right):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def pick_device(choice: str) -> torch.device:
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
                        else "cpu")


@dataclass
class Setup:
    """Everything a run needs, read and checked before training starts."""

    model: HeadsModel
    lora: dict[str, Any]
    train: CasePool
    val: CasePool
    letterbox: Letterbox
    cache: CacheStats


def prepare_run(opts: HeadsOptions, device: torch.device) -> Setup:
    """Read and check inputs (options, config, cases, split, checkpoint), build the model and its heads,
    and the prepared frames; every bad input is one TrainError (or CheckpointError / ConfigError) line."""
    opts.check()
    cfg = load_config(opts.config)
    if is_timm_tower(cfg) and ("mask" in opts.heads or opts.lora_rank):
        raise TrainError(f"--config {opts.config}: a timm image tower takes neither a mask decoder (it reads "
                         "ViT blocks) nor block LoRA; use --heads quality --lora-rank 0")
    cases = find_cases(opts.cases)
    train_cases, val_cases = split_by_subject(cases, val_fraction=opts.val_fraction, folds=opts.folds,
                                              fold=opts.fold, seed=opts.seed, where=opts.cases)
    torch.manual_seed(opts.seed)
    clip = build_model(cfg)
    load_checkpoint(clip, opts.weights, config_label=opts.config)
    quality, mask = build_heads(clip, opts)
    clip.requires_grad_(False)
    lora: dict[str, Any] = {}
    if opts.train_backbone:
        clip.visual.requires_grad_(True)
    elif opts.lora_rank:
        names = lora_parameter_names(clip, opts.lora_targets)
        lora = attach_lora(clip, fresh_lora(clip, names, opts.lora_rank, opts.lora_alpha))
    preprocessing = input_preprocessing(cfg)
    model = HeadsModel(clip, quality, mask, preprocessing.mean, preprocessing.std).to(device)
    letterbox = Letterbox(clip.visual.image_size[0], 1, interpolation=BUNDLE_RESIZE[preprocessing.resize])
    cache, folder = CacheStats(), opts.cache_folder
    train = CasePool.of(load_cases(train_cases, letterbox, folder, "prepare training cases", cache))
    val = CasePool.of(load_cases(val_cases, letterbox, folder, "prepare validation cases", cache))
    for name, pool in (("training", train), ("validation", val)):
        if not (pool.labels > 0).any():
            where = [c.files.mask for c in pool.cases]
            raise TrainError(f"{where[0].parent}: no abdomen mask in any {name} case ({len(where)} case(s))")
    return Setup(model, lora, train, val, letterbox, cache)


def save_outputs(setup: Setup, opts: HeadsOptions, path: Path) -> None:
    """The heads file (format of engines.export.heads) of the model as it is now; with --train-backbone
    the tuned CLIP checkpoint as well, which build_bundle takes as --weights."""
    model = setup.model
    lora = {name: {"A": d.A, "B": d.B, "alpha": opts.lora_alpha} for name, d in setup.lora.items()}
    save_heads(path, quality=model.quality, mask=model.mask, lora=lora or None)
    if opts.train_backbone:
        torch.save({"state_dict": {k: v.detach().cpu() for k, v in model.clip.state_dict().items()}},
                   path.with_name(path.stem + ".weights.pt"))


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def resume_state(opts: HeadsOptions, model: HeadsModel, optimizer: torch.optim.Optimizer) -> dict:
    """The interrupted run's progress from its checkpoint (weights and optimizer loaded in place)."""
    path = opts.run_folder / CHECKPOINT
    if not opts.resume:
        return {"epoch": 0, "step": 0, "history": [], "best": None}
    if not path.is_file():
        raise TrainError(f"--resume: {path}: no checkpoint to resume from")
    state = read_torch_file(path, TrainError, "checkpoint")
    if state.get("options") != opts.fingerprint():
        was = state.get("options") or {}
        changed = sorted(k for k, v in opts.fingerprint().items() if was.get(k) != v)
        raise TrainError(f"--resume: {path}: written with other options ({', '.join(changed)})")
    params = trainable(model)
    if set(state["trainable"]) != set(params):
        raise TrainError(f"--resume: {path}: its trainable weights do not fit this model")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    return state


def write_checkpoint(opts: HeadsOptions, model: HeadsModel, optimizer: torch.optim.Optimizer,
                     progress: dict) -> None:
    """Everything --resume needs after epoch ``progress['epoch']``, replaced atomically."""
    path = opts.run_folder / CHECKPOINT
    partial = path.with_name(path.name + ".partial")
    state = {**progress, "options": opts.fingerprint(), "optimizer": optimizer.state_dict(),
             "trainable": {k: v.detach().cpu() for k, v in trainable(model).items()}}
    torch.save(state, partial)
    partial.replace(path)


def run(opts: HeadsOptions, command: str) -> dict:
    """Train, validate each epoch, checkpoint, keep the best epoch; the best heads go to --out. Returns
    the run's metrics (also in the run folder's metrics.json, with curves.png)."""
    started = time.perf_counter()
    device = pick_device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    setup = prepare_run(opts, device)
    model, pool = setup.model, setup.train
    autocast = device.type == "cuda"
    folder = opts.run_folder
    folder.mkdir(parents=True, exist_ok=True)
    link_cases([c.files for c in setup.val.cases], opts.cases, folder / "validation_cases")
    params = list(trainable(model).values())
    decay = [p for p in params if p.ndim >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=opts.lr)
    progress = resume_state(opts, model, optimizer)
    samples = opts.samples_per_epoch or max(opts.batch, 2 * int((pool.labels > 0).sum()))
    steps = max(1, samples // opts.batch)
    total = steps * opts.epochs
    counts = {"train": pool.counts(), "validation": setup.val.counts(), "train_cases": len(pool.cases),
              "validation_cases": len(setup.val.cases), "frame_cache": setup.cache.as_dict(),
              "validation_ids": [c.files.case_id for c in setup.val.cases]}
    shown = {k: v for k, v in counts.items() if k != "validation_ids"}
    print(f"train_heads: {shown}, {steps} steps of {opts.batch} per epoch on {device}"
          + (f", resuming after epoch {progress['epoch']}" if progress["epoch"] else ""), flush=True)

    def summary() -> dict:
        return {"command": command, "device": str(device), "data": counts,
                "letterbox": asdict(setup.letterbox), "steps_per_epoch": steps,
                "best": progress["best"], "history": progress["history"],
                "definitions": VALIDATION_DEFINITIONS}

    model.train()
    for epoch in range(progress["epoch"], opts.epochs):
        rng = np.random.default_rng([opts.seed, epoch])
        draw = stratified_draw(pool.strata(), SHARES, steps * opts.batch, rng).reshape(steps, opts.batch)
        sums: dict[str, float] = {}
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{opts.epochs}", unit="batch")
        for b in bar:
            images, masks, labels = pool.batch(draw[b])
            flip = rng.random(len(images)) < 0.5  # the sector is left-right symmetric
            images = np.where(flip[:, None, None], images[:, :, ::-1], images)
            masks = np.where(flip[:, None, None], masks[:, :, ::-1], masks)
            parts = losses(model, torch.from_numpy(images).to(device), torch.from_numpy(masks).to(device),
                           torch.from_numpy(labels).to(device), autocast)
            lr = lr_at(progress["step"], total, opts.lr, warmup(total))
            optimizer_step(optimizer, sum(parts.values()), lr, params)
            progress["step"] += 1
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value.item()
            bar.set_postfix({k: f"{v / (b + 1):.3f}" for k, v in sums.items()})
        metrics = validate(model, setup.val, 2 * opts.batch, device, autocast)
        row = {"epoch": epoch + 1, "train_loss": {k: round(v / steps, 5) for k, v in sums.items()},
               "validation": metrics, "score": selection_score(metrics)}
        progress["history"].append(row)
        shown = {k: round(v, 3) for k, v in metrics.items() if k in ("quality_f1", "seg_f1", "dice_positive")}
        bar.write(f"epoch {epoch + 1}: loss {row['train_loss']}, validation {shown}")
        if progress["best"] is None or row["score"] > progress["best"]["score"]:
            progress["best"] = {"epoch": epoch + 1, "score": row["score"]}
            save_outputs(setup, opts, folder / BEST)
        progress["epoch"] = epoch + 1
        write_checkpoint(opts, model, optimizer, progress)
        (folder / "metrics.json").write_text(json.dumps(summary(), indent=2) + "\n", encoding="utf-8")
        plot_curves(progress["history"], folder / "curves.png")
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / BEST, opts.out)
    if opts.train_backbone:
        shutil.copyfile(folder / (Path(BEST).stem + ".weights.pt"), opts.weights_out)
    return {**summary(), "seconds": round(time.perf_counter() - started, 1)}
