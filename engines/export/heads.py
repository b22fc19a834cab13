"""Trainable heads on an open_clip ViT (quality, mask) and LoRA adapters, plus their one weights file.

The heads are plain torch modules: a trainer fits them (on FetalCLIP, or on the small
demo model with any open_clip ViT config), saves them with :func:`save_heads`, and
:mod:`engines.export.build_bundle` folds them into the exported ONNX graph. Nothing here runs
at inference time outside that graph.

Heads file (``torch.save`` of a dict, read back with ``weights_only=True``)::

    {
        "format": "sweepstream-heads",
        "version": 1,
        "quality": {"config": {"in_features": D}, "state_dict": {...}},      # optional
        "mask": {"config": {"width": W, "grid": G, "image_size": S,
                            "blocks": [i, ...], "channels": C},
                 "state_dict": {...}},                                          # optional
        "lora": {"<CLIP parameter name>": {"A": [r, in], "B": [out, r],
                                           "alpha": float}, ...},               # optional
    }

At least one of quality, mask and lora is present. LoRA keys are parameter names
of the whole ``open_clip.CLIP`` model, e.g.
``visual.transformer.resblocks.3.attn.in_proj_weight`` or
``visual.transformer.resblocks.3.mlp.c_fc.weight``; the rank is ``A``'s first
dimension and the update is ``W += (alpha / rank) * B @ A``.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

HEADS_FORMAT = "sweepstream-heads"
HEADS_VERSION = 1
MIN_DECODER_CHANNELS = 8
_SHOWN_KEYS = 3
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format since torch 1.6
_PICKLE_PROTOCOL = b"\x80"  # the legacy format: a bare pickle, protocol 2 or later


class HeadsError(ValueError):
    """A heads file or LoRA state is malformed or does not fit the model it is applied to."""


# --------------------------------------------------------------------------- shared file helpers


def read_torch_file(path: str | os.PathLike[str], error: type[ValueError], what: str) -> Any:
    """``torch.load`` on CPU with ``weights_only=True``, turning unreadable files into one-line ``error``s.

    Only tensors and plain containers are unpickled, so a checkpoint cannot run code;
    files that need other Python objects are refused rather than trusted.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path}: file not found")
    with path.open("rb") as f:
        head = f.read(4)
    if not head.startswith((_ZIP_MAGIC, _PICKLE_PROTOCOL)):
        raise error(f"{what} {path}: not a PyTorch file (neither a torch.save zip archive nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\.\s|\n|$)", str(exc), re.DOTALL)
        detail = found.group(1) if found else str(exc).strip().splitlines()[0]
        raise error(
            f"{what} {path}: holds Python objects that weights_only=True refuses ({detail}); "
            "re-save just its tensors"
        ) from exc
    except (RuntimeError, EOFError) as exc:
        raise error(f"{what} {path}: not a readable PyTorch file ({type(exc).__name__}: {exc})") from exc


