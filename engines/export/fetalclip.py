"""FetalCLIP (an open_clip ViT CLIP) and its students for export: configs, checkpoints, prompts, ONNX export.

The exported graph (:class:`FetalClipExport`) holds only the image tower: it takes
uint8 frames, normalises them in-graph, and scores planes against class embeddings
that are computed once from text prompts and stored as a constant. The text tower
never reaches the runtime, which needs neither torch nor a tokenizer.

The image tower is either open_clip's plain ViT (FetalCLIP's ViT-L/14, the tiny test
config) or a timm tower (MobileFetalCLIP's student, open_clip's ``MobileCLIP2-S0``: a
FastViT), which is exported reparameterized.

torch and open_clip are needed here (export and the torch reference engine) but
never by the ONNX Runtime pipeline.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import convert_to_custom_text_state_dict
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from timm.models import reparameterize_model
from torch import nn
from tqdm import tqdm

from engines.export.heads import MaskDecoder, QualityHead, read_torch_file, state_mismatch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
DEFAULT_PROMPTS = PROMPTS_DIR / "fetal_planes.json"
PROMPTS_FORMAT = "sweepstream-prompts"
TORCH_FORMAT = "sweepstream-torch"
TORCH_FORMAT_VERSION = 1

CLIP_MEAN = tuple(open_clip.OPENAI_DATASET_MEAN)
CLIP_STD = tuple(open_clip.OPENAI_DATASET_STD)
LOGIT_SCALE = 100.0
"""Zero-shot logits are this times the cosine similarity, as in CLIP's trained temperature."""
RESIZES = ("bicubic", "bilinear")
"""open_clip interpolations a bundle can state as its ``input.resize``."""
_PREPROCESS_KEYS = {"size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color"}

ImageTower = VisionTransformer | TimmModel

_KNOWN_VITS = {
    (768, 12, 32): "ViT-B/32",
    (768, 12, 16): "ViT-B/16",
    (1024, 24, 14): "ViT-L/14",
    (1280, 32, 14): "ViT-H/14",
}
_SHOWN_KEYS = 3


class CheckpointError(ValueError):
    """A weights file cannot be read, or does not fit the model built from the config."""


class ConfigError(ValueError):
    """A model config or prompts file is missing or malformed."""


# --------------------------------------------------------------------------- configs and model


