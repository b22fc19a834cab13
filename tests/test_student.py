"""The student bundle: MobileFetalCLIP's architecture (open_clip MobileCLIP2-S0, FastViT) with random weights.

Real open_clip and timm models, a real checkpoint file through the real build (reparameterization,
ONNX export, parity check, int8 gate) and the project's engines; about 20 s on two cores.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

import onnx  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engines.base import EngineOptions  # noqa: E402
from engines.benchmark import vit_gflop  # noqa: E402
from engines.bundle import Bundle  # noqa: E402
from engines.export.build_bundle import BuildResult, build_bundle  # noqa: E402
from engines.export.fetalclip import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_PROMPTS,
    CheckpointError,
    ConfigError,
    FetalClipExport,
    build_model,
    image_tower,
    input_preprocessing,
    is_timm_tower,
    load_checkpoint,
    load_config,
    load_prompts,
)
from engines.export.heads import MaskDecoder, QualityHead  # noqa: E402
from engines.export.quantize import sample_frames  # noqa: E402
from engines.onnxruntime import OrtEngine  # noqa: E402
from engines.registry import select_engine  # noqa: E402
from engines.torch import TorchEngine  # noqa: E402

STUDENT = "MobileCLIP2-S0"
# MobileFetalCLIP's figure: 11.4 M image-tower parameters once reparameterized (11,357,504 here).
REPARAMETERIZED_PARAMS = (11.3e6, 11.4e6)


@pytest.fixture(scope="module")
def student_model():
    """MobileCLIP2-S0 as open_clip builds it, random weights, training-time (not reparameterized) form."""
    torch.manual_seed(0)
    return build_model(load_config(STUDENT))


@pytest.fixture(scope="module")
def student_build(tmp_path_factory: pytest.TempPathFactory, student_model) -> BuildResult:
    """The real build from a checkpoint saved DDP-style (``module.`` keys), with a torch model and int8."""
    workdir = tmp_path_factory.mktemp("student")
    weights = workdir / "mobilefetalclip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in student_model.state_dict().items()}}, weights)
    return build_bundle(weights, workdir / "bundle", config=STUDENT, int8=True, check_frames=2)


@pytest.fixture(scope="module")
def student_bundle(student_build: BuildResult) -> Bundle:
    return student_build.bundle


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# --------------------------------------------------------------------------- config and tower


def test_open_clip_name_is_a_config_with_clip_preprocessing() -> None:
    cfg = load_config(STUDENT)
    assert is_timm_tower(cfg) and cfg["vision_cfg"]["timm_model_name"] == "fastvit_mci0"
    assert cfg["custom_text"] is True and cfg["vision_cfg"]["image_size"] == 256
    # open_clip's preprocessing for a checkpoint file: CLIP's mean/std, bicubic.
    assert input_preprocessing(cfg) == input_preprocessing(load_config("fetalclip"))
    assert input_preprocessing(cfg).mean == CLIP_MEAN and input_preprocessing(cfg).std == CLIP_STD
    assert input_preprocessing(cfg).resize == "bicubic"
    assert vit_gflop(cfg, 256) is None  # the benchmark counts ViT FLOPs only


def test_preprocess_cfg_sets_the_input(tmp_path: Path) -> None:
    """Apple's MobileCLIP2-S0 weights were trained unnormalised and bilinear; a config file can say so."""
    cfg = load_config(STUDENT)
    path = tmp_path / "student.json"
    apple = {"mean": [0, 0, 0], "std": [1, 1, 1], "interpolation": "bilinear", "resize_mode": "shortest"}
    path.write_text(json.dumps({**cfg, "preprocess_cfg": apple}))
    got = input_preprocessing(load_config(path))
    assert (got.mean, got.std, got.resize) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear")


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        ({"preprocess_cfg": {"interpolation": "random"}}, "interpolation must be one of bicubic, bilinear"),
        ({"preprocess_cfg": {"std": [1, 0, 1]}}, "std must be positive"),
        ({"preprocess_cfg": {"mean": [0.5]}}, "mean must be 3 numbers"),
        ({"preprocess_cfg": {"crop": 1}}, "preprocess_cfg must be a dict of"),
        ({"multimodal_cfg": {}}, "needs open_clip's own text tower and tokenizer, has multimodal_cfg"),
        ({"vision_cfg": {"image_size": 256}}, "plain ViT (integer 'layers') or a timm model"),
    ],
)
def test_bad_student_configs(tmp_path: Path, edit: dict, problem: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**load_config(STUDENT), **edit}))
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        load_config(path)


def test_unknown_config_name() -> None:
    with pytest.raises(ConfigError, match="neither a bundled config .*, a file, nor an open_clip model name"):
        load_config("MobileCLIP9-S0")


