"""FetalCLIP export tests: real open_clip models with random weights, real files, real ONNX Runtime.

The tiny config (same open_clip ViT family, width 64) keeps the default suite fast;
the full ViT-L/14 export runs only under ``-m slow``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engines.base import EngineError, EngineOptions  # noqa: E402
from engines.bundle import Bundle, BundleError, file_sha256, load_bundle  # noqa: E402
from engines.export.build_bundle import build_bundle  # noqa: E402
from engines.export.fetalclip import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_PROMPTS,
    CheckpointError,
    ConfigError,
    FetalClipExport,
    build_model,
    class_embeddings,
    export_onnx,
    load_checkpoint,
    load_config,
    load_prompts,
    make_tokenizer,
)
from engines.export.fp16 import convert_to_fp16  # noqa: E402
from engines.export.heads import (  # noqa: E402
    HeadsError,
    MaskDecoder,
    QualityHead,
    attach_lora,
    evenly_spaced_blocks,
    load_heads,
    merge_lora,
    save_heads,
)
from engines.export.trt_constraints import check_tensorrt_onnx  # noqa: E402
from engines.onnxruntime import OrtEngine  # noqa: E402
from engines.registry import select_engine  # noqa: E402
from engines.torch import TorchEngine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "build_bundle.py"



def frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224), dtype=np.uint8)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(load_config("tiny"))


def lora_state(model, rank: int = 4, alpha: float = 8.0, seed: int = 1) -> dict:
    """A LoRA with non-zero B (a trained one, not a fresh one) on every visual in_proj and one MLP layer."""
    gen = torch.Generator().manual_seed(seed)
    names = [
        n
        for n, _ in model.named_parameters()
        if n.startswith("visual.") and n.endswith("attn.in_proj_weight")
    ]
    names.append("visual.transformer.resblocks.1.mlp.c_fc.weight")
    params = dict(model.named_parameters())
    state = {}
    for name in names:
        out_features, in_features = params[name].shape
        state[name] = {
            "A": torch.randn(rank, in_features, generator=gen) * 0.05,
            "B": torch.randn(out_features, rank, generator=gen) * 0.05,
            "alpha": alpha,
        }
    return state


def random_heads(model) -> tuple[QualityHead, MaskDecoder]:
    """Randomly initialised heads; the mask bias is centred so about half the pixels are 1."""
    torch.manual_seed(2)
    visual = model.visual
    quality = QualityHead(visual.output_dim)
    mask = MaskDecoder(
        width=visual.transformer.width,
        grid=visual.grid_size[0],
        image_size=224,
        blocks=evenly_spaced_blocks(len(visual.transformer.resblocks)),
        channels=32,
    )
    probe = FetalClipExport(visual, torch.eye(2, visual.output_dim), mask=mask).eval()
    with torch.no_grad():
        x = torch.from_numpy(frames(2, seed=9)).float().unsqueeze(1) * probe.pixel_scale + probe.pixel_shift
        tokens = visual.forward_intermediates(x, indices=list(mask.blocks), output_fmt="NLC")
        mask.head.bias -= mask(tokens["image_intermediates"]).median()
    return quality.eval(), mask.eval()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fetalclip")


@pytest.fixture(scope="module")
def tiny_ckpt(workdir: Path) -> Path:
    path = workdir / "tiny_weights.pt"
    torch.save({"state_dict": tiny_model().state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def heads_file(workdir: Path) -> Path:
    model = tiny_model()
    quality, mask = random_heads(model)
    path = workdir / "heads.pt"
    save_heads(path, quality=quality, mask=mask, lora=lora_state(model))
    return path


@pytest.fixture(scope="module")
def plain_bundle(workdir: Path, tiny_ckpt: Path) -> Bundle:
    result = build_bundle(tiny_ckpt, workdir / "plain", config="tiny", check_frames=2)
    assert result.parity["embedding_cosine_min"] >= 0.99999
    return result.bundle


@pytest.fixture(scope="module")
def heads_bundle(workdir: Path, tiny_ckpt: Path, heads_file: Path) -> Bundle:
    return build_bundle(
        tiny_ckpt, workdir / "heads", config="tiny", heads=heads_file, check_frames=2
    ).bundle


def run_engines(bundle: Bundle, batch: np.ndarray) -> tuple[dict, dict]:
    """The same batch through OrtEngine and TorchEngine (CPU)."""
    results = []
    options = EngineOptions(device="cpu", max_batch=len(batch))  # one batch, not the CPU's auto batch of 1
    for engine in (OrtEngine(bundle, options), TorchEngine(bundle, options)):
        engine.load()
        results.append(engine.infer(batch))
        engine.close()
    return results[0], results[1]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_with_and_without_module_prefix(workdir: Path, tiny_ckpt: Path) -> None:
    reference = tiny_model().state_dict()
    prefixed = workdir / "prefixed.pt"
    torch.save({f"module.{k}": v for k, v in reference.items()}, prefixed)  # bare state dict, DDP-style keys
    loaded = []
    for path in (tiny_ckpt, prefixed):
        model = tiny_model(seed=123)  # different random weights, all overwritten
        load_checkpoint(model, path, config_label="tiny")
        loaded.append(model.state_dict())
    for key, value in reference.items():
        assert torch.equal(loaded[0][key], value) and torch.equal(loaded[1][key], value), key


def checkpoint_error(model, path: Path, label: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, path, config_label=label)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_tiny_weights_into_fetalclip_config_names_the_architectures(tiny_ckpt: Path) -> None:
    with torch.device("meta"):  # shapes are all the check needs; no 1.7 GB random init
        model = build_model(load_config("fetalclip"))
    assert checkpoint_error(model, tiny_ckpt, "fetalclip") == (
        f"checkpoint {tiny_ckpt} is a ViT with width 64, 4 layers, patch 32; "
        "config 'fetalclip' expects a ViT-L/14 (width 1024, 24 layers, patch 14)"
    )


def test_text_tower_mismatch_is_named(workdir: Path) -> None:
    cfg = load_config("tiny")
    cfg["text_cfg"]["context_length"] = 77  # an off-the-shelf CLIP context, not FetalCLIP's 117
    path = workdir / "ctx77.pt"
    torch.save({"state_dict": build_model(cfg).state_dict()}, path)
    assert checkpoint_error(tiny_model(), path, "tiny") == (
        f"checkpoint {path} has a text tower with context 77, width 64, 2 layers; "
        "config 'tiny' expects context 117, width 64, 2 layers"
    )


def test_missing_and_misshaped_keys(workdir: Path) -> None:
    state = tiny_model().state_dict()
    del state["visual.ln_post.weight"], state["visual.ln_post.bias"], state["logit_scale"]
    state["visual.proj"] = torch.zeros(64, 32)
    state["extra.weight"] = torch.zeros(1)
    path = workdir / "broken.pt"
    torch.save({"state_dict": state}, path)
    assert checkpoint_error(tiny_model(), path, "tiny") == (
        f"checkpoint {path} does not fit config 'tiny': "
        "3 missing key(s) (logit_scale, visual.ln_post.weight, visual.ln_post.bias); "
        "1 unexpected key(s) (extra.weight); "
        "1 shape mismatch(es) (file vs model: visual.proj [64, 32] vs [64, 64])"
    )


@pytest.mark.parametrize(
    ("write", "problem"),
    [
        (lambda p: torch.save([1, 2, 3], p), "holds a list, not a state dict"),
        (
            lambda p: torch.save({"epoch": 3, "lr": 0.1}, p),
            "not a state dict: 2 entries are not name -> tensor",
        ),
        (lambda p: p.write_text("FetalCLIP weights go here\n"), "not a PyTorch file"),
        (lambda p: p.write_bytes(b"PK\x03\x04 cut short"), "not a readable PyTorch file (RuntimeError: "),
        (
            lambda p: torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, p),
            "holds Python objects that weights_only=True refuses (Unsupported global: GLOBAL "
            "argparse.Namespace was not an allowed global by default); re-save just its tensors",
        ),
        (lambda p: None, "file not found"),
    ],
)
def test_unreadable_checkpoints(tmp_path: Path, write, problem: str) -> None:
    path = tmp_path / "bad.pt"
    write(path)
    assert problem in checkpoint_error(tiny_model(), path, "tiny")


def test_cli_reports_a_bad_checkpoint_in_one_line(workdir: Path) -> None:
    state = tiny_model().state_dict()
    del state["visual.conv1.weight"]
    path = workdir / "no_conv.pt"
    torch.save(state, path)
    proc = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--weights",
            str(path),
            "--out",
            str(workdir / "never"),
            "--config",
            "tiny",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        f"build_bundle: error: checkpoint {path} does not fit config 'tiny': "
        "1 missing key(s) (visual.conv1.weight)"
    )
    assert not (workdir / "never" / "bundle.json").exists()


def test_bad_checkpoint_leaves_an_existing_bundle_intact(plain_bundle: Bundle, workdir: Path) -> None:
    manifest = (plain_bundle.path / "bundle.json").read_bytes()
    junk = workdir / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError):
        build_bundle(junk, plain_bundle.path, config="tiny", torch_model=False)
    assert (plain_bundle.path / "bundle.json").read_bytes() == manifest
    load_bundle(plain_bundle.path)


def test_auto_with_int8_never_picks_a_gpu_backend(plain_bundle: Bundle, monkeypatch) -> None:
    import engines.registry

    monkeypatch.setattr(engines.registry, "nvidia_driver_present", lambda: True)  # LABELLED FAKE: no GPU here
    suits, why = TorchEngine.suits_auto(plain_bundle, EngineOptions(precision="int8"))
    assert not suits and why == "int8 runs on ort only"
    with pytest.raises(EngineError, match="no int8 path"):
        TorchEngine(plain_bundle, EngineOptions(precision="int8"))


# --------------------------------------------------------------------------- prompts and zero-shot


def test_bundled_prompts() -> None:
    prompts = load_prompts(DEFAULT_PROMPTS)
    assert list(prompts) == [
        "abdomen", "brain", "femur", "thorax", "kidney", "lips_nose", "profile", "spine", "cervix", "other",
    ]  # fmt: skip
    assert all(len(texts) >= 3 for texts in prompts.values())


def test_class_embeddings_are_normalised_means_of_normalised_prompts() -> None:
    model = tiny_model()
    tokenizer = make_tokenizer(load_config("tiny"))
    prompts = {"a": ["fetal abdomen", "stomach bubble", "umbilical vein"], "b": ["fetal femur"]}
    got = class_embeddings(model, tokenizer, prompts)
    with torch.no_grad():
        each = F.normalize(model.encode_text(tokenizer(prompts["a"])), dim=-1)
        single = F.normalize(model.encode_text(tokenizer(prompts["b"])), dim=-1)[0]
    mean = each.mean(dim=0)
    assert got.shape == (2, 64) and got.dtype == torch.float32
    torch.testing.assert_close(got[0], mean / mean.norm(), rtol=0, atol=1e-6)
    torch.testing.assert_close(got[1], single, rtol=0, atol=1e-6)


def test_too_long_prompt_is_refused() -> None:
    model = tiny_model()
    with pytest.raises(ConfigError, match="prompt for class 'a' has 160 tokens, limit 115"):
        class_embeddings(model, make_tokenizer(load_config("tiny")), {"a": ["fetal " * 160], "b": ["x"]})


def test_export_module_normalises_and_scores_like_clip() -> None:
    model = tiny_model()
    embeddings = F.normalize(torch.randn(3, 64), dim=-1)
    wrapper = FetalClipExport(model.visual, embeddings).eval()
    batch = torch.from_numpy(frames(2))
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    by_hand = ((batch.float() / 255).unsqueeze(1).repeat(1, 3, 1, 1) - mean) / std
    with torch.no_grad():
        embedding, planes = wrapper(batch)
        expected = F.normalize(model.visual(by_hand), dim=-1)
    torch.testing.assert_close(embedding, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        planes, torch.softmax(100 * expected @ embeddings.T, dim=-1), rtol=0, atol=1e-4
    )


# --------------------------------------------------------------------------- bundles and engines


def test_manifest(plain_bundle: Bundle, tiny_ckpt: Path) -> None:
    bundle = load_bundle(plain_bundle.path)
    manifest = bundle.manifest
    assert bundle.input.name == "image" and bundle.input.frame_shape == (224, 224)
    assert (bundle.input.dtype, bundle.input.resize, bundle.input.normalization) == (
        "uint8",
        "bicubic",
        "in_graph",
    )
    assert bundle.input.pad_to_square and manifest["input"]["mean"] == list(CLIP_MEAN)
    assert {n: (o.kind, o.shape) for n, o in bundle.outputs.items()} == {
        "embedding": ("embedding", (64,)),
        "planes": ("planes", (10,)),
    }
    assert bundle.outputs["planes"].classes == tuple(load_prompts(DEFAULT_PROMPTS))
    assert (bundle.best_frame.output, bundle.best_frame.class_name) == ("planes", "abdomen")
    assert (bundle.min_batch, bundle.max_batch) == (1, 32)
    assert manifest["source"]["checkpoint_sha256"] == file_sha256(tiny_ckpt)
    assert manifest["source"]["config"] == load_config("tiny")
    assert manifest["model"]["torch"] == "torch_model.pt"
    assert manifest["model"]["torch_sha256"] == file_sha256(bundle.path / "torch_model.pt")
    assert "not for clinical use" in manifest["license"] and "own licence" in manifest["license"]


def test_onnx_is_uint8_with_dynamic_batch_and_no_text_tower(plain_bundle: Bundle) -> None:
    model = onnx.load(str(plain_bundle.model_path))
    (graph_input,) = model.graph.input
    tensor_type = graph_input.type.tensor_type
    assert graph_input.name == "image" and tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in tensor_type.shape.dim] == ["batch", 224, 224]
    assert [o.name for o in model.graph.output] == ["embedding", "planes"]
    assert {n.op_type for n in model.graph.node} >= {"LayerNormalization", "Softmax", "Conv"}
    # The text tower's token embedding is [49408, width]; no initializer may carry that vocabulary axis.
    assert not [init.name for init in model.graph.initializer if 49408 in init.dims]

    session = ort.InferenceSession(str(plain_bundle.model_path), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        embedding, planes = session.run(None, {"image": frames(n)})
        assert embedding.shape == (n, 64) and planes.shape == (n, 10)
        np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(planes.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("which", ["plain", "heads"])
def test_exports_obey_the_tensorrt_parser_constraints(
    plain_bundle: Bundle, heads_bundle: Bundle, tmp_path: Path, which: str
) -> None:
    """The ViT export, with quality head, mask decoder and merged LoRA or without, and its fp16 copy (what
    a TensorRT 11 fp16 build parses): supported operators and types, uint8 only at the network's edges,
    only the batch axis dynamic. The tiny config has the ViT-L graph's structure; the full size is below."""
    bundle = heads_bundle if which == "heads" else plain_bundle
    assert check_tensorrt_onnx(bundle.model_path) == []
    assert check_tensorrt_onnx(convert_to_fp16(bundle.model_path, tmp_path / "model.fp16.onnx")) == []


