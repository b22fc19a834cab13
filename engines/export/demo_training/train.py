"""The training loop: targets per head, the losses, the learning-rate schedule, and the fit itself."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engines.export.demo import LABEL_TO_CLASS, DemoModel
from pipeline.phantom import OPTIMAL_DISTANCE_MM

from .data import FramePool, epoch_batches
from .options import TrainOptions

DISTANCE_CLIP_MM, DISTANCE_UNIT_MM = 8.0, 1.0  # auxiliary geometry targets: min(d, clip) / unit ...
ANGLE_CLIP_DEG, ANGLE_UNIT_DEG = 45.0, 15.0  # ... and min(angle, clip) / unit (angle on labelled frames only)
IN_BAND_FALLOFF = 0.4  # quality target of an optimal frame: 1 - falloff * (d / 2 mm)^2, 0.6 at the band edge
GAIN_RANGE = (0.75, 1.3)  # intensity augmentation: a machine's overall gain ...
GAMMA_RANGE = (0.8, 1.25)  # ... and its dynamic range (compression curve), drawn per frame


def intensity_jitter(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[N, S, S] uint8 frames under a random gain and compression curve each, as uint8: the phantom's cases
    vary both, and a model that keys on one case's brightness does not carry to the next case."""
    gain = rng.uniform(*GAIN_RANGE, size=(len(images), 1, 1))
    gamma = rng.uniform(*GAMMA_RANGE, size=(len(images), 1, 1))
    jittered = 255.0 * np.power(images / 255.0, gamma) * gain
    return np.clip(np.rint(jittered), 0, 255).astype(np.uint8)


def quality_targets(labels: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """[N] quality targets: 0 off the optimal band, and inside it highest on the standard plane itself, so
    that of a sweep's two or three optimal frames the most central one scores best (the pipeline picks the
    sweep's highest score) and a frame just outside the band, which looks much like one at its edge,
    ranks below the centre."""
    edge = np.minimum(distance, OPTIMAL_DISTANCE_MM) / OPTIMAL_DISTANCE_MM
    graded = 1.0 - IN_BAND_FALLOFF * np.square(edge)
    return np.where(labels == 1, graded, 0.0).astype(np.float32)


def geometry_targets(distance: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """[N, 2] targets of the auxiliary geometry head: clipped distance and angle, in mm and 15 degrees."""
    return np.stack([np.minimum(distance, DISTANCE_CLIP_MM) / DISTANCE_UNIT_MM,
                     np.minimum(angle, ANGLE_CLIP_DEG) / ANGLE_UNIT_DEG], axis=1).astype(np.float32)


def losses(model: DemoModel, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
           quality: torch.Tensor, geometry: torch.Tensor, closer: torch.Tensor) -> dict:
    """Per-head losses: plane cross-entropy on 100 x cosine logits, quality BCE (graded optimal targets),
    mask BCE plus soft Dice on the abdomen (labels 1 and 2), and the auxiliary geometry regression (smooth
    L1 on distance for every frame, on angle where the abdomen is in view): it makes the embedding measure
    how far the plane is from the standard level, which the quality target alone teaches only coarsely.
    Ranking: the first ``2 len(closer)`` frames are pairs from one sweep crossing, and the quality logit of
    the frame closer to the standard plane must exceed the other's (logistic loss; ``closer`` is +1 when
    the first frame of the pair is the closer one, else -1) - the order the pipeline's pick depends on."""
    features, plane_logits, quality_logit, mask_logit = model(images)
    pairs = len(closer)
    margin = (quality_logit[0 : 2 * pairs : 2] - quality_logit[1 : 2 * pairs : 2]) * closer
    classes = torch.as_tensor(LABEL_TO_CLASS)[labels]
    return {
        "planes": F.cross_entropy(plane_logits, classes, label_smoothing=0.05),
        "quality": F.binary_cross_entropy_with_logits(quality_logit, quality),
        "mask": mask_loss(mask_logit, masks),
        "geometry": (F.smooth_l1_loss(model.geometry(features), geometry, reduction="none")
                     * torch.stack([torch.ones(len(labels)), (labels > 0).float()], 1)).mean() * 2.0,
        "ranking": F.softplus(-margin).mean() if pairs else quality_logit.new_zeros(()),
    }


def mask_loss(mask_logit: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mask decoder loss of both trainers: per-pixel BCE plus soft Dice (smoothed by 1, so an empty target
    asks for an empty mask) against the letterboxed 0..255 abdomen mask."""
    target = masks.float() / 255.0
    prob = torch.sigmoid(mask_logit)
    overlap = (prob * target).sum((1, 2))
    dice = 1.0 - (2.0 * overlap + 1.0) / (prob.sum((1, 2)) + target.sum((1, 2)) + 1.0)
    return F.binary_cross_entropy_with_logits(mask_logit, target) + dice.mean()


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float,
                   parameters: list[torch.nn.Parameter], max_norm: float = 1.0) -> None:
    """One update of both trainers: set the scheduled rate, backpropagate, clip the gradient norm, step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    optimizer.step()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def warmup(total: int) -> int:
    """Warm-up steps of a schedule of ``total`` steps (both trainers)."""
    return min(100, total // 10 + 1)


def train(model: DemoModel, pool: FramePool, opts: TrainOptions) -> list[dict]:
    """Fit all heads and the backbone together; returns the mean losses per epoch."""
    rng = np.random.default_rng(opts.seed)
    steps_per_epoch = max(1, opts.samples_per_epoch // opts.batch)
    total = steps_per_epoch * opts.epochs
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n != "prototypes"]
    other = [p for n, p in model.named_parameters() if p.ndim < 2 or n == "prototypes"]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opts.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=opts.lr,
    )
    history, step = [], 0
    model.train()
    for epoch in range(opts.epochs):
        batches = epoch_batches(pool, steps_per_epoch, opts.batch, opts.pairs_per_batch, rng)
        sums: dict[str, float] = {}
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{opts.epochs}", unit="batch")
        for b in bar:
            idx, pairs = batches[b]
            flip = rng.random(len(idx)) < 0.5  # the sector is left-right symmetric
            flipped = np.where(flip[:, None, None], pool.images[idx, :, ::-1], pool.images[idx])
            images = intensity_jitter(flipped, rng)
            masks = np.where(flip[:, None, None], pool.masks[idx, :, ::-1], pool.masks[idx])
            labels = torch.from_numpy(pool.labels[idx])
            distance, angle = pool.distance[idx], pool.angle[idx]
            quality = torch.from_numpy(quality_targets(pool.labels[idx], distance))
            geometry = torch.from_numpy(geometry_targets(distance, angle))
            closer = torch.from_numpy(np.where(distance[0 : 2 * pairs : 2] < distance[1 : 2 * pairs : 2],
                                               1.0, -1.0).astype(np.float32))
            parts = losses(model, torch.from_numpy(images), torch.from_numpy(masks), labels, quality,
                           geometry, closer)
            optimizer_step(optimizer, sum(parts.values()), lr_at(step, total, opts.lr, warmup=warmup(total)),
                           list(model.parameters()))
            step += 1
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value.item()
            bar.set_postfix({k: f"{v / (b + 1):.3f}" for k, v in sums.items()})
        history.append({k: round(v / steps_per_epoch, 5) for k, v in sums.items()})
    model.eval()
    return history
