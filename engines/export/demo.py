"""The demo model: a small open_clip ViT with a conv stem, the project's heads, and learned plane prototypes.

It is the FetalCLIP family in miniature, so it exports through the very same
:class:`engines.export.fetalclip.FetalClipExport` and bundle code: an open_clip
``VisionTransformer`` whose patch projection (``visual.conv1``) is replaced by a
strided conv stack, a :class:`~engines.export.heads.QualityHead` on the projected features,
a :class:`~engines.export.heads.MaskDecoder` on evenly spaced blocks, and one learned,
L2-normalised prototype per plane class standing in for FetalCLIP's text-derived
class embeddings (``planes`` = softmax of 100 x cosine, exactly as in the export).

A conv stem instead of a single 16x16 patch projection gives the tiny ViT local
edges to work with: on phantom sweeps it lifts mask Dice and frame accuracy at a
small cost in latency. Training lives in :mod:`engines.export.demo_training`; this module
only builds modules, so tests and the trainer share one definition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

from engines.export.fetalclip import CLIP_MEAN, CLIP_STD, LOGIT_SCALE, FetalClipExport
from engines.export.heads import MaskDecoder, QualityHead, evenly_spaced_blocks

DEMO_CLASSES = ("abdomen_optimal", "abdomen_suboptimal", "other")
"""Plane classes, in ``planes`` output order; index = phantom label remapped by :data:`LABEL_TO_CLASS`."""
LABEL_TO_CLASS = (2, 0, 1)
"""Phantom / ACOUSLIC label (0 background, 1 optimal, 2 suboptimal) -> index in :data:`DEMO_CLASSES`."""


@dataclass(frozen=True)
class DemoConfig:
    """Architecture of the demo model; stored in the bundle manifest so a build is self-describing."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    output_dim: int = 128
    stem_channels: tuple[int, ...] = (16, 32, 64)
    mask_channels: int = 32
    classes: tuple[str, ...] = field(default=DEMO_CLASSES)

    def __post_init__(self) -> None:
        steps = len(self.stem_channels) + 1
        if self.patch_size != 2**steps:
            raise ValueError(
                f"the conv stem halves the image {steps} times, so patch_size must be {2**steps}, "
                f"got {self.patch_size}"
            )
        if self.image_size % self.patch_size:
            problem = f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            raise ValueError(problem)
        if len(self.classes) < 2:
            raise ValueError("at least 2 plane classes are needed")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples as lists)."""
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


class ConvStem(nn.Module):
    """Strided 3x3 convs (BatchNorm, GELU) then a 1x1 conv to the ViT width: [N, 3, S, S] -> [N, W, S/p, S/p].

    Drops in for ``VisionTransformer.conv1`` (the patch projection), which open_clip
    calls once on the image; BatchNorm folds into the convs at ONNX export.
    """

    def __init__(self, width: int, channels: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 3
        for out in (*channels, width):
            layers += [
                nn.Conv2d(previous, out, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.GELU(),
            ]
            previous = out
        layers.append(nn.Conv2d(width, width, kernel_size=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class DemoModel(nn.Module):
    """Trainable demo model: grey frames -> (features, plane logits, quality logit, mask logit).

    Everything the export needs is a submodule here (``visual``, ``quality``, ``mask``,
    ``prototypes``), so :meth:`export_module` builds the FetalClipExport without copies.
    """

    def __init__(self, config: DemoConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(
            image_size=config.image_size,
            patch_size=config.patch_size,
            width=config.width,
            layers=config.layers,
            heads=config.heads,
            mlp_ratio=config.mlp_ratio,
            output_dim=config.output_dim,
        )
        self.visual.conv1 = ConvStem(config.width, config.stem_channels)
        grid = config.image_size // config.patch_size
        self.quality = QualityHead(config.output_dim)
        self.mask = MaskDecoder(
            width=config.width,
            grid=grid,
            image_size=config.image_size,
            blocks=evenly_spaced_blocks(config.layers, 4),
            channels=config.mask_channels,
        )
        self.prototypes = nn.Parameter(torch.randn(len(config.classes), config.output_dim) * 0.1)
        # Training only (never exported): regresses the plane's distance and angle to the standard plane.
        self.geometry = nn.Linear(config.output_dim, 2)
        mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("pixel_scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("pixel_shift", -mean / std, persistent=False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 or float [N, S, S] grey frames (0..255) -> features [N, D], plane logits [N, C],
        quality logit [N], mask logit [N, S, S]; normalised exactly as FetalClipExport does in-graph."""
        x = image.to(torch.float32).unsqueeze(1) * self.pixel_scale + self.pixel_shift
        out = self.visual.forward_intermediates(x, indices=list(self.mask.blocks), output_fmt="NLC")
        features, tokens = out["image_features"], out["image_intermediates"]
        cosine = F.normalize(features, dim=-1) @ F.normalize(self.prototypes, dim=-1).T
        quality_logit = self.quality.linear(features).squeeze(-1)
        return features, LOGIT_SCALE * cosine, quality_logit, self.mask(tokens)

    def export_module(self) -> FetalClipExport:
        """The runtime graph (uint8 in; embedding, planes, quality, mask out), sharing these weights."""
        embeddings = F.normalize(self.prototypes.detach(), dim=-1)
        return FetalClipExport(self.visual, embeddings, quality=self.quality, mask=self.mask).eval()