def test_ort_and_torch_engines_agree(plain_bundle: Bundle) -> None:
    batch = frames(4, seed=3)
    ort_out, torch_out = run_engines(plain_bundle, batch)
    assert cosines(ort_out["embedding"], torch_out["embedding"]).min() >= 0.99999
    assert np.array_equal(ort_out["planes"].argmax(1), torch_out["planes"].argmax(1))
    np.testing.assert_allclose(ort_out["planes"], torch_out["planes"], atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")
def test_torch_cuda_fp16_matches_ort(heads_bundle: Bundle) -> None:
    """The reference backend on the GPU: fp16 autocast stays within cosine 0.999 of ORT fp32 and keeps
    the plane decision (latency figures come from tools/bench_engine.py, not from a test)."""
    batch = frames(8, seed=5)
    cpu = OrtEngine(heads_bundle, EngineOptions(device="cpu", max_batch=8))
    gpu = TorchEngine(heads_bundle, EngineOptions(device="cuda", max_batch=8))
    outputs = {}
    for name, engine in (("cpu", cpu), ("gpu", gpu)):
        engine.load()
        outputs[name] = engine.infer(batch)
        engine.close()
    assert gpu.describe()["precision"] == "fp16-autocast"
    assert cosines(outputs["cpu"]["embedding"], outputs["gpu"]["embedding"]).min() >= 0.999
    assert np.array_equal(outputs["cpu"]["planes"].argmax(1), outputs["gpu"]["planes"].argmax(1))
    assert (outputs["cpu"]["mask"] == outputs["gpu"]["mask"]).mean() > 0.99


def test_heads_bundle_outputs_match_torch(heads_bundle: Bundle, plain_bundle: Bundle) -> None:
    assert list(heads_bundle.outputs) == ["embedding", "planes", "quality", "mask"]
    assert heads_bundle.best_frame.output == "quality"
    assert heads_bundle.manifest["pixel_spacing"] == {"source": "input"}
    batch = frames(4, seed=4)
    ort_out, torch_out = run_engines(heads_bundle, batch)
    assert ort_out["quality"].shape == (4,) and ort_out["mask"].shape == (4, 224, 224)
    assert ort_out["mask"].dtype == np.uint8 and set(np.unique(ort_out["mask"])) == {0, 1}
    assert 0.05 < ort_out["mask"].mean() < 0.95  # a real mask, so agreement below means something
    assert np.all((ort_out["quality"] >= 0) & (ort_out["quality"] <= 1))
    assert cosines(ort_out["embedding"], torch_out["embedding"]).min() >= 0.99999
    assert np.array_equal(ort_out["planes"].argmax(1), torch_out["planes"].argmax(1))
    np.testing.assert_allclose(ort_out["quality"], torch_out["quality"], atol=1e-5)
    assert np.mean(ort_out["mask"] == torch_out["mask"]) >= 0.999
    # The LoRA was merged: the same checkpoint gives a different image embedding with it.
    plain = OrtEngine(plain_bundle, EngineOptions(device="cpu", max_batch=len(batch)))
    plain.load()
    assert cosines(plain.infer(batch)["embedding"], ort_out["embedding"]).max() < 0.9999


def test_torch_engine_needs_the_torch_model(plain_bundle: Bundle, tmp_path: Path) -> None:
    copy_dir = tmp_path / "no_torch"
    copy_dir.mkdir()
    shutil.copy(plain_bundle.model_path, copy_dir / "model.onnx")
    manifest = copy.deepcopy(plain_bundle.manifest)
    del manifest["model"]["torch"], manifest["model"]["torch_sha256"]
    (copy_dir / "bundle.json").write_text(json.dumps(manifest))
    engine = TorchEngine(load_bundle(copy_dir), EngineOptions(device="cpu"))
    with pytest.raises(BundleError, match=r"has no torch model \('model.torch'\)"):
        engine.load()


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda m: m["model"].pop("torch_sha256"), "missing key 'model.torch_sha256'"),
        (lambda m: m["model"].update(torch="../x.pt"), "'model.torch' must be a file name inside the bundle"),
        (lambda m: m["input"].update(std=[0.2, 0.0, 0.3]), "'input.std' must be a list of 1 or 3 positive"),
        (lambda m: m["source"].update(heads_sha256="abc"), "'source.heads_sha256' must be 64 lowercase hex"),
        (
            lambda m: m["outputs"]["embedding"].update(shape=[]),
            "must have 1 dimension(s) for kind 'embedding'",
        ),
    ],
)
def test_manifest_additions_are_validated(plain_bundle: Bundle, tmp_path: Path, edit, problem: str) -> None:
    shutil.copytree(plain_bundle.path, tmp_path / "b")
    manifest = copy.deepcopy(plain_bundle.manifest)
    edit(manifest)
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        load_bundle(tmp_path / "b")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_torch_is_explicit_only_without_cuda(plain_bundle: Bundle) -> None:
    """Without CUDA (or for a bundle without a torch model) auto leaves torch alone; asking for it works."""
    assert TorchEngine.available()[0]
    suits, why = TorchEngine.suits_auto(plain_bundle, EngineOptions())
    assert not suits and (why.startswith("no CUDA device") or why == "the bundle has no torch model")
    engine, reason = select_engine("auto", plain_bundle, EngineOptions())
    assert isinstance(engine, OrtEngine) and "torch: " in reason
    engine, reason = select_engine("torch", plain_bundle, EngineOptions(device="cpu"))
    assert isinstance(engine, TorchEngine) and reason == "torch: requested"