def test_reparameterized_tower_is_the_papers_size_with_the_same_features(student_model) -> None:
    model = copy.deepcopy(student_model)
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        before = model.visual(x)
        tower = image_tower(model)
        after = tower(x)
    params = sum(p.numel() for p in tower.parameters())
    assert REPARAMETERIZED_PARAMS[0] < params < REPARAMETERIZED_PARAMS[1], params
    assert sum(p.numel() for p in student_model.visual.parameters()) > params  # branches were folded
    assert F.cosine_similarity(before, after).min() > 0.99999


def test_student_heads_quality_fits_mask_does_not(student_model) -> None:
    """The quality head is a linear probe on image features; the mask decoder reads ViT blocks."""
    tower, embeddings = student_model.visual, torch.eye(2, 512)
    assert FetalClipExport(tower, embeddings, quality=QualityHead(512)).output_names[-1] == "quality"
    mask = MaskDecoder(width=64, grid=8, image_size=256, blocks=[1], channels=16)
    with pytest.raises(ValueError, match="mask decoder .* does not fit the image tower: it reads ViT blocks"):
        FetalClipExport(tower, embeddings, mask=mask)


def test_export_normalises_with_the_given_statistics(student_model) -> None:
    tower = student_model.visual
    embeddings = F.normalize(torch.randn(3, 512), dim=-1)
    wrapper = FetalClipExport(tower, embeddings, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)).eval()
    image = torch.from_numpy(sample_frames(2, 256))
    with torch.no_grad():
        embedding = wrapper(image)[0]
        want = F.normalize(tower(image.float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)), dim=-1)
    torch.testing.assert_close(embedding, want, atol=1e-5, rtol=1e-5)


def test_vit_checkpoint_into_the_student_config_is_named(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": build_model(load_config("tiny")).state_dict()}, path)
    with torch.device("meta"):
        model = build_model(load_config(STUDENT))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, path, config_label=STUDENT)
    assert str(info.value) == (
        f"checkpoint {path} is a ViT with width 64, 4 layers, patch 32; "
        f"config '{STUDENT}' expects a timm image tower"
    )


# --------------------------------------------------------------------------- the built bundle


def test_student_manifest(student_build: BuildResult) -> None:
    manifest = student_build.bundle.manifest
    assert manifest["input"] == {
        "name": "image",
        "size": 256,
        "channels": 1,
        "dtype": "uint8",
        "layout": "NHW",
        "pad_to_square": True,
        "resize": "bicubic",
        "normalization": "in_graph",
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
    }
    outputs = manifest["outputs"]
    assert list(outputs) == ["embedding", "planes"]
    assert outputs["embedding"]["shape"] == [512]
    assert outputs["planes"]["classes"] == list(load_prompts(DEFAULT_PROMPTS))
    assert manifest["best_frame"] == {"output": "planes", "class": "abdomen"}
    description = manifest["description"]
    assert "timm fastvit_mci0" in description and "reparameterized: 11.36 M parameters, 256 px" in description
    assert manifest["source"]["config"] == load_config(STUDENT)
    built_by = f"tools/build_bundle.py --config {STUDENT} --weights mobilefetalclip.pt"
    assert manifest["source"]["built_by"] == built_by
    assert student_build.parity["embedding_cosine_min"] >= 0.99999
    assert student_build.parity["planes_top1_agreement"] == 1.0
    gate = student_build.int8_gate
    assert gate is not None and gate["passed"] and gate["quantization"]["quantized_nodes"] > 0


def test_student_onnx_has_a_dynamic_batch(student_bundle: Bundle) -> None:
    model = onnx.load(str(student_bundle.model_path))
    (graph_input,) = model.graph.input
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim] == ["batch", 256, 256]
    for output in model.graph.output:
        assert output.type.tensor_type.shape.dim[0].dim_param == "batch", output.name
    assert not [init.name for init in model.graph.initializer if 49408 in init.dims]  # no text tower


def test_student_runs_in_the_projects_engines(student_bundle: Bundle) -> None:
    engine, _ = select_engine("ort", student_bundle, EngineOptions(max_batch=1))
    engine.load()
    assert (engine.describe()["precision"], engine.describe()["model"]) == ("int8", "model.int8.onnx")
    one = engine.infer(sample_frames(1, 256))
    engine.close()
    assert one["embedding"].shape == (1, 512) and one["planes"].shape == (1, 10)

    batch = sample_frames(3, 256, seed=4)
    options = EngineOptions(device="cpu", precision="fp32", max_batch=len(batch))
    results = []
    for cls in (OrtEngine, TorchEngine):  # the ONNX graph and the torch model rebuilt from its file
        engine = cls(student_bundle, options)
        engine.load()
        results.append(engine.infer(batch))
        engine.close()
    ort_out, torch_out = results
    assert cosines(ort_out["embedding"], torch_out["embedding"]).min() > 0.99999
    np.testing.assert_allclose(ort_out["planes"], torch_out["planes"], atol=1e-4)