def load_config(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return a model config: a bundled name (``fetalclip``, ``tiny``), a JSON file path, or an open_clip
    model name (``MobileCLIP2-S0``, MobileFetalCLIP's student; see ``open_clip.list_models()``).

    The config has open_clip's ``CLIP(embed_dim, vision_cfg, text_cfg)`` shape, plus open_clip's
    optional ``custom_text`` and ``preprocess_cfg`` keys. The image tower is a plain ViT or a
    timm model; the text tower is open_clip's own, since prompts are encoded with its BPE
    tokenizer at ``text_cfg.context_length``.
    """
    bundled = CONFIG_DIR / f"{name_or_path}.json"
    path = bundled if bundled.is_file() else Path(name_or_path)
    if path.is_file():
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config {path}: invalid JSON ({exc})") from exc
    elif str(name_or_path) in open_clip.list_models():
        cfg = open_clip.get_model_config(str(name_or_path))
    else:
        names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
        raise ConfigError(
            f"config {name_or_path}: neither a bundled config ({names}), a file, nor an open_clip model name"
        )
    where = f"config {path}"
    if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
        raise ConfigError(f"{where}: needs embed_dim, vision_cfg and text_cfg")
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    plain_vit = isinstance(vision, dict) and isinstance(vision.get("layers"), int)
    timm_tower = isinstance(vision, dict) and isinstance(vision.get("timm_model_name"), str)
    if plain_vit == timm_tower:
        raise ConfigError(f"{where}: vision_cfg must describe a plain ViT (integer 'layers') or a timm model")
    if not isinstance(text, dict) or not isinstance(text.get("context_length"), int):
        raise ConfigError(f"{where}: text_cfg needs an integer context_length")
    foreign = sorted({"hf_model_name", "hf_tokenizer_name"} & set(text) | {"multimodal_cfg"} & set(cfg))
    if foreign:
        problem = f"needs open_clip's own text tower and tokenizer, has {', '.join(foreign)}"
        raise ConfigError(f"{where}: {problem}")
    input_preprocessing(cfg, where)
    return cfg


def is_timm_tower(cfg: Mapping[str, Any]) -> bool:
    """Whether the config's image tower is a timm model (exported reparameterized) rather than a plain ViT."""
    return "timm_model_name" in cfg["vision_cfg"]


def build_model(cfg: Mapping[str, Any]) -> open_clip.CLIP | open_clip.CustomTextCLIP:
    """Build an open_clip CLIP (``CustomTextCLIP`` if the config says ``custom_text``) with random weights,
    in eval mode. A timm tower is built with ``timm_model_pretrained`` off: weights are never fetched."""
    kwargs = {key: value for key, value in cfg.items() if key not in ("custom_text", "preprocess_cfg")}
    if is_timm_tower(cfg):
        kwargs["vision_cfg"] = {**cfg["vision_cfg"], "timm_model_pretrained": False}
    model_class = open_clip.CustomTextCLIP if cfg.get("custom_text") else open_clip.CLIP
    try:
        return model_class(**kwargs).eval()
    except TypeError as exc:  # an unknown key in the config's vision_cfg / text_cfg
        raise ConfigError(f"config: not an open_clip CLIP config: {exc}") from None


def image_tower(model: open_clip.CLIP | open_clip.CustomTextCLIP) -> ImageTower:
    """The model's image tower in its exported form.

    A timm tower is reparameterized in place (timm's ``reparameterize_model``: FastViT's
    train-time branches and their BatchNorms fold into single convolutions), the form
    MobileCLIP is deployed in: the same outputs from fewer, fused layers.
    """
    visual = model.visual
    if isinstance(visual, TimmModel):
        reparameterize_model(visual, inplace=True)
    return visual


@dataclass(frozen=True)
class InputPreprocessing:
    """How a checkpoint's images were normalised and resized: the graph's mean/std, the bundle's resize."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str


def input_preprocessing(cfg: Mapping[str, Any], where: str = "config") -> InputPreprocessing:
    """The preprocessing open_clip gives a checkpoint file of this config: its defaults (CLIP mean/std,
    bicubic) under the config's own ``preprocess_cfg``, if any.

    ``resize_mode`` and ``fill_color`` are not followed: a bundle's frames are always
    zero-padded to square before the resize (FetalCLIP's preprocessing; open_clip's default
    centre crop would cut the sides of the ultrasound fan). The size is the image tower's.
    """
    given = cfg.get("preprocess_cfg", {})
    if not isinstance(given, dict) or not set(given) <= _PREPROCESS_KEYS:
        raise ConfigError(f"{where}: preprocess_cfg must be a dict of {', '.join(sorted(_PREPROCESS_KEYS))}")
    mean, std = given.get("mean", CLIP_MEAN), given.get("std", CLIP_STD)
    resize = given.get("interpolation", "bicubic")
    for key, values in (("mean", mean), ("std", std)):
        numbers = isinstance(values, list | tuple) and len(values) == 3
        if not numbers or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{where}: preprocess_cfg.{key} must be 3 numbers, got {values!r}")
    if not all(v > 0 for v in std):
        raise ConfigError(f"{where}: preprocess_cfg.std must be positive, got {std!r}")
    if resize not in RESIZES:
        choices = ", ".join(RESIZES)
        raise ConfigError(f"{where}: preprocess_cfg.interpolation must be one of {choices}, got {resize!r}")
    return InputPreprocessing(tuple(map(float, mean)), tuple(map(float, std)), resize)


def make_tokenizer(cfg: Mapping[str, Any]) -> open_clip.SimpleTokenizer:
    """open_clip's BPE tokenizer (its vocabulary ships with the package) at the config's context length."""
    return open_clip.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])


# --------------------------------------------------------------------------- checkpoints


def _vit_geometry(state: Mapping[str, Any]) -> tuple[int, int, int] | None:
    """(width, layers, patch) of the image tower in a CLIP state dict, or None if it has no ViT."""
    conv = state.get("visual.conv1.weight")
    if not isinstance(conv, torch.Tensor) or conv.ndim != 4:
        return None
    prefix = "visual.transformer.resblocks."
    layers = len({key[len(prefix) :].split(".")[0] for key in state if key.startswith(prefix)})
    return int(conv.shape[0]), layers, int(conv.shape[-1])


def _text_geometry(state: Mapping[str, Any]) -> tuple[int, int, int] | None:
    """(context length, width, layers) of the text tower in a CLIP state dict, or None."""
    pos = state.get("positional_embedding")
    if not isinstance(pos, torch.Tensor) or pos.ndim != 2:
        return None
    prefix = "transformer.resblocks."
    layers = len({key[len(prefix) :].split(".")[0] for key in state if key.startswith(prefix)})
    return int(pos.shape[0]), int(pos.shape[1]), layers


def _describe_vit(geometry: tuple[int, int, int]) -> str:
    width, layers, patch = geometry
    core = f"width {width}, {layers} layers, patch {patch}"
    name = _KNOWN_VITS.get(geometry)
    return f"a {name} ({core})" if name else f"a ViT with {core}"


def _describe_tower(state: Mapping[str, Any]) -> str | None:
    """The image tower of a CLIP state dict in words, or None if it is neither a ViT nor a timm model."""
    vit = _vit_geometry(state)
    if vit is not None:
        return _describe_vit(vit)
    return "a timm image tower" if any(key.startswith("visual.trunk.") for key in state) else None


def _architecture_problem(state: Mapping[str, Any], expected: Mapping[str, Any], label: str) -> str | None:
    """Name a wrong architecture in words before falling back to key-by-key differences."""
    got_tower, want_tower = _describe_tower(state), _describe_tower(expected)
    if got_tower is not None and want_tower is not None and got_tower != want_tower:
        return f"is {got_tower}; config '{label}' expects {want_tower}"
    got_text, want_text = _text_geometry(state), _text_geometry(expected)
    if got_text is not None and want_text is not None and got_text != want_text:

        def words(g: tuple[int, int, int]) -> str:
            return f"context {g[0]}, width {g[1]}, {g[2]} layers"

        return f"has a text tower with {words(got_text)}; config '{label}' expects {words(want_text)}"
    return None


def load_checkpoint(
    model: open_clip.CLIP | open_clip.CustomTextCLIP,
    path: str | os.PathLike[str],
    *,
    config_label: str = "model",
) -> None:
    """Load CLIP weights strictly from ``{"state_dict": ...}`` or a bare state dict (``module.`` stripped).

    A ``CustomTextCLIP`` (MobileCLIP) also takes a checkpoint saved with CLIP's text-tower
    names, converted as open_clip itself does.

    Every failure is one CheckpointError line naming the file: unreadable, not a state
    dict, a different ViT or text tower than the config (said in words), or the counts
    and first few of missing / unexpected / mis-shaped keys.
    """
    path = Path(path)
    data = read_torch_file(path, CheckpointError, "checkpoint")
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path}: holds a {type(data).__name__}, not a state dict")
    state = data.get("state_dict", data)
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"checkpoint {path}: 'state_dict' is not a non-empty dict")
    odd = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        keys = ", ".join(map(str, odd[:_SHOWN_KEYS]))
        raise CheckpointError(
            f"checkpoint {path}: not a state dict: {len(odd)} entries are not name -> tensor ({keys})"
        )
    stripped = {k.removeprefix("module."): v for k, v in state.items()}
    if len(stripped) != len(state):
        raise CheckpointError(f"checkpoint {path}: keys clash once the 'module.' prefix is stripped")
    if isinstance(model, open_clip.CustomTextCLIP):
        stripped = convert_to_custom_text_state_dict(stripped)

    architecture = _architecture_problem(stripped, model.state_dict(), config_label)
    if architecture:
        raise CheckpointError(f"checkpoint {path} {architecture}")
    mismatch = state_mismatch(model, stripped)
    if mismatch:
        raise CheckpointError(f"checkpoint {path} does not fit config '{config_label}': {mismatch}")
    model.load_state_dict(stripped, strict=True)


# --------------------------------------------------------------------------- prompts


def load_prompts(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Read a prompts file and return its classes in file order, which is the ``planes`` output order.

    Format: ``{"format": "sweepstream-prompts", "version": 1, "classes": {name: [prompt, ...]}}``.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"prompts {path}: cannot read ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"prompts {path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != PROMPTS_FORMAT or data.get("version") != 1:
        raise ConfigError(f'prompts {path}: needs "format": "{PROMPTS_FORMAT}" and "version": 1')
    unknown = sorted(set(data) - {"format", "version", "description", "classes"})
    if unknown:
        raise ConfigError(f"prompts {path}: unknown key(s) {', '.join(unknown)}")
    classes = data.get("classes")
    if not isinstance(classes, dict) or len(classes) < 2:
        raise ConfigError(f"prompts {path}: 'classes' must map at least 2 class names to prompt lists")
    for name, prompts in classes.items():
        if not name or not isinstance(prompts, list) or not prompts:
            raise ConfigError(f"prompts {path}: class '{name}' needs a non-empty list of prompts")
        if not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ConfigError(f"prompts {path}: class '{name}' has an empty or non-string prompt")
    return {name: list(prompts) for name, prompts in classes.items()}


def class_embeddings(
    model: open_clip.CLIP, tokenizer: open_clip.SimpleTokenizer, prompts: Mapping[str, Sequence[str]]
) -> torch.Tensor:
    """[C, D] float32 class embeddings: per class, the re-normalised mean of its normalised prompt embeddings.

    A prompt longer than the text tower's context would be cut silently by the
    tokenizer, so it is refused instead.
    """
    limit = tokenizer.context_length - 2  # start and end tokens
    rows = []
    with torch.no_grad():
        for name, texts in tqdm(prompts.items(), desc="encode prompts", unit="class"):
            for text in texts:
                length = len(tokenizer.encode(text))
                if length > limit:
                    problem = f"prompt for class '{name}' has {length} tokens, limit {limit}: {text!r}"
                    raise ConfigError(problem)
            features = F.normalize(model.encode_text(tokenizer(list(texts))).float(), dim=-1)
            rows.append(F.normalize(features.mean(dim=0), dim=-1))
    return torch.stack(rows)


# --------------------------------------------------------------------------- export module


def _output_dim(visual: ImageTower) -> int:
    """Width of the tower's image features: a ViT's ``output_dim``; for a timm tower, its last linear layer
    (open_clip's projection if it adds one, else the timm head's classifier sized to the embedding)."""
    if isinstance(visual, VisionTransformer):
        return visual.output_dim
    linears = [module for module in visual.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError("the timm image tower has no linear output layer to give its feature width")
    return linears[-1].out_features


def pixel_affine(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, 3, 1, 1] scale and shift that take 0..255 grey replicated to 3 channels to the checkpoint's
    normalised input in one multiply-add (the export graph's and the heads trainer's)."""
    mean_t = torch.tensor(tuple(map(float, mean)), dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(tuple(map(float, std)), dtype=torch.float32).view(1, 3, 1, 1)
    return 1.0 / (255.0 * std_t), -mean_t / std_t


def tower_outputs(visual: ImageTower, x: torch.Tensor, blocks: Sequence[int] | None
                  ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Image features [N, D] and, when ``blocks`` are given, those ViT blocks' tokens [N, L, W] (NLC, no
    class token) for a mask decoder: the export graph's and the heads trainer's forward."""
    if blocks is None:
        return visual(x), None
    out = visual.forward_intermediates(x, indices=list(blocks), output_fmt="NLC")
    return out["image_features"], out["image_intermediates"]


class FetalClipExport(nn.Module):
    """The runtime graph: uint8 frames [N, S, S] -> embedding, planes, and optional quality and mask.

    In order: cast to float, scale to [0, 1], replicate the grey channel to 3 and
    normalise with ``mean``/``std`` (the checkpoint's, CLIP's by default; one broadcast
    multiply-add), run the image tower (a ViT, or a reparameterized timm tower), then the
    heads; the mask decoder reads ViT blocks, so it needs a ViT. Outputs, named by
    :attr:`output_names`:

    - ``embedding`` [N, D] float32, L2-normalised image features;
    - ``planes`` [N, C] float32, softmax of ``100 * cosine`` against the class embeddings;
    - ``quality`` [N] float32 in [0, 1], if a QualityHead is given;
    - ``mask`` [N, S, S] uint8 0/1 (sigmoid of the logit > 0.5), if a MaskDecoder is given.
    """

    def __init__(
        self,
        visual: ImageTower,
        class_embeddings: torch.Tensor,
        *,
        quality: QualityHead | None = None,
        mask: MaskDecoder | None = None,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> None:
        super().__init__()
        if not isinstance(visual, ImageTower):
            kind = type(visual).__name__
            raise TypeError(f"visual must be an open_clip VisionTransformer or TimmModel, got {kind}")
        height, width = visual.image_size
        if height != width:
            raise ValueError(f"the image tower must take square images, got {height}x{width}")
        dim = _output_dim(visual)
        if class_embeddings.ndim != 2 or class_embeddings.shape[0] < 2 or class_embeddings.shape[1] != dim:
            raise ValueError(f"class_embeddings must be [C >= 2, {dim}], got {list(class_embeddings.shape)}")
        if quality is not None and quality.in_features != dim:
            raise ValueError(f"quality head takes {quality.in_features} features, image tower gives {dim}")
        if mask is not None and not isinstance(visual, VisionTransformer):
            raise ValueError(f"mask decoder {mask.config} does not fit the image tower: it reads ViT blocks")
        if mask is not None:
            expected = {"width": visual.transformer.width, "grid": visual.grid_size[0], "image_size": height}
            got = {key: mask.config[key] for key in expected}
            if got != expected or mask.blocks[-1] >= len(visual.transformer.resblocks):
                raise ValueError(
                    f"mask decoder {mask.config} does not fit the image tower "
                    f"({expected}, {len(visual.transformer.resblocks)} blocks)"
                )
        self.image_size = height
        self.embed_dim = dim
        self.visual = visual
        self.quality = quality
        self.mask = mask
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))
        self.register_buffer("class_embeddings", class_embeddings.detach().clone().float())
        scale, shift = pixel_affine(self.mean, self.std)
        self.register_buffer("pixel_scale", scale)
        self.register_buffer("pixel_shift", shift)
        optional = (("quality", quality), ("mask", mask))
        self.output_names = ("embedding", "planes", *(name for name, head in optional if head is not None))

    @property
    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each output without the batch dimension."""
        shapes = {
            "embedding": (self.embed_dim,),
            "planes": (self.class_embeddings.shape[0],),
            "quality": (),
            "mask": (self.image_size, self.image_size),
        }
        return {name: shapes[name] for name in self.output_names}

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """uint8 [N, S, S] -> the outputs in :attr:`output_names` order."""
        x = image.to(torch.float32).unsqueeze(1) * self.pixel_scale + self.pixel_shift
        features, tokens = tower_outputs(self.visual, x, None if self.mask is None else self.mask.blocks)
        embedding = F.normalize(features, dim=-1)
        planes = torch.softmax(LOGIT_SCALE * embedding @ self.class_embeddings.T, dim=-1)
        outputs = [embedding, planes]
        if self.quality is not None:
            outputs.append(self.quality(features))
        if self.mask is not None:
            # Through float: TensorRT converts uint8 only from or to float/half, never from bool.
            outputs.append((self.mask(tokens) > 0).to(torch.float32).to(torch.uint8))
        return tuple(outputs)


def export_onnx(
    wrapper: FetalClipExport, path: str | os.PathLike[str], *, opset: int = 17, max_batch: int = 32
) -> Path:
    """Export to one self-contained ONNX file with input ``image`` and the wrapper's named outputs.

    The batch axis is dynamic (``max_batch`` 1 exports a fixed batch of 1). Uses the
    TorchScript exporter: opset >= 17 keeps LayerNorm one node, the MHA fast path is
    off so attention exports as plain MatMul/Softmax, and an example batch of 2 keeps
    the tracer from folding the batch size into the graph. The exporter's guesses for
    the output shapes (some symbolic, one wrong) are replaced by the known ones, so
    every backend reads e.g. ``mask`` as [batch, 224, 224]. Weights stay inside the
    file (fp32 ViT-L is ~1.2 GB, below protobuf's 2 GB) because a bundle hashes one file.
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17 (LayerNormalization), got {opset}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    path = Path(path)
    names = list(wrapper.output_names)
    example = torch.zeros((min(2, max_batch), wrapper.image_size, wrapper.image_size), dtype=torch.uint8)
    dynamic_axes = {name: {0: "batch"} for name in ["image", *names]} if max_batch > 1 else None
    wrapper.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with tqdm(total=3, desc="export onnx", unit="step") as progress:
        progress.set_postfix_str("trace and write")
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # Known noise: the legacy exporter's deprecation notices, and MHA's shape asserts
                # (constant for a given model) seen by the tracer. Our own code's warnings still show.
                warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
                warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
                warnings.filterwarnings(
                    "ignore", category=torch.jit.TracerWarning, module=r"torch\.nn\.functional"
                )
                torch.onnx.export(
                    wrapper,
                    (example,),
                    str(path),
                    dynamo=False,
                    input_names=["image"],
                    output_names=names,
                    opset_version=opset,
                    dynamic_axes=dynamic_axes,
                    do_constant_folding=True,
                )
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        progress.update()

        progress.set_postfix_str("set output shapes")
        model = onnx.load(str(path))
        for output in model.graph.output:
            dims = output.type.tensor_type.shape.dim
            del dims[:]
            batch = dims.add()
            if max_batch > 1:
                batch.dim_param = "batch"
            else:
                batch.dim_value = 1
            for size in wrapper.output_shapes[output.name]:
                dims.add().dim_value = size
        onnx.save(model, str(path))
        del model
        progress.update()

        progress.set_postfix_str("onnx.checker")
        onnx.checker.check_model(str(path))  # the path form also works for models near protobuf's limit
        progress.update()
    return path


# --------------------------------------------------------------------------- torch artefact


def save_torch_artifact(
    wrapper: FetalClipExport, cfg: Mapping[str, Any], path: str | os.PathLike[str]
) -> Path:
    """Save all the torch engine needs to rebuild ``wrapper`` (no checkpoint, prompts or heads file)."""
    data = {
        "format": TORCH_FORMAT,
        "version": TORCH_FORMAT_VERSION,
        "config": dict(cfg),
        "num_classes": int(wrapper.class_embeddings.shape[0]),
        "quality": wrapper.quality.config if wrapper.quality is not None else None,
        "mask": wrapper.mask.config if wrapper.mask is not None else None,
        "state_dict": {k: v.detach().cpu() for k, v in wrapper.state_dict().items()},
    }
    path = Path(path)
    torch.save(data, path)
    return path


def load_torch_artifact(path: str | os.PathLike[str]) -> FetalClipExport:
    """Rebuild a :class:`FetalClipExport` from :func:`save_torch_artifact`'s file, in eval mode on CPU.

    Modules are built on the meta device and take the saved tensors directly, so the
    ViT is neither randomly initialised nor held twice in memory; a timm tower is
    reparameterized first, as it was when saved.
    """
    path = Path(path)
    data = read_torch_file(path, CheckpointError, "torch model")
    keys = {"format", "version", "config", "num_classes", "quality", "mask", "state_dict"}
    if not isinstance(data, dict) or data.get("format") != TORCH_FORMAT or set(data) != keys:
        raise CheckpointError(f"torch model {path}: not a {TORCH_FORMAT} file")
    if data["version"] != TORCH_FORMAT_VERSION:
        raise CheckpointError(f"torch model {path}: unsupported version {data['version']!r}")
    preprocessing = input_preprocessing(data["config"])
    with torch.device("meta"):
        visual = image_tower(build_model(data["config"]))
        embeddings = torch.empty(data["num_classes"], _output_dim(visual))
        quality = QualityHead(**data["quality"]) if data["quality"] is not None else None
        mask = MaskDecoder(**data["mask"]) if data["mask"] is not None else None
    wrapper = FetalClipExport(
        visual, embeddings, quality=quality, mask=mask, mean=preprocessing.mean, std=preprocessing.std
    )
    problem = state_mismatch(wrapper, data["state_dict"])
    if problem:
        raise CheckpointError(f"torch model {path}: state_dict does not fit its config: {problem}")
    wrapper.load_state_dict(data["state_dict"], strict=True, assign=True)
    left_on_meta = [name for name, t in [*wrapper.named_parameters(), *wrapper.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise CheckpointError(f"torch model {path}: no values for {', '.join(left_on_meta[:_SHOWN_KEYS])}")
    return wrapper.eval()