def test_int8_build_writes_a_gated_int8_model(workdir: Path, tiny_ckpt: Path) -> None:
    result = build_bundle(tiny_ckpt, workdir / "int8", config="tiny", int8=True, torch_model=False)
    bundle = result.bundle
    gate = result.int8_gate
    assert gate is not None and gate["passed"]
    results = gate["results"]
    assert results["embedding_cosine_min"] >= 0.999 and results["planes_top1_agreement"] == 1.0
    assert bundle.int8_path == bundle.path / "model.int8.onnx"
    assert bundle.manifest["model"]["int8"]["gate"] == gate
    assert bundle.manifest["model"]["int8"]["sha256"] == file_sha256(bundle.int8_path)
    assert bundle.precision == "fp32" and "int8 quantize and gate" in result.timings

    batch = frames(4, seed=6)
    options = EngineOptions(device="cpu", max_batch=len(batch))
    engine, _ = select_engine("ort", bundle, options)  # auto precision on CPU: int8
    engine.load()
    assert (engine.describe()["precision"], engine.describe()["model"]) == ("int8", "model.int8.onnx")
    int8_out = engine.infer(batch)
    fp32 = OrtEngine(bundle, EngineOptions(device="cpu", precision="fp32", max_batch=len(batch)))
    fp32.load()
    assert cosines(int8_out["embedding"], fp32.infer(batch)["embedding"]).min() >= 0.999

    rebuilt = build_bundle(tiny_ckpt, workdir / "int8", config="tiny", torch_model=False)
    assert rebuilt.int8_gate is None and rebuilt.bundle.int8_path is None
    assert not (workdir / "int8" / "model.int8.onnx").exists()  # no stale int8 file left behind


