"""INT8 quantization tests: tiny FetalCLIP bundles (open_clip's own random init) through the real tools,
real quantize_dynamic output and real ONNX Runtime sessions.

With open_clip's initialisation the tiny model's int8 embeddings stay at cosine ~0.99997 with
fp32 on the gate's frames (printed by test_gate_passes_and_is_recorded under ``-s``), so the
production threshold 0.999 is used as is.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

import onnx  # noqa: E402
from conftest import run_pipeline  # noqa: E402
from onnx import numpy_helper  # noqa: E402

import engines.export.quantize  # noqa: E402
from engines.base import EngineError, EngineOptions  # noqa: E402
from engines.bundle import Bundle, BundleError, file_sha256, load_bundle, write_manifest  # noqa: E402
from engines.export.build_bundle import build_bundle  # noqa: E402
from engines.export.fetalclip import build_model, load_config  # noqa: E402
from engines.export.heads import MaskDecoder, QualityHead, evenly_spaced_blocks, save_heads  # noqa: E402
from engines.export.quantize import (  # noqa: E402
    INT8_NAME,
    QuantizationGateError,
    output_layers,
    quantize_bundle_int8,
    sample_frames,
)
from engines.onnxruntime import OrtEngine  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from pipeline.config import load_config as load_run_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUANTIZE_TOOL = REPO / "tools" / "quantize_bundle.py"



def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quantize")


@pytest.fixture(scope="module")
def tiny_ckpt(workdir: Path) -> Path:
    torch.manual_seed(0)
    path = workdir / "tiny_weights.pt"
    torch.save({"state_dict": build_model(load_config("tiny")).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def fp32_bundle(workdir: Path, tiny_ckpt: Path) -> Path:
    """A tiny fp32 bundle, never modified: tests quantize copies of it."""
    return build_bundle(tiny_ckpt, workdir / "fp32", config="tiny", torch_model=False).bundle.path


@pytest.fixture()
def bundle_copy(fp32_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(fp32_bundle, tmp_path / "bundle"))


@pytest.fixture(scope="module")
def int8_bundle(fp32_bundle: Path, workdir: Path) -> Bundle:
    """A tiny bundle with a gated int8 model; tests may read it but not change it."""
    path = Path(shutil.copytree(fp32_bundle, workdir / "int8"))
    quantize_bundle_int8(path)
    return load_bundle(path)


@pytest.fixture()
def int8_copy(int8_bundle: Bundle, tmp_path: Path) -> Path:
    return Path(shutil.copytree(int8_bundle.path, tmp_path / "int8"))


def edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / "bundle.json").read_text())
    edit(manifest)
    (path / "bundle.json").write_text(json.dumps(manifest))


# --------------------------------------------------------------------------- sample frames


def test_sample_frames_are_deterministic_ultrasound_like() -> None:
    frames = sample_frames()
    assert frames.shape == (16, 224, 224) and frames.dtype == np.uint8
    assert np.array_equal(frames, sample_frames()) and not np.array_equal(frames, sample_frames(seed=1))
    assert np.array_equal(sample_frames(count=4), frames[:4])
    corners = frames[:, :20, :20]
    assert corners.max() == 0  # outside the fan
    assert all(frame.max() >= 200 for frame in frames)  # bright rims
    assert all(0.2 < np.mean(frame == 0) < 0.8 for frame in frames)  # dark background and fluid
    assert len({frame.tobytes() for frame in frames}) == 16


# --------------------------------------------------------------------------- quantize and gate


def kept_weight_shapes(model: onnx.ModelProto) -> list[tuple[int, ...]]:
    """Shapes of the weights of the layers output_layers keeps in float, checking none is in the encoder."""
    kept = set(output_layers(model))
    assert not [name for name in kept if "resblocks" in name]  # the walk stopped at the heads
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    return sorted(shapes[node.input[1]] for node in model.graph.node if node.name in kept)


def test_output_layers_are_the_heads_not_the_encoder(
    fp32_bundle: Path, workdir: Path, tiny_ckpt: Path
) -> None:
    plain = onnx.load(str(fp32_bundle / "model.onnx"))
    assert kept_weight_shapes(plain) == [(64, 10), (64, 64)]  # class embeddings product, image projection

    torch.manual_seed(3)
    heads = workdir / "heads.pt"
    mask = MaskDecoder(width=64, grid=7, image_size=224, blocks=evenly_spaced_blocks(4), channels=32)
    save_heads(heads, quality=QualityHead(64).eval(), mask=mask.eval())
    bundle = build_bundle(
        tiny_ckpt, workdir / "heads", config="tiny", heads=heads, torch_model=False
    ).bundle
    # + the quality linear ([1, 64], a Gemm) and the mask decoder's four token projections ([64, channels])
    assert kept_weight_shapes(onnx.load(str(bundle.model_path))) == [
        (1, 64), (64, 8), (64, 8), (64, 10), (64, 16), (64, 32), (64, 64),
    ]  # fmt: skip

    gate = quantize_bundle_int8(bundle.path)
    assert {"quality_max_abs_diff", "mask_agreement"} <= set(gate["results"])
    assert gate["results"]["quality_max_abs_diff"] < 0.01 and gate["results"]["mask_agreement"] > 0.99


def test_gate_passes_and_is_recorded(bundle_copy: Path) -> None:
    before = load_bundle(bundle_copy)
    gate = quantize_bundle_int8(bundle_copy)
    results = gate["results"]
    print(f"\ntiny int8 gate: {results}")
    assert gate["passed"] and results["embedding_cosine_min"] >= 0.999
    assert results["planes_top1_agreement"] == 1.0
    assert results["embedding_cosine_mean"] >= results["embedding_cosine_min"]
    assert gate["threshold"] == {"embedding_cosine_min": 0.999, "planes_top1_agreement": 1.0,
                                 "int8_batch_max_abs_diff": 0.0}
    assert results["int8_batch_max_abs_diff"] == 0.0  # a frame scores the same alone and in a batch
    assert gate["method"] == "dynamic per-channel QInt8" and gate["fp32_sha256"] == before.sha256
    frames = sample_frames()
    assert gate["frames"]["count"] == 16 and gate["frames"]["source"] == (
        "engines.export.quantize.sample_frames(count=16, size=224, seed=0)"
    )
    assert gate["frames"]["sha256"] == hashlib.sha256(frames.tobytes()).hexdigest()
    assert gate["quantization"]["quantized_nodes"] == 4 * 4  # qkv, out, fc, proj of 4 blocks

    bundle = load_bundle(bundle_copy)
    entry = bundle.manifest["model"]["int8"]
    assert bundle.int8_path == bundle_copy.resolve() / INT8_NAME
    assert entry == {"onnx": INT8_NAME, "sha256": file_sha256(bundle.int8_path), "gate": gate}
    assert bundle.sha256 == before.sha256 and bundle.precision == "fp32"
    assert not list(bundle_copy.glob(".*.tmp"))

    int8_model = onnx.load(str(bundle.int8_path))
    (graph_input,) = int8_model.graph.input
    assert graph_input.name == "image" and graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    ops = [node.op_type for node in int8_model.graph.node]
    assert ops.count("MatMulInteger") == 16 and ops.count("Conv") == 1  # the patch embedding stays float
    assert bundle.int8_path.stat().st_size < bundle.model_path.stat().st_size


def test_ort_engine_runs_the_int8_model(int8_bundle: Bundle) -> None:
    batch = sample_frames(count=6, seed=5)
    outputs, infos = {}, {}
    for precision in ("int8", "auto", "fp32"):
        options = EngineOptions(device="cpu", precision=precision, max_batch=len(batch))
        engine = OrtEngine(int8_bundle, options)
        assert engine.describe()["precision"] == precision and engine.describe()["model"] is None
        engine.load()
        outputs[precision], infos[precision] = engine.infer(batch), engine.describe()
        engine.close()
    assert (infos["int8"]["precision"], infos["int8"]["model"]) == ("int8", INT8_NAME)
    assert (infos["auto"]["precision"], infos["auto"]["model"]) == ("int8", INT8_NAME)  # CPU + gated int8
    assert (infos["fp32"]["precision"], infos["fp32"]["model"]) == ("fp32", "model.onnx")
    int8, fp32 = outputs["int8"], outputs["fp32"]
    assert not np.array_equal(int8["embedding"], fp32["embedding"])  # really a different model
    assert cosines(int8["embedding"], fp32["embedding"]).min() >= 0.999
    assert np.array_equal(int8["planes"].argmax(1), fp32["planes"].argmax(1))
    np.testing.assert_allclose(int8["planes"], fp32["planes"], atol=0.05)
    np.testing.assert_allclose(int8["planes"].sum(axis=1), 1.0, atol=1e-5)


def test_failed_gate_keeps_nothing(bundle_copy: Path) -> None:
    manifest = (bundle_copy / "bundle.json").read_bytes()
    with pytest.raises(QuantizationGateError) as info:
        quantize_bundle_int8(bundle_copy, min_cosine=1.0)  # no int8 model is bit-identical to fp32
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        f"bundle {bundle_copy.resolve()}: int8 gate failed on 16"
    )
    assert "needs >= 1)" in message and "planes top-1 agreement 1.0000 (needs 1)" in message
    assert f"{INT8_NAME} not kept" in message
    assert not info.value.gate["passed"] and info.value.gate["results"]["embedding_cosine_min"] < 1.0
    assert (bundle_copy / "bundle.json").read_bytes() == manifest
    assert sorted(p.name for p in bundle_copy.iterdir()) == ["bundle.json", "model.onnx"]
    assert load_bundle(bundle_copy).int8_path is None


def test_damaged_int8_model_fails_the_gate(bundle_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = engines.export.quantize.quantize_model

    def quantize_then_damage(src: Path, dst: Path) -> dict:
        info = real(src, dst)
        model = onnx.load(str(dst))
        weight = next(
            t for t in model.graph.initializer if t.name.endswith("_quantized") and len(t.dims) == 2
        )
        weight.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(weight), weight.name))  # sign flip
        onnx.save(model, str(dst))
        return info

    monkeypatch.setattr(engines.export.quantize, "quantize_model", quantize_then_damage)
    manifest = (bundle_copy / "bundle.json").read_bytes()
    with pytest.raises(QuantizationGateError, match=r"embedding cosine min 0\.\d+ .*needs >= 0\.999"):
        quantize_bundle_int8(bundle_copy)
    assert (bundle_copy / "bundle.json").read_bytes() == manifest
    assert not (bundle_copy / INT8_NAME).exists() and not list(bundle_copy.glob(".*.tmp"))


def test_failed_regate_leaves_the_earlier_int8_model(int8_copy: Path) -> None:
    manifest = (int8_copy / "bundle.json").read_bytes()
    int8_sha = file_sha256(int8_copy / INT8_NAME)
    with pytest.raises(QuantizationGateError):
        quantize_bundle_int8(int8_copy, min_cosine=1.0)
    assert (int8_copy / "bundle.json").read_bytes() == manifest
    assert file_sha256(int8_copy / INT8_NAME) == int8_sha
    assert load_bundle(int8_copy).int8_path is not None


def test_caller_frames(bundle_copy: Path) -> None:
    frames = np.random.default_rng(7).integers(0, 256, (3, 224, 224), dtype=np.uint8)
    gate = quantize_bundle_int8(bundle_copy, frames=frames, min_cosine=0.99)
    assert gate["frames"]["count"] == 3 and gate["frames"]["source"] == "supplied by the caller"
    with pytest.raises(ValueError, match=r"gate frames must be uint8 \[N >= 1, 224, 224\], got float32"):
        quantize_bundle_int8(bundle_copy, frames=frames.astype(np.float32))
    with pytest.raises(ValueError, match="min_cosine must be in"):
        quantize_bundle_int8(bundle_copy, min_cosine=0.0)


# --------------------------------------------------------------------------- manifest validation


def test_tampered_int8_file_fails_to_load(int8_copy: Path) -> None:
    path = int8_copy / INT8_NAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(
        BundleError, match=rf"bundle {int8_copy.resolve()}: {INT8_NAME} sha256 mismatch \(manifest"
    ):
        load_bundle(int8_copy)


def test_missing_int8_file_fails_to_load(int8_copy: Path) -> None:
    (int8_copy / INT8_NAME).unlink()
    with pytest.raises(BundleError, match=f"{INT8_NAME} not found"):
        load_bundle(int8_copy)


def set_in(manifest: dict, dotted: str, value) -> None:
    *parents, key = dotted.split(".")
    target = manifest
    for part in parents:
        target = target[part]
    target[key] = value


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("model.int8.gate.results.embedding_cosine_min", 0.99, "does not pass its own thresholds"),
        ("model.int8.gate.results.planes_top1_agreement", 0.9375, "does not pass its own thresholds"),
        ("model.int8.gate.passed", False, "does not pass its own thresholds (passed false"),
        ("model.int8.gate.fp32_sha256", "0" * 64, "was gated against another model.onnx"),
        ("model.int8.gate.threshold.embedding_cosine_min", 1.5, "must be a number in [0.0, 1.0], got 1.5"),
        ("model.int8.gate.results.embedding_cosine_min", "high", "must be a number in [-1.0, 1.0]"),
        ("model.int8.gate.results.colour", 1, "unknown key 'model.int8.gate.results.colour'"),
        ("model.int8.onnx", "model.onnx", "distinct from the other models"),
        ("model.int8.onnx", "../model.int8.onnx", "must be a file name inside the bundle"),
        ("model.int8.sha256", "abc", "'model.int8.sha256' must be 64 lowercase hex digits"),
    ],
)
def test_int8_manifest_entry_is_validated(int8_copy: Path, key: str, value, problem: str) -> None:
    edit_manifest(int8_copy, lambda m: set_in(m, key, value))
    with pytest.raises(BundleError) as info:
        load_bundle(int8_copy)
    assert problem in str(info.value)


def test_gate_is_required(int8_copy: Path) -> None:
    edit_manifest(int8_copy, lambda m: m["model"]["int8"].pop("gate"))
    with pytest.raises(BundleError, match="missing key 'model.int8.gate'"):
        load_bundle(int8_copy)


# --------------------------------------------------------------------------- engine options


def test_int8_precision_needs_a_gated_model(fp32_bundle: Path) -> None:
    bundle = load_bundle(fp32_bundle)
    with pytest.raises(EngineError) as info:
        OrtEngine(bundle, EngineOptions(precision="int8"))
    assert str(info.value) == (
        "bundle fetalclip-tiny has no gated int8 model; build it with tools/quantize_bundle.py"
    )
    engine = OrtEngine(bundle, EngineOptions(device="cpu"))  # auto without int8: fp32
    engine.load()
    assert (engine.describe()["precision"], engine.describe()["model"]) == ("fp32", "model.onnx")


def test_other_precisions_are_refused(int8_bundle: Bundle) -> None:
    with pytest.raises(EngineError, match="precision fp16 is not an onnxruntime option.*trt.*torch"):
        OrtEngine(int8_bundle, EngineOptions(precision="fp16"))
    with pytest.raises(EngineError, match="precision int8 runs on CPU only.*'cuda:1'"):
        OrtEngine(int8_bundle, EngineOptions(precision="int8", device="cuda:1"))
    with pytest.raises(EngineError, match="precision must be one of auto, fp32, fp16, int8, got 'int4'"):
        EngineOptions(precision="int4")


def test_manifest_round_trip_keeps_int8(int8_copy: Path) -> None:
    """Tools that rewrite bundle.json through write_manifest keep a valid int8 entry."""
    bundle = load_bundle(int8_copy)
    manifest = copy.deepcopy(bundle.manifest)
    manifest["version"] = "1.0.1"
    assert write_manifest(int8_copy, manifest).int8_path == bundle.int8_path


# --------------------------------------------------------------------------- tool


def test_quantize_tool(bundle_copy: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(QUANTIZE_TOOL), *args], capture_output=True, text=True, timeout=300, cwd=REPO
        )

    helped = run("--help")
    assert helped.returncode == 0 and "--min-cosine" in helped.stdout and "--bundle" in helped.stdout

    failed = run("--bundle", str(bundle_copy), "--min-cosine", "1.0")
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1].startswith("quantize_bundle: error: bundle ")
    assert "int8 gate failed" in failed.stderr and "FAILED" in failed.stdout
    assert not (bundle_copy / INT8_NAME).exists()

    passed = run("--bundle", str(bundle_copy))
    assert passed.returncode == 0, passed.stderr
    assert "PASSED" in passed.stdout and "embedding cosine min" in passed.stdout
    assert load_bundle(bundle_copy).int8_path is not None

    wrong = run("--bundle", str(bundle_copy / "nope"))
    assert wrong.returncode == 1 and "quantize_bundle: error: bundle " in wrong.stderr


# --------------------------------------------------------------------------- pipeline


def test_pipeline_runs_the_int8_model(int8_bundle: Bundle, fp32_bundle: Path, tmp_path: Path) -> None:
    """infer.precision reaches a real run's engine; a run asking int8 of an fp32 bundle fails to start."""
    source = ("--source", "synthetic://320x240?frames=12", "--flood", "--quiet", "--engine", "ort")
    out = tmp_path / "run"
    result = run_pipeline(
        *source, "--bundle", str(int8_bundle.path), "--set", "infer.precision=int8", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    engine = summary["stages"]["infer"]["engine"]
    assert (engine["precision"], engine["model"]) == ("int8", INT8_NAME)
    assert summary["frames"]["scored"] > 0

    refused = run_pipeline(
        *source, "--bundle", str(fp32_bundle), "--set", "infer.precision=int8", "--out", str(tmp_path / "no")
    )
    assert refused.returncode != 0 and "has no gated int8 model" in refused.stderr
    with pytest.raises(ConfigError, match="infer.precision: 'int4' is not one of auto, fp32, fp16, int8"):
        load_run_config(overrides={"infer.precision": "int4"})