def _preview(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (", ..." if len(keys) > _SHOWN_KEYS else "")


def state_mismatch(module: nn.Module, state: Mapping[str, Any]) -> str | None:
    """Describe in one line how ``state`` fails to fit ``module`` strictly, or None if it fits.

    ``load_state_dict`` reports problems over many lines and stops at the first shape
    error; counting all three kinds up front gives one message that says what is wrong.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    not_tensors = [k for k in state if k in expected and not isinstance(state[k], torch.Tensor)]
    shapes = [
        f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}"
        for k in expected
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != expected[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) ({_preview(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) ({_preview(unexpected)})")
    if not_tensors:
        parts.append(f"{len(not_tensors)} non-tensor value(s) ({_preview(not_tensors)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) (file vs model: {_preview(shapes)})")
    return "; ".join(parts) or None


# --------------------------------------------------------------------------- quality head


class QualityHead(nn.Module):
    """Probability in [0, 1] that a frame is a good abdominal-plane frame.

    Input is the ViT's projected image features *before* L2 normalisation (what
    ``CLIP.encode_image`` and ``VisionTransformer.forward`` return), so a trainer can
    cache encoder outputs once and fit this linear probe on them.
    """

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.linear = nn.Linear(in_features, 1)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments, as stored in the heads file."""
        return {"in_features": self.in_features}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[N, in_features] features -> [N] quality."""
        return torch.sigmoid(self.linear(features)).squeeze(-1)


# --------------------------------------------------------------------------- mask decoder


def evenly_spaced_blocks(layers: int, count: int = 4) -> list[int]:
    """Indices of up to ``count`` transformer blocks spread over ``layers``, always ending at the last one."""
    if layers < 1 or count < 1:
        raise ValueError(f"layers and count must be >= 1, got layers={layers} count={count}")
    return sorted({max(0, math.ceil(layers * (k + 1) / count) - 1) for k in range(count)})


def upsample_sizes(grid: int, image_size: int) -> list[int]:
    """Side lengths of the decoder stages: doubling from the patch grid, the last exactly ``image_size``."""
    sizes = []
    side = grid
    while side * 2 < image_size:
        side *= 2
        sizes.append(side)
    sizes.append(image_size)
    return sizes


class MaskDecoder(nn.Module):
    """Segmentation logits at input resolution from the patch tokens of a few ViT blocks.

    Each tapped block's tokens are layer-normed, projected by a Linear and laid out on
    the patch grid. The deepest block starts the decoder; every stage upsamples 2x
    (bilinear; the last stage goes to ``image_size`` exactly) and applies a 3x3 conv +
    GELU with half the channels of the stage before (at least 8). The shallower blocks
    join, deepest first, at the first stages: upsampled to the stage size and
    concatenated before its conv, so finer stages see earlier, more local features.
    A 1x1 conv gives one logit per pixel; the export turns ``logit > 0`` (sigmoid > 0.5)
    into a 0/1 mask.

    Only ops that export to plain ONNX (LayerNorm, MatMul, Resize, Conv) are used.
    """

    def __init__(self, *, width: int, grid: int, image_size: int, blocks: Sequence[int], channels: int = 256):
        super().__init__()
        blocks = [int(b) for b in blocks]
        if not blocks or blocks != sorted(set(blocks)) or blocks[0] < 0:
            raise ValueError(f"blocks must be distinct ascending block indices, got {blocks}")
        sizes = upsample_sizes(grid, image_size)
        if len(blocks) - 1 > len(sizes):
            raise ValueError(
                f"{len(blocks)} blocks need {len(blocks) - 1} stages; grid {grid} gives {len(sizes)}"
            )
        if channels < MIN_DECODER_CHANNELS:
            raise ValueError(f"channels must be >= {MIN_DECODER_CHANNELS}, got {channels}")
        self.width, self.grid, self.image_size, self.channels = width, grid, image_size, channels
        self.blocks = tuple(blocks)
        self.sizes = tuple(sizes)

        stage_channels = [max(channels >> (k + 1), MIN_DECODER_CHANNELS) for k in range(len(sizes))]
        taps = len(blocks)
        # Tap i (shallow to deep) joins at stage taps - 2 - i; the deepest tap starts the decoder.
        proj_channels = [stage_channels[taps - 2 - i] for i in range(taps - 1)] + [channels]
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in blocks)
        self.projs = nn.ModuleList(nn.Linear(width, c) for c in proj_channels)
        convs = []
        in_channels = channels
        for k, out_channels in enumerate(stage_channels):
            skip = stage_channels[k] if k < taps - 1 else 0
            convs.append(nn.Conv2d(in_channels + skip, out_channels, kernel_size=3, padding=1))
            in_channels = out_channels
        self.convs = nn.ModuleList(convs)
        self.head = nn.Conv2d(in_channels, 1, kernel_size=1)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments, as stored in the heads file."""
        return {
            "width": self.width,
            "grid": self.grid,
            "image_size": self.image_size,
            "blocks": list(self.blocks),
            "channels": self.channels,
        }

    def _grid_map(self, index: int, tokens: torch.Tensor) -> torch.Tensor:
        x = self.projs[index](self.norms[index](tokens))
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], self.grid, self.grid)

    def forward(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """Tokens of ``self.blocks``, shallow to deep, each [N, grid*grid, width] -> [N, S, S] logits."""
        taps = len(self.blocks)
        if len(tokens) != taps:
            raise ValueError(f"mask decoder needs tokens of {taps} blocks, got {len(tokens)}")
        x = self._grid_map(taps - 1, tokens[-1])
        for k, (size, conv) in enumerate(zip(self.sizes, self.convs, strict=True)):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            tap = taps - 2 - k
            if tap >= 0:
                skip = self._grid_map(tap, tokens[tap])
                skip = F.interpolate(skip, size=(size, size), mode="bilinear", align_corners=False)
                x = torch.cat([x, skip], dim=1)
            x = F.gelu(conv(x))
        return self.head(x).squeeze(1)


# --------------------------------------------------------------------------- LoRA


class LoraDelta(nn.Module):
    """Parametrization ``W -> W + (alpha / rank) * B @ A``: LoRA applied on the fly, base weight untouched.

    Registered with ``torch.nn.utils.parametrize`` so it works the same for ``nn.Linear``
    weights and for ``nn.MultiheadAttention.in_proj_weight``, which torch consumes
    inside its fused attention call where no per-activation hook can reach.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
        super().__init__()
        self.A = nn.Parameter(a.detach().clone().float())
        self.B = nn.Parameter(b.detach().clone().float())
        self.scale = alpha / a.shape[0]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.B @ self.A).to(weight.dtype)


def check_lora(lora: Any, where: str = "lora") -> None:
    """Raise HeadsError unless ``lora`` follows the LoRA part of the heads format (see module docstring)."""
    if not isinstance(lora, dict) or not lora:
        raise HeadsError(f"{where}: must be a non-empty dict of parameter name -> {{A, B, alpha}}")
    for name, entry in lora.items():
        if not isinstance(entry, dict) or set(entry) != {"A", "B", "alpha"}:
            got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise HeadsError(f"{where}: entry '{name}' must have exactly A, B and alpha, got {got}")
        a, b, alpha = entry["A"], entry["B"], entry["alpha"]
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.ndim == 2 and b.ndim == 2):
            raise HeadsError(f"{where}: entry '{name}' needs 2-D tensors A [rank, in] and B [out, rank]")
        if a.shape[0] != b.shape[1] or a.shape[0] < 1:
            raise HeadsError(
                f"{where}: entry '{name}' has A {list(a.shape)} and B {list(b.shape)}; "
                "A's rows must equal B's columns (the rank)"
            )
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
            raise HeadsError(f"{where}: entry '{name}' alpha must be a positive number, got {alpha!r}")


def _lora_targets(model: nn.Module, lora: Mapping[str, Mapping[str, Any]]) -> dict[str, nn.Parameter]:
    """Map each LoRA entry to the model parameter it adapts, checking that the shapes fit."""
    params = dict(model.named_parameters())
    targets = {}
    for name, entry in lora.items():
        param = params.get(name)
        if param is None:
            raise HeadsError(f"lora: the model has no parameter '{name}'")
        delta_shape = (entry["B"].shape[0], entry["A"].shape[1])
        if param.ndim != 2 or tuple(param.shape) != delta_shape:
            raise HeadsError(f"lora: '{name}' is {list(param.shape)} but B @ A is {list(delta_shape)}")
        targets[name] = param
    return targets


def merge_lora(model: nn.Module, lora: Mapping[str, Mapping[str, Any]]) -> None:
    """Fold LoRA into the base weights in place (``W += alpha / rank * B @ A``), so export sees plain weights.

    The product is formed in float64, then added once, to keep the merged weights as
    close as float32 allows to the un-merged forward.
    """
    check_lora(lora)
    for name, param in _lora_targets(model, lora).items():
        entry = lora[name]
        a, b = entry["A"].double(), entry["B"].double()
        delta = (entry["alpha"] / a.shape[0]) * (b @ a)
        with torch.no_grad():
            param.copy_((param.double() + delta.to(param.device)).to(param.dtype))


def attach_lora(model: nn.Module, lora: Mapping[str, Mapping[str, Any]]) -> dict[str, LoraDelta]:
    """Apply LoRA un-merged, as trainable parametrizations; returns them by parameter name.

    The base weights stay as they are (freeze them for training); the returned modules
    hold ``A`` and ``B`` as parameters, whose values form the ``lora`` part of a heads file.
    """
    check_lora(lora)
    targets = _lora_targets(model, lora)
    attached = {}
    for name in targets:
        module_name, _, attr = name.rpartition(".")
        delta = LoraDelta(lora[name]["A"], lora[name]["B"], float(lora[name]["alpha"]))
        parametrize.register_parametrization(model.get_submodule(module_name), attr, delta)
        attached[name] = delta
    return attached


# --------------------------------------------------------------------------- heads file


@dataclass(frozen=True)
class Heads:
    """What one heads file holds; any part may be absent."""

    quality: QualityHead | None = None
    mask: MaskDecoder | None = None
    lora: dict[str, dict[str, Any]] | None = None


def save_heads(
    path: str | os.PathLike[str],
    *,
    quality: QualityHead | None = None,
    mask: MaskDecoder | None = None,
    lora: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Write a heads file (format in the module docstring); at least one part must be given."""
    if quality is None and mask is None and lora is None:
        raise HeadsError("save_heads needs at least one of quality, mask, lora")
    data: dict[str, Any] = {"format": HEADS_FORMAT, "version": HEADS_VERSION}
    for key, head in (("quality", quality), ("mask", mask)):
        if head is not None:
            state = {k: v.detach().cpu() for k, v in head.state_dict().items()}
            data[key] = {"config": head.config, "state_dict": state}
    if lora is not None:
        check_lora(dict(lora))
        data["lora"] = {
            name: {"A": e["A"].detach().cpu(), "B": e["B"].detach().cpu(), "alpha": float(e["alpha"])}
            for name, e in lora.items()
        }
    torch.save(data, Path(path))


_Head = TypeVar("_Head", QualityHead, MaskDecoder)


def _load_head(path: Path, key: str, entry: Any, cls: type[_Head]) -> _Head:
    where = f"heads file {path}: '{key}'"
    if not isinstance(entry, dict) or set(entry) != {"config", "state_dict"}:
        raise HeadsError(f"{where} must be a dict with exactly 'config' and 'state_dict'")
    config, state = entry["config"], entry["state_dict"]
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise HeadsError(f"{where}: 'config' and 'state_dict' must be dicts")
    try:
        head = cls(**config)
    except (TypeError, ValueError) as exc:
        raise HeadsError(f"{where}: bad config {config} ({exc})") from exc
    problem = state_mismatch(head, state)
    if problem:
        raise HeadsError(f"{where}: state_dict does not fit its config: {problem}")
    head.load_state_dict(state, strict=True)
    return head.eval()


def load_heads(path: str | os.PathLike[str]) -> Heads:
    """Read and strictly check a heads file; every problem is one HeadsError line naming the file."""
    path = Path(path)
    data = read_torch_file(path, HeadsError, "heads file")
    if not isinstance(data, dict):
        raise HeadsError(f"heads file {path}: holds a {type(data).__name__}, not a dict")
    if data.get("format") != HEADS_FORMAT:
        raise HeadsError(f"heads file {path}: 'format' must be '{HEADS_FORMAT}', got {data.get('format')!r}")
    if data.get("version") != HEADS_VERSION:
        version = data.get("version")
        raise HeadsError(f"heads file {path}: unsupported version {version!r} (reads {HEADS_VERSION})")
    unknown = sorted(set(data) - {"format", "version", "quality", "mask", "lora"})
    if unknown:
        raise HeadsError(f"heads file {path}: unknown key(s) {', '.join(map(str, unknown))}")
    if not {"quality", "mask", "lora"} & set(data):
        raise HeadsError(f"heads file {path}: holds none of quality, mask, lora")
    quality = _load_head(path, "quality", data["quality"], QualityHead) if "quality" in data else None
    mask = _load_head(path, "mask", data["mask"], MaskDecoder) if "mask" in data else None
    lora = data.get("lora")
    if lora is not None:
        check_lora(lora, f"heads file {path}: 'lora'")
    return Heads(quality=quality, mask=mask, lora=lora)