def test_fixed_batch_export(tmp_path: Path) -> None:
    wrapper = FetalClipExport(tiny_model().visual, F.normalize(torch.randn(2, 64), dim=-1)).eval()
    path = export_onnx(wrapper, tmp_path / "b1.onnx", max_batch=1)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 224, 224]


# --------------------------------------------------------------------------- heads and LoRA


def test_lora_merge_equals_unmerged_forward() -> None:
    merged, unmerged, base = tiny_model(), tiny_model(), tiny_model()
    lora = lora_state(base)
    merge_lora(merged, lora)
    attach_lora(unmerged, lora)
    name = "visual.transformer.resblocks.2.attn.in_proj_weight"
    by_hand = dict(base.named_parameters())[name] + (8.0 / 4) * lora[name]["B"] @ lora[name]["A"]
    torch.testing.assert_close(dict(merged.named_parameters())[name], by_hand, rtol=0, atol=1e-6)

    image = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        got, want, before = merged.visual(image), unmerged.visual(image), base.visual(image)
    assert (got - want).abs().max() <= 1e-5
    assert (got - before).abs().max() > 1e-3  # the LoRA changes the output, so the equality is not vacuous


def test_lora_errors() -> None:
    model = tiny_model()
    lora = lora_state(model)
    bad_name = {"visual.nope.weight": next(iter(lora.values()))}
    with pytest.raises(HeadsError, match="the model has no parameter 'visual.nope.weight'"):
        merge_lora(model, bad_name)
    name = "visual.transformer.resblocks.0.attn.in_proj_weight"
    wrong_rank = {name: {**lora[name], "B": torch.zeros(192, 3)}}
    with pytest.raises(HeadsError, match="A's rows must equal B's columns"):
        merge_lora(model, wrong_rank)


