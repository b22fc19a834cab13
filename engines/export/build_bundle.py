"""Build a FetalCLIP model bundle: checkpoint (+ heads, LoRA) + prompts -> ONNX + bundle.json (+ torch model).

Needs torch and open_clip (``pip install .[export]``); the bundle it writes runs with
ONNX Runtime alone. Weights are never downloaded: bring your own ``FetalCLIP_weights.pt``,
or a MobileFetalCLIP student checkpoint with ``--config MobileCLIP2-S0``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from engines.bundle import Bundle, BundleError, file_sha256, load_bundle, write_manifest
from engines.export.fetalclip import (
    DEFAULT_PROMPTS,
    CheckpointError,
    ConfigError,
    FetalClipExport,
    build_model,
    class_embeddings,
    export_onnx,
    image_tower,
    input_preprocessing,
    is_timm_tower,
    load_checkpoint,
    load_config,
    load_prompts,
    make_tokenizer,
    save_torch_artifact,
)
from engines.export.heads import HeadsError, load_heads, merge_lora
from engines.export.quantize import (
    INT8_NAME,
    QuantizationGateError,
    gate_table,
    quantize_bundle_int8,
    row_cosines,
)

ONNX_NAME = "model.onnx"
TORCH_NAME = "torch_model.pt"
MAX_BATCH = 32
BEST_PLANE = "abdomen"
LICENSE_NOTE = (
    "Bundle code and manifest: Apache-2.0. The FetalCLIP weights inside carry their own licence, "
    "which governs any use or redistribution of this bundle. Research use only; not for clinical use."
)
# Build-time ORT vs torch agreement on random frames; the tests hold tighter bounds.
MIN_COSINE = 0.9999
MAX_PROB_DIFF = 1e-3
MAX_QUALITY_DIFF = 1e-4
MIN_MASK_AGREEMENT = 0.999


class ParityError(RuntimeError):
    """The exported ONNX model disagrees with the torch module it came from."""


@dataclass
class BuildResult:
    """What a build produced: the loaded bundle, ORT-vs-torch agreement, seconds per step, and the int8
    gate (``model.int8.gate``) when --int8 was asked for."""

    bundle: Bundle
    parity: dict[str, float]
    timings: dict[str, float] = field(default_factory=dict)
    int8_gate: dict | None = None


def check_parity(wrapper: FetalClipExport, onnx_path: Path, frames: int, seed: int = 0) -> dict[str, float]:
    """Run the same random uint8 frames through ONNX Runtime and torch; return and check agreement."""
    print(f"parity on {frames} random frames (onnxruntime vs torch):", flush=True)
    rng = np.random.default_rng(seed)
    batch = rng.integers(0, 256, (frames, wrapper.image_size, wrapper.image_size), dtype=np.uint8)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = list(wrapper.output_names)
    got = dict(zip(names, session.run(names, {"image": batch}), strict=True))
    with torch.no_grad():
        want = {n: t.numpy() for n, t in zip(names, wrapper(torch.from_numpy(batch)), strict=True)}

    cosine = row_cosines(got["embedding"], want["embedding"])
    stats = {
        "embedding_cosine_min": float(cosine.min()),
        "planes_max_abs_diff": float(np.abs(got["planes"] - want["planes"]).max()),
        "planes_top1_agreement": float(np.mean(got["planes"].argmax(1) == want["planes"].argmax(1))),
    }
    if "quality" in got:
        stats["quality_max_abs_diff"] = float(np.abs(got["quality"] - want["quality"]).max())
    if "mask" in got:
        stats["mask_agreement"] = float(np.mean(got["mask"] == want["mask"]))
    for key, value in stats.items():
        print(f"  {key}: {value:.7f}")

    failures = []
    if stats["embedding_cosine_min"] < MIN_COSINE:
        failures.append(f"embedding cosine {stats['embedding_cosine_min']:.6f} < {MIN_COSINE}")
    if stats["planes_max_abs_diff"] > MAX_PROB_DIFF:
        failures.append(f"planes differ by {stats['planes_max_abs_diff']:.2e} > {MAX_PROB_DIFF}")
    if stats.get("quality_max_abs_diff", 0.0) > MAX_QUALITY_DIFF:
        failures.append(f"quality differs by {stats['quality_max_abs_diff']:.2e} > {MAX_QUALITY_DIFF}")
    if stats.get("mask_agreement", 1.0) < MIN_MASK_AGREEMENT:
        failures.append(f"mask agreement {stats['mask_agreement']:.5f} < {MIN_MASK_AGREEMENT}")
    if failures:
        raise ParityError(f"{onnx_path}: ONNX Runtime disagrees with torch: {'; '.join(failures)}")
    return stats


def manifest_outputs(
    wrapper: FetalClipExport, classes: list[str], descriptions: dict[str, str] | None = None
) -> dict[str, dict]:
    """The manifest's ``outputs`` for an exported wrapper; ``descriptions`` overrides the default wording
    per output (other FetalCLIP-family models, e.g. the demo trainer's, describe their heads their way)."""
    shapes = wrapper.output_shapes
    outputs: dict[str, dict] = {
        "embedding": {
            "kind": "embedding",
            "shape": list(shapes["embedding"]),
            "dtype": "float32",
            "description": "L2-normalised FetalCLIP image embedding",
        },
        "planes": {
            "kind": "planes",
            "shape": list(shapes["planes"]),
            "dtype": "float32",
            "classes": classes,
            "description": "zero-shot plane probabilities: softmax of 100 x cosine to each class embedding",
        },
    }
    if "quality" in shapes:
        outputs["quality"] = {
            "kind": "quality",
            "shape": [],
            "dtype": "float32",
            "description": "probability that the frame is a good abdominal plane (quality head), in [0, 1]",
        }
    if "mask" in shapes:
        outputs["mask"] = {
            "kind": "mask",
            "shape": list(shapes["mask"]),
            "dtype": "uint8",
            "description": "segmentation mask from the mask decoder, 1 inside, 0 outside",
        }
    for name, text in (descriptions or {}).items():
        outputs[name]["description"] = text
    return outputs


def manifest_input(wrapper: FetalClipExport, resize: str) -> dict:
    """The manifest's ``input``: uint8 grey frames, zero-padded to square and resized with ``resize``,
    scaled and normalised inside the graph with the wrapper's mean/std (FetalClipExport)."""
    return {
        "name": "image",
        "size": wrapper.image_size,
        "channels": 1,
        "dtype": "uint8",
        "layout": "NHW",
        "pad_to_square": True,
        "resize": resize,
        "normalization": "in_graph",
        "mean": list(wrapper.mean),
        "std": list(wrapper.std),
    }


def tower_description(cfg: dict, wrapper: FetalClipExport) -> str:
    """The manifest's words for the exported image tower: FetalCLIP's ViT, or a student's timm tower."""
    vision = cfg["vision_cfg"]
    if not is_timm_tower(cfg):
        return (
            f"FetalCLIP image encoder (open_clip ViT, width {vision['width']}, {vision['layers']} layers, "
            f"patch {vision['patch_size']})"
        )
    params = sum(p.numel() for p in wrapper.visual.parameters()) / 1e6
    return (
        f"FetalCLIP student image encoder (open_clip timm {vision['timm_model_name']}, the MobileFetalCLIP "
        f"architecture, reparameterized: {params:.2f} M parameters, {wrapper.image_size} px)"
    )


def bundle_manifest(wrapper: FetalClipExport, cfg: dict, *, config: str, weights: Path, checkpoint_sha: str,
                    prompts: Path, class_prompts: list[str], heads: Path | None, model_entry: dict,
                    name: str | None, version: str, resize: str) -> dict:
    """The manifest of a built bundle: what it is, where it came from, its input, outputs and best-frame
    rule (engines.bundle validates it when it is written)."""
    parts = [f"zero-shot plane probabilities over {len(class_prompts)} classes"]
    if "quality" in wrapper.output_names:
        parts.append("a quality head")
    if "mask" in wrapper.output_names:
        parts.append("a mask decoder")
    source: dict = {
        "built_by": f"tools/build_bundle.py --config {config} --weights {weights.name}",
        "checkpoint_sha256": checkpoint_sha,
        "config": cfg,
        "prompts_sha256": file_sha256(prompts),
    }
    if heads is not None:
        source["heads_sha256"] = file_sha256(heads)
    manifest = {
        "format": "sweepstream-bundle",
        "format_version": 1,
        "name": name or ("fetalclip" if config == "fetalclip" else f"fetalclip-{Path(config).stem}"),
        "version": version,
        "description": (
            f"{tower_description(cfg, wrapper)} with {', '.join(parts)}; the text tower is not included. "
            "Research use only; not for clinical use."
        ),
        "license": LICENSE_NOTE,
        "source": source,
        "model": model_entry,
        "input": manifest_input(wrapper, resize),
        "batch": {"min": 1, "max": MAX_BATCH},
        "outputs": manifest_outputs(wrapper, class_prompts),
        "best_frame": {"output": "quality"}
        if "quality" in wrapper.output_names
        else {"output": "planes", "class": BEST_PLANE},
    }
    if "mask" in wrapper.output_names:
        manifest["pixel_spacing"] = {"source": "input"}
    return manifest


def build_bundle(
    weights: Path,
    out: Path,
    *,
    config: str = "fetalclip",
    prompts: Path = DEFAULT_PROMPTS,
    heads: Path | None = None,
    int8: bool = False,
    torch_model: bool = True,
    name: str | None = None,
    version: str = "1.0.0",
    check_frames: int = 3,
) -> BuildResult:
    """Build and write a bundle to ``out``; see ``--help`` for the steps. Returns the loaded bundle."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[step] = now - clock
        clock = now

    cfg = load_config(config)
    preprocessing = input_preprocessing(cfg)
    class_prompts = load_prompts(prompts)
    loaded_heads = load_heads(heads) if heads is not None else None
    if (loaded_heads is None or loaded_heads.quality is None) and BEST_PLANE not in class_prompts:
        raise ConfigError(
            f"prompts {prompts}: without a quality head the best frame is ranked by class "
            f"'{BEST_PLANE}', which the prompts lack"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    lap("read inputs")

    with tqdm(total=2, desc="load model", unit="step") as progress:
        progress.set_postfix_str("build")
        model = build_model(cfg)
        progress.update()
        progress.set_postfix_str(f"checkpoint {weights.name}")
        load_checkpoint(model, weights, config_label=config)
        checkpoint_sha = file_sha256(weights)
        progress.update()
    if loaded_heads is not None and loaded_heads.lora is not None:
        merge_lora(model, loaded_heads.lora)
    lap("load checkpoint")

    embeddings = class_embeddings(model, make_tokenizer(cfg), class_prompts)
    lap("encode prompts")

    try:
        wrapper = FetalClipExport(
            image_tower(model),
            embeddings,
            quality=loaded_heads.quality if loaded_heads is not None else None,
            mask=loaded_heads.mask if loaded_heads is not None else None,
            mean=preprocessing.mean,
            std=preprocessing.std,
        ).eval()
    except ValueError as exc:
        raise HeadsError(f"heads file {heads}: {exc}") from None
    # Only now, with every input read and checked, is the old bundle given up: a half-rebuilt one must
    # not load, but a bad checkpoint must not destroy a good one either.
    out.mkdir(parents=True, exist_ok=True)
    (out / "bundle.json").unlink(missing_ok=True)
    del model  # the text tower is done with; keep only the image tower in memory
    onnx_path = export_onnx(wrapper, out / ONNX_NAME, max_batch=MAX_BATCH)
    lap("export onnx")

    parity = check_parity(wrapper, onnx_path, check_frames)
    lap("parity check")

    model_entry: dict[str, str] = {"onnx": ONNX_NAME, "sha256": "", "precision": "fp32"}
    if torch_model:
        torch_path = save_torch_artifact(wrapper, cfg, out / TORCH_NAME)
        model_entry.update(torch=TORCH_NAME, torch_sha256=file_sha256(torch_path))
        lap("save torch model")
    else:
        (out / TORCH_NAME).unlink(missing_ok=True)

    manifest = bundle_manifest(wrapper, cfg, config=config, weights=weights, checkpoint_sha=checkpoint_sha,
                               prompts=prompts, class_prompts=list(class_prompts), heads=heads,
                               model_entry=model_entry, name=name, version=version,
                               resize=preprocessing.resize)
    bundle = write_manifest(out, manifest)
    lap("write manifest")
    if not int8:
        (out / INT8_NAME).unlink(missing_ok=True)  # left by an earlier build; no manifest names it
        return BuildResult(bundle=bundle, parity=parity, timings=timings)
    # After the fp32 bundle is complete: a failed gate (QuantizationGateError) leaves it valid, without int8.
    gate = quantize_bundle_int8(out)
    lap("int8 quantize and gate")
    return BuildResult(bundle=load_bundle(out), parity=parity, timings=timings, int8_gate=gate)


def main(argv: list[str] | None = None) -> int:
    """The `sweepstream-build-bundle` command: build the bundle, print where it is and how long each step
    took; one error line and exit 1 on a bad input or a failed check."""
    parser = argparse.ArgumentParser(
        description=(
            "Build a sweepstream model bundle from FetalCLIP weights (or a MobileFetalCLIP student's: "
            "--config MobileCLIP2-S0). Steps: load the checkpoint "
            "strictly into the open_clip model of --config; merge the LoRA of --heads, if any, into "
            "its weights; encode the --prompts of each plane class with the text tower into class "
            "embeddings; reparameterize a timm image tower (FastViT); "
            "export the image tower + class embeddings + heads to ONNX (uint8 frames in, "
            "normalisation in the graph, dynamic batch 1..32, no text tower); check it with "
            "onnx.checker and against torch with ONNX Runtime on random frames; save the torch "
            "reference model; write bundle.json; with --int8, add a gated int8 model (see "
            "sweepstream-quantize-bundle). The bundle then runs with ONNX Runtime alone. "
            "The best frame of a sweep is ranked by the quality head if --heads has one, else by "
            "the 'abdomen' probability. Research use only; not for clinical use."
        ),
        epilog="example: python tools/build_bundle.py --weights FetalCLIP_weights.pt --out bundles/fetalclip",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        required=True,
        help="FetalCLIP_weights.pt (or any checkpoint "
        "of --config, e.g. a MobileFetalCLIP student's): {'state_dict': ...} or a bare state dict; "
        "'module.' prefixes are fine",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="bundle directory to write (created if needed)"
    )
    parser.add_argument(
        "--prompts",
        type=Path,
        default=DEFAULT_PROMPTS,
        help="prompts JSON: plane classes, in output order, with text prompts each (default: the bundled "
        "engines/export/prompts/fetal_planes.json, with class 'abdomen' used to pick the best frame)",
    )
    parser.add_argument(
        "--heads",
        type=Path,
        help="heads file from engines.export.heads.save_heads: quality head, mask decoder and/or LoRA "
        "(LoRA is merged into the weights before export); adds 'quality' / 'mask' outputs "
        "(the mask decoder reads ViT blocks: a timm tower takes a quality head and LoRA only)",
    )
    parser.add_argument(
        "--config",
        default="fetalclip",
        help="model config: 'fetalclip' (ViT-L/14, context 117), 'tiny' (for tests), an open_clip "
        "model name such as 'MobileCLIP2-S0' (MobileFetalCLIP's student: FastViT, 256 px) or a JSON "
        "file in open_clip's CLIP(embed_dim, vision_cfg, text_cfg) shape; its optional preprocess_cfg "
        "(mean, std, interpolation) sets the input normalisation, else CLIP's, bicubic "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help=f"also write {INT8_NAME} (dynamic per-channel int8, for CPUs), kept only if its embeddings "
        "stay within cosine 0.999 of the fp32 model's and top-1 planes agree on sample frames; if not, "
        "the fp32 bundle is still written and the build exits 1",
    )
    parser.add_argument(
        "--no-torch",
        action="store_true",
        help=f"skip {TORCH_NAME}, the model for the torch reference engine (halves the bundle size)",
    )
    parser.add_argument("--name", help="bundle name (default 'fetalclip', or 'fetalclip-<config>')")
    parser.add_argument("--version", default="1.0.0", help="bundle version (default %(default)s)")
    parser.add_argument(
        "--check-frames",
        type=int,
        default=3,
        help="random frames for the ONNX Runtime vs torch check (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.check_frames < 1:
        parser.error("--check-frames must be >= 1")

    try:
        result = build_bundle(
            args.weights,
            args.out,
            config=args.config,
            prompts=args.prompts,
            heads=args.heads,
            int8=args.int8,
            torch_model=not args.no_torch,
            name=args.name,
            version=args.version,
            check_frames=args.check_frames,
        )
    except QuantizationGateError as exc:
        print(gate_table(exc.gate))
        print(f"build_bundle: error: {exc} (the fp32 bundle is complete)", file=sys.stderr)
        return 1
    except (CheckpointError, ConfigError, HeadsError, BundleError, ParityError) as exc:
        print(f"build_bundle: error: {exc}", file=sys.stderr)
        return 1
    bundle = result.bundle
    if result.int8_gate is not None:
        print(gate_table(result.int8_gate))
    print(f"bundle: {bundle.path}")
    print(f"sha256: {bundle.sha256}")
    for step, seconds in result.timings.items():
        print(f"  {step}: {seconds:.1f} s")
    return 0