def test_heads_file_roundtrip(heads_file: Path) -> None:
    heads = load_heads(heads_file)
    quality, mask = random_heads(tiny_model())
    assert heads.quality is not None and heads.mask is not None and heads.lora is not None
    assert heads.mask.config == mask.config == {
        "width": 64, "grid": 7, "image_size": 224, "blocks": [0, 1, 2, 3], "channels": 32,
    }  # fmt: skip
    for loaded, saved in ((heads.quality, quality), (heads.mask, mask)):
        for key, value in saved.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"format": "other", "version": 1}, "'format' must be 'sweepstream-heads'"),
        ({"format": "sweepstream-heads", "version": 2}, "unsupported version 2"),
        ({"format": "sweepstream-heads", "version": 1}, "holds none of quality, mask, lora"),
        ({"format": "sweepstream-heads", "version": 1, "quality": {}, "colour": 1}, "unknown key(s) colour"),
        (
            {"format": "sweepstream-heads", "version": 1,
             "quality": {"config": {"in_features": 64}, "state_dict": {"linear.weight": torch.zeros(1, 32)}}},
            "state_dict does not fit its config: 1 missing key(s) (linear.bias); "
            "1 shape mismatch(es) (file vs model: linear.weight [1, 32] vs [1, 64])",
        ),
    ],
)  # fmt: skip
def test_bad_heads_files(tmp_path: Path, data: dict, problem: str) -> None:
    path = tmp_path / "heads.pt"
    torch.save(data, path)
    with pytest.raises(HeadsError) as info:
        load_heads(path)
    assert str(info.value).startswith(f"heads file {path}") and problem in str(info.value)


def test_heads_must_fit_the_image_tower() -> None:
    visual = tiny_model().visual
    mask = MaskDecoder(width=64, grid=14, image_size=224, blocks=[1, 3], channels=16)
    with pytest.raises(ValueError, match="mask decoder .* does not fit the image tower"):
        FetalClipExport(visual, torch.eye(2, 64), mask=mask)
    with pytest.raises(ValueError, match="quality head takes 32 features, image tower gives 64"):
        FetalClipExport(visual, torch.eye(2, 64), quality=QualityHead(32))


# --------------------------------------------------------------------------- full size


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_full_fetalclip_with_heads_obeys_the_tensorrt_parser_constraints(tmp_path: Path) -> None:
    """ViT-L/14 with random weights, quality head and mask decoder, exported as build_bundle does, and its
    fp16 copy: what the trt engine parses on a GPU machine passes the documented parser constraints."""
    torch.manual_seed(0)
    model = build_model(load_config("fetalclip"))
    quality, mask = random_heads(model)
    wrapper = FetalClipExport(model.visual, F.normalize(torch.randn(10, model.visual.output_dim), dim=-1),
                              quality=quality, mask=mask).eval()
    path = export_onnx(wrapper, tmp_path / "model.onnx")
    assert [o.name for o in onnx.load(str(path), load_external_data=False).graph.output] == [
        "embedding", "planes", "quality", "mask"]
    assert check_tensorrt_onnx(path) == []
    assert check_tensorrt_onnx(convert_to_fp16(path, tmp_path / "model.fp16.onnx")) == []


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_full_fetalclip_export(tmp_path: Path) -> None:
    """ViT-L/14 with random weights through the real tool: size, graph and ORT parity of the full export."""
    start = time.perf_counter()
    torch.manual_seed(0)
    weights = tmp_path / "FetalCLIP_weights.pt"
    torch.save({"state_dict": build_model(load_config("fetalclip")).state_dict()}, weights)
    made = time.perf_counter()
    result = build_bundle(
        weights, tmp_path / "bundle", config="fetalclip", torch_model=False, check_frames=2
    )
    built = time.perf_counter()

    bundle = result.bundle
    size = bundle.model_path.stat().st_size
    assert 1.1e9 < size < 1.4e9, size
    model = onnx.load(str(bundle.model_path))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("LayerNormalization") == 2 * 24 + 2  # two per block, ln_pre, ln_post
    assert ops.count("Softmax") == 24 + 1  # attention per block, plane probabilities
    assert len(ops) < 6000
    assert not [init.name for init in model.graph.initializer if 49408 in init.dims]
    assert bundle.outputs["embedding"].shape == (768,) and bundle.outputs["planes"].shape == (10,)
    assert result.parity["embedding_cosine_min"] >= 0.99999
    assert result.parity["planes_top1_agreement"] == 1.0
    print(
        f"\nfull FetalCLIP: random checkpoint {made - start:.0f} s, build_bundle {built - made:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in result.timings.items())}), "
        f"onnx {size / 1e9:.2f} GB, {len(ops)} nodes"
    )
