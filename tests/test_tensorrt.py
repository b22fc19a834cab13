"""TensorRT backend tests.

The plan cache key, the fp16 conversion, the CLI and availability reporting are tested
for real everywhere. Building and running plans needs TensorRT, cuda-python and an NVIDIA
GPU; those tests skip elsewhere with the reason ``TrtEngine.available()`` gives.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines import tensorrt as trt_engine
from engines.base import EngineError, EngineOptions
from engines.bundle import Bundle, load_bundle
from engines.export import build_engine as build_engine_cli
from engines.export import fp16, tensorrt_plan
from engines.export.reference import make_reference_bundle
from engines.onnxruntime import OrtEngine
from engines.registry import select_engine
from engines.tensorrt import (
    CACHE_ENV,
    PARITY,
    PlanKey,
    TrtEngine,
    TrtOptions,
    cache_key,
    cache_paths,
    clip_profile,
    default_cache_dir,
    engine_profile,
    plan_key,
)
from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]
TRT_OK, TRT_REASON = TrtEngine.available()
needs_trt = pytest.mark.skipif(not TRT_OK, reason=f"TensorRT engine unavailable: {TRT_REASON}")
without_trt = pytest.mark.skipif(TRT_OK, reason="TensorRT is available here")

# fp16 keeps 11 significant bits: values in [0, 1] round by up to 2**-11 = 4.9e-4 per operation, and a
# few operations chain, so ONNX Runtime's fp16 results are compared at 2e-3; TensorRT plans are held to
# engines.tensorrt.PARITY per precision. A mask pixel flips only where it lies within rounding of the mean.
ORT_FP16_ATOL = 2e-3
MIN_MASK_AGREEMENT = 0.99


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_reference_bundle(tmp_path_factory.mktemp("bundle") / "reference", work=4)


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path) -> Bundle:
    return load_bundle(bundle_dir)


def frames(n: int, seed: int, size: int = 224) -> np.ndarray:
    """Noise frames of different brightness, so per-frame statistics differ between frames."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.1, 1.0, (n, 1, 1))
    return (rng.random((n, size, size)) * scale * 255).astype(np.uint8)


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """ONNX element type of every named tensor, after shape inference."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


# --------------------------------------------------------------------------- plan cache key

BASE_KEY = PlanKey(
    tensorrt_version="10.9.0.34",
    gpu_name="NVIDIA H100 80GB HBM3",
    compute_capability=(9, 0),
    precision="fp16",
    profile=(1, 8, 32),
    bundle_sha256="ab" * 32,
    strongly_typed=False,
    recipe="build-2",
)
KEY_CHANGES = {
    "tensorrt_version": "10.13.0.35",
    "gpu_name": "NVIDIA L4",
    "compute_capability": (8, 9),
    "precision": "fp32",
    "profile": (1, 8, 16),
    "bundle_sha256": "cd" * 32,
    "strongly_typed": True,
    "recipe": "build-3",
}


def test_cache_key_is_stable() -> None:
    assert cache_key(BASE_KEY) == cache_key(dataclasses.replace(BASE_KEY))
    # Pinned: a change here silently orphans every plan already cached on deployed machines.
    assert cache_key(BASE_KEY) == "fcbac67e4e8f9eb3c78d"


def test_key_changes_cover_every_field() -> None:
    assert set(KEY_CHANGES) == {f.name for f in dataclasses.fields(PlanKey)}


@pytest.mark.parametrize("field", sorted(KEY_CHANGES))
def test_cache_key_changes_with_each_field(field: str, tmp_path: Path) -> None:
    changed = dataclasses.replace(BASE_KEY, **{field: KEY_CHANGES[field]})
    assert cache_key(changed) != cache_key(BASE_KEY)
    assert cache_paths(tmp_path, changed).plan != cache_paths(tmp_path, BASE_KEY).plan


def test_cache_paths(tmp_path: Path) -> None:
    paths = cache_paths(tmp_path, BASE_KEY)
    assert paths.plan == tmp_path / f"fp16-b1-8-32-{cache_key(BASE_KEY)}.plan"
    assert paths.meta == paths.plan.with_suffix(".json")
    assert paths.timing_cache.parent == tmp_path and paths.timing_cache.suffix == ".cache"
    # Kernel timings depend on TensorRT and the GPU only, so other precisions and profiles share them.
    other_build = dataclasses.replace(BASE_KEY, precision="fp32", profile=(1, 4, 8), bundle_sha256="0" * 64)
    assert cache_paths(tmp_path, other_build).timing_cache == paths.timing_cache
    other_gpu = dataclasses.replace(BASE_KEY, gpu_name="NVIDIA L4", compute_capability=(8, 9))
    assert cache_paths(tmp_path, other_gpu).timing_cache != paths.timing_cache


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "plans"))
    assert default_cache_dir() == tmp_path / "plans"
    monkeypatch.delenv(CACHE_ENV)
    assert default_cache_dir() == Path.home() / ".cache" / "sweepstream" / "trt"


@pytest.mark.parametrize(
    ("profile", "bundle_range", "expected"),
    [
        ((1, 8, 32), (1, 32), (1, 8, 32)),
        ((1, 8, 32), (1, 16), (1, 8, 16)),
        ((1, 8, 32), (1, 4), (1, 4, 4)),
        ((1, 8, 32), (2, 32), (2, 8, 32)),
        ((1, 8, 32), (16, 64), (16, 16, 32)),
        ((1, 1, 1), (4, 4), (4, 4, 4)),
    ],
)
def test_clip_profile(profile: tuple, bundle_range: tuple, expected: tuple) -> None:
    assert clip_profile(profile, *bundle_range) == expected


@pytest.mark.parametrize("profile", [(0, 1, 2), (4, 2, 8), (1, 9, 8)])
def test_clip_profile_rejects_unordered(profile: tuple) -> None:
    with pytest.raises(EngineError, match="1 <= min <= opt <= max"):
        clip_profile(profile, 1, 32)


@pytest.mark.parametrize(
    ("profile", "bundle_range", "max_batch", "expected"),
    [
        ((1, 8, 32), (1, 32), 8, (1, 8, 32)),
        ((4, 8, 32), (1, 32), 8, (1, 8, 32)),  # min lowered: the engine is sent batches of 1 (warm-up too)
        ((1, 2, 4), (1, 32), 8, (1, 2, 8)),  # max raised to what infer may send
        ((8, 8, 8), (2, 16), 4, (2, 8, 8)),
        ((1, 8, 32), (2, 16), 16, (2, 8, 16)),
        ((1, 1, 1), (4, 4), 4, (4, 4, 4)),
    ],
)
def test_engine_profile_covers_every_batch_the_engine_takes(
    profile: tuple, bundle_range: tuple, max_batch: int, expected: tuple
) -> None:
    lo, opt, hi = engine_profile(profile, *bundle_range, max_batch)
    assert (lo, opt, hi) == expected
    assert lo == bundle_range[0] and hi >= max_batch and lo <= opt <= hi <= bundle_range[1]


DEVICE = {"tensorrt_version": "11.4.0.106", "gpu_name": "NVIDIA H200", "compute_capability": (9, 0)}


def test_plan_key_carries_the_build_recipe(bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    """Editing the builder settings or the fp16 conversion (its fp32 ops, the converter's version) changes
    the key, so a stale plan is rebuilt rather than reused."""
    typed = {"precision": "fp16", "profile": (1, 8, 32), "strongly_typed": True, **DEVICE}
    weak = {**typed, "strongly_typed": False}
    key, weak_key = plan_key(bundle, **typed), plan_key(bundle, **weak)
    assert key.recipe == f"build-{tensorrt_plan.BUILD_RECIPE}+{fp16.recipe()}"
    assert fp16.recipe().startswith(f"ort-float16-{ort.__version__}-")
    assert weak_key.recipe == f"build-{tensorrt_plan.BUILD_RECIPE}"  # FP16 flag: no converted copy

    monkeypatch.setattr(fp16, "FP32_OPS", (*fp16.FP32_OPS, "Gelu"))
    assert cache_key(plan_key(bundle, **typed)) != cache_key(key)
    assert plan_key(bundle, **weak) == weak_key
    monkeypatch.undo()
    monkeypatch.setattr(ort, "__version__", "99.0.0")
    assert cache_key(plan_key(bundle, **typed)) != cache_key(key)
    monkeypatch.undo()
    monkeypatch.setattr(tensorrt_plan, "BUILD_RECIPE", tensorrt_plan.BUILD_RECIPE + 1)
    assert cache_key(plan_key(bundle, **typed)) != cache_key(key)
    assert cache_key(plan_key(bundle, **weak)) != cache_key(weak_key)


# --------------------------------------------------------------------------- fp16 conversion


def test_fp16_reference_model_keeps_io_types_and_matches_fp32(bundle_dir: Path, tmp_path: Path) -> None:
    src = bundle_dir / "model.onnx"
    dst = fp16.convert_to_fp16(src, tmp_path / "model.fp16.onnx")
    model = onnx.load(str(dst))
    io = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert io == {
        "image": TensorProto.UINT8,
        "quality": TensorProto.FLOAT,
        "mask": TensorProto.UINT8,
        "planes": TensorProto.FLOAT,
    }
    types = tensor_types(model)
    assert types["work_weight"] == TensorProto.FLOAT16  # the MatMul chain really runs in fp16
    assert {types[name] for node in model.graph.node if node.op_type in ("ReduceMean", "Softmax")
            for name in [*node.input[:1], *node.output]} == {TensorProto.FLOAT}

    batch = frames(6, seed=1)
    want = run_onnx(src, {"image": batch})
    got = run_onnx(dst, {"image": batch})
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in want.items()}
    np.testing.assert_allclose(got["quality"], want["quality"], atol=ORT_FP16_ATOL)
    np.testing.assert_allclose(got["planes"], want["planes"], atol=ORT_FP16_ATOL)
    assert (got["mask"] == want["mask"]).mean() > MIN_MASK_AGREEMENT


def layer_norm_model() -> onnx.ModelProto:
    """x -> MatMul -> LayerNormalization -> MatMul -> y, all fp32."""
    rng = np.random.default_rng(3)
    dim = 64
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (dim, dim)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(1, 0.1, dim).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.normal(0, 0.1, dim).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.normal(0, 0.5, (dim, dim)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["n", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "layer_norm",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_fp16_keeps_layer_normalization_fp32(tmp_path: Path) -> None:
    src = tmp_path / "ln.onnx"
    onnx.save(layer_norm_model(), str(src))
    dst = fp16.convert_to_fp16(src, tmp_path / "ln.fp16.onnx")
    model = onnx.load(str(dst))
    types = tensor_types(model)
    [norm] = [node for node in model.graph.node if node.op_type == "LayerNormalization"]
    assert {types[name] for name in [*norm.input, *norm.output]} == {TensorProto.FLOAT}
    assert types["w1"] == types["w2"] == TensorProto.FLOAT16
    assert types["x"] == types["y"] == TensorProto.FLOAT

    x = np.random.default_rng(4).normal(0, 1, (5, 64)).astype(np.float32)
    want = run_onnx(src, {"x": x})["y"]
    got = run_onnx(dst, {"x": x})["y"]
    # Outputs are O(1)-O(10) sums of 64 products of fp16-rounded values: 2e-2 is a few fp16 roundings.
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    ("route", "threshold"),
    [("in_memory", 0), ("from_file", 1024)],
)
def test_fp16_keeps_external_data_external(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, route: str, threshold: int
) -> None:
    """Models over 2 GB store weights outside the protobuf; small ones saved that way stand in.

    The file route is the one models over ``IN_MEMORY_LIMIT`` take; its source keeps small
    constants inline, as onnx.save does by default.
    """
    if route == "from_file":
        monkeypatch.setattr(fp16, "IN_MEMORY_LIMIT", 0)
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    onnx.save(onnx.load(str(bundle_dir / "model.onnx")), str(src),
              save_as_external_data=True, location="model.onnx.data", size_threshold=threshold)
    dst = fp16.convert_to_fp16(src, tmp_path / "out" / "model.fp16.onnx")
    assert (dst.parent / "model.fp16.onnx.data").is_file()
    stored = onnx.load(str(dst), load_external_data=False)
    assert any(onnx.external_data_helper.uses_external_data(t) for t in stored.graph.initializer)
    batch = frames(2, seed=2)
    got = run_onnx(dst, {"image": batch})
    want = run_onnx(bundle_dir / "model.onnx", {"image": batch})
    np.testing.assert_allclose(got["quality"], want["quality"], atol=ORT_FP16_ATOL)
    np.testing.assert_allclose(got["planes"], want["planes"], atol=ORT_FP16_ATOL)


def test_fp16_from_file_fails_loudly_on_external_shape_constants(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documented limit of the file route: it cannot type a graph whose shape constants are external."""
    monkeypatch.setattr(fp16, "IN_MEMORY_LIMIT", 0)
    src = tmp_path / "model.onnx"
    onnx.save(onnx.load(str(bundle_dir / "model.onnx")), str(src),
              save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    with pytest.raises(onnx.shape_inference.InferenceError):
        fp16.convert_to_fp16(src, tmp_path / "out" / "model.fp16.onnx")


# --------------------------------------------------------------------------- availability and errors


def test_available_never_raises() -> None:
    ok, reason = TrtEngine.available()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason
    if not ok:
        assert reason.startswith(("tensorrt ", "cuda-python ", "no CUDA GPU", "CUDA query failed",
                                  "the NVIDIA driver ", "TensorRT's wheels "))


@without_trt
def test_select_trt_names_the_reason(bundle: Bundle) -> None:
    with pytest.raises(EngineError) as info:
        select_engine("trt", bundle, EngineOptions())
    assert str(info.value) == f"engine 'trt' is not available: {TRT_REASON}"
    _, reason = select_engine("auto", bundle, EngineOptions())
    assert f"trt: {TRT_REASON}" in reason or "trt: no NVIDIA GPU" in reason


@without_trt
def test_load_without_tensorrt_fails_clearly(bundle: Bundle) -> None:
    engine = TrtEngine(bundle, EngineOptions())
    with pytest.raises(EngineError, match=re.escape(f"engine 'trt' is not available: {TRT_REASON}")):
        engine.load()
    with pytest.raises(EngineError, match="not loaded"):
        engine.infer(frames(1, seed=0))
    engine.close()
    engine.close()


def test_engine_options_checked_without_cuda(bundle: Bundle) -> None:
    with pytest.raises(EngineError, match="only on a CUDA GPU"):
        TrtEngine(bundle, EngineOptions(device="cpu"))
    with pytest.raises(EngineError, match="int8 runs on --engine ort"):
        TrtEngine(bundle, EngineOptions(precision="int8"))
    assert TrtEngine(bundle, EngineOptions(precision="fp32")).precision == "fp32"
    engine = TrtEngine(bundle, EngineOptions(device="cuda:1", max_batch=8))
    assert engine.device_id == 1 and engine.profile == (1, 8, 32)
    info = engine.describe()
    assert info["backend"] == "tensorrt" and info["plan"] is None and info["precision"] == "fp16"


def test_trt_options_shape_the_plan(bundle: Bundle, tmp_path: Path) -> None:
    own = TrtOptions(cache_dir=str(tmp_path), profile=(1, 2, 4), progress=True)
    engine = TrtEngine(bundle, EngineOptions(max_batch=8), own)
    assert engine.backend_options is own
    assert engine.profile == (1, 2, 8)  # max raised to what infer may send
    assert TrtEngine(bundle, EngineOptions(max_batch=2), own).profile == (1, 2, 4)
    high_min = TrtOptions(profile=(4, 8, 32))
    assert TrtEngine(bundle, EngineOptions(max_batch=8), high_min).profile == (1, 8, 32)  # batch 1 fits
    assert engine.describe()["profile"] == [1, 2, 8]
    with pytest.raises(EngineError, match="1 <= min <= opt <= max"):
        TrtOptions(profile=(4, 2, 8))


def test_trt_options_from_the_run_config_reach_the_engine(
    bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The [infer.trt] table and --set infer.trt.* reach the engine through the call the infer stage makes.

    LABELLED FAKE: `available` is forced true so the engine is built (never loaded) without TensorRT."""
    monkeypatch.setattr(TrtEngine, "available", classmethod(lambda cls: (True, "LABELLED FAKE")))
    path = tmp_path / "run.toml"
    path.write_text(f'[infer]\nengine = "trt"\nbundle = "{bundle.path}"\n'
                    f'[infer.trt]\ncache_dir = "{tmp_path / "plans"}"\nprofile = [1, 2, 4]\n')
    config = load_config(path, {"infer.trt.progress": "true"})
    cfg = config.infer
    options = EngineOptions(max_batch=cfg.max_batch, device=cfg.device, precision=cfg.precision)
    engine, reason = select_engine(cfg.engine, bundle, options, cfg.backends)
    assert reason == "trt: requested" and isinstance(engine, TrtEngine)
    assert engine.backend_options == TrtOptions(cache_dir=str(tmp_path / "plans"), profile=(1, 2, 4),
                                                progress=True)
    assert engine.profile == (1, 2, 8)


FAKE_TENSORRT = """
import os
__version__ = os.environ["FAKE_TRT_VERSION"]
if os.environ.get("FAKE_TRT_API") == "1":
    class Builder: ...
"""
FAKE_CUDART = """
import enum, os

class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorNoDevice = 100

class _Prop:
    name = b"Fake GPU\\x00\\x00"
    major = 9
    minor = 0

def cudaGetDeviceCount():
    count = int(os.environ["FAKE_GPUS"])
    return (cudaError_t.cudaSuccess, count) if count else (cudaError_t.cudaErrorNoDevice, 0)

def cudaGetDeviceProperties(device):
    return cudaError_t.cudaSuccess, _Prop()

def cudaDriverGetVersion():
    return cudaError_t.cudaSuccess, int(os.environ["FAKE_DRIVER"])

def cudaRuntimeGetVersion():
    return cudaError_t.cudaSuccess, int(os.environ["FAKE_RUNTIME"])
"""
PROBE = """
import sys
import engines.tensorrt as trt_engine
assert not [m for m in sys.modules if m.startswith(("tensorrt", "cuda"))], "imported at module import"
print(trt_engine.TrtEngine.available())
"""


CUDA12, CUDA13 = ("12040", "12040", ""), ("13000", "13000", "")
"""(driver, cuda-python runtime, TensorRT wheel): versions as cudaDriverGetVersion and cudaRuntimeGetVersion
give them, and the installed wheel's name ("" for a TensorRT installed without a CUDA-major wheel name)."""


@pytest.mark.parametrize(
    ("version", "api", "gpus", "cuda", "expected"),
    [
        ("10.9.0", "1", "0", CUDA12, "(False, 'no CUDA GPU (cudaErrorNoDevice)')"),
        ("10.9.0", "1", "1", CUDA12,
         "(True, 'tensorrt 10.9.0, 1 CUDA GPU(s), device 0: Fake GPU (compute 9.0)')"),
        ("11.4.0", "1", "1", ("13000", "13000", "tensorrt-cu13"),
         "(True, 'tensorrt 11.4.0, 1 CUDA GPU(s), device 0: Fake GPU (compute 9.0)')"),
        ("8.6.1", "1", "1", CUDA13, "(False, 'tensorrt 8.6.1 is too old (need 10 or newer)')"),
        ("10.9.0", "0", "1", CUDA13,
         "(False, 'tensorrt 10.9.0 is a placeholder package without the TensorRT API')"),
        ("11.4.0", "1", "0", ("12040", "13000", "tensorrt-cu12"),
         "(False, 'the NVIDIA driver supports CUDA up to 12.4 but cuda-python is built for CUDA 13: "
         "install the gpu-cu12 extra or a newer driver')"),
        ("11.4.0", "1", "0", ("12080", "12080", "tensorrt_cu13_libs"),
         "(False, \"the NVIDIA driver supports CUDA up to 12.8 but TensorRT's wheels are tensorrt-cu13: "
         "install the gpu-cu12 extra or a newer driver\")"),
        ("11.4.0", "1", "1", ("13000", "12090", "tensorrt-cu13"),
         "(False, \"TensorRT's wheels are tensorrt-cu13 but cuda-python is built for CUDA 12: install one "
         "extra, gpu-cu13 or gpu-cu12\")"),
    ],
)
def test_available_reads_cuda_python_results(
    tmp_path: Path, version: str, api: str, gpus: str, cuda: tuple[str, str, str], expected: str
) -> None:
    """LABELLED FAKE: stand-in tensorrt and cuda-python modules (neither can exist in this workplace) with
    the documented cuda-python shapes ((error, value) tuples, enum errors), and a stand-in wheel record
    naming TensorRT's CUDA major; the GPU tests below run the real libraries where they exist.

    A CUDA-major mismatch between the driver, cuda-python and TensorRT's wheels is named, not reported as
    "no CUDA GPU". Also checks that importing the engine module imports neither library: CUDA state must
    not exist before the pipeline starts its processes.
    """
    driver, runtime, wheel = cuda
    if wheel:
        record = tmp_path / f"{wheel.replace('-', '_')}-{version}.dist-info"
        record.mkdir()
        (record / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {wheel}\nVersion: {version}\n")
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.py").write_text(FAKE_TENSORRT)
    (tmp_path / "cuda" / "bindings").mkdir(parents=True)
    (tmp_path / "cuda" / "bindings" / "__init__.py").write_text("")
    (tmp_path / "cuda" / "bindings" / "runtime.py").write_text(FAKE_CUDART)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]),
        "FAKE_TRT_VERSION": version,
        "FAKE_TRT_API": api,
        "FAKE_GPUS": gpus,
        "FAKE_DRIVER": driver,
        "FAKE_RUNTIME": runtime,
    }
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(PROBE)], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


# ------------------------------------------------------------------ build and run logic (LABELLED FAKE)


class FakeTrt:
    """LABELLED FAKE: the slice of the TensorRT 10.x Python API that build_plan and _Session call, recording
    what they ask (TensorRT cannot be installed here). Return conventions are the documented ones:
    add_optimization_profile gives an index or -1; set_timing_cache and set_tensor_address give a bool;
    a timing cache from another device is refused by set_timing_cache(..., ignore_mismatch=False)."""

    __version__ = "10.9.0"
    profile_index = 0  # what add_optimization_profile returns

    class BuilderFlag(enum.IntEnum):
        FP16 = 0
        TF32 = 6

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        STRONGLY_TYPED = 1

    class TensorIOMode(enum.Enum):
        INPUT = 1
        OUTPUT = 2

    class Logger:
        WARNING = 2

        def __init__(self, severity: int) -> None:
            self.severity = severity

    class TimingCache:
        def __init__(self, blob: bytes) -> None:
            self.blob = blob

        def serialize(self) -> bytes:
            return self.blob + b"+timings"

    class Config:
        def __init__(self) -> None:
            self.flags = {FakeTrt.BuilderFlag.TF32}  # TensorRT's default
            self.profiles: list[Any] = []
            self.timing_cache: Any = None

        def set_flag(self, flag: Any) -> None:
            self.flags.add(flag)

        def clear_flag(self, flag: Any) -> None:
            self.flags.discard(flag)

        def add_optimization_profile(self, profile: Any) -> int:
            self.profiles.append(profile)
            return FakeTrt.profile_index

        def create_timing_cache(self, blob: bytes) -> Any:
            return FakeTrt.TimingCache(bytes(blob))

        def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
            if cache.blob.startswith(b"OTHER-GPU") and not ignore_mismatch:
                return False
            self.timing_cache = cache
            return True

    class Network:
        num_inputs = 1

        def get_input(self, index: int) -> Any:
            return types.SimpleNamespace(name="image", shape=(-1, 224, 224))

    class Builder:
        built: ClassVar[list[Any]] = []

        def __init__(self, logger: Any) -> None:
            pass

        def create_network(self, flags: int) -> Any:
            return FakeTrt.Network()

        def create_builder_config(self) -> Any:
            return FakeTrt.Config()

        def create_optimization_profile(self) -> Any:
            shapes: dict[str, tuple] = {}
            return types.SimpleNamespace(shapes=shapes,
                                         set_shape=lambda name, *mom: shapes.update({name: mom}))

        def build_serialized_network(self, network: Any, config: Any) -> bytes:
            FakeTrt.Builder.built.append(config)
            return b"PLAN"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network: Any, logger: Any) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            return True

    @staticmethod
    def nptype(dtype: Any) -> Any:
        return dtype


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> type[FakeTrt]:
    """LABELLED FAKE: FakeTrt stands in for the tensorrt module in build_plan."""
    monkeypatch.setattr(tensorrt_plan, "import_tensorrt", lambda: FakeTrt)
    monkeypatch.setattr(FakeTrt, "profile_index", 0)
    FakeTrt.Builder.built.clear()
    return FakeTrt


@pytest.mark.parametrize(("precision", "flags"), [("fp32", set()), ("fp16", {"FP16", "TF32"})])
def test_build_plan_fp32_is_true_fp32(fake_trt: type[FakeTrt], tmp_path: Path, precision: str,
                                      flags: set[str]) -> None:
    """LABELLED FAKE (FakeTrt): TF32, on by default, is cleared for an fp32 plan, which is then held to fp32
    parity; fp16 plans keep it (their fp32 layers may use it)."""
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    tensorrt_plan.build_plan(tmp_path / "model.onnx", tmp_path / "p.plan", precision=precision,
                             profile=(1, 4, 8), strongly_typed=False)
    [config] = fake_trt.Builder.built
    assert {flag.name for flag in config.flags} == flags
    assert config.profiles[0].shapes == {"image": ((1, 224, 224), (4, 224, 224), (8, 224, 224))}
    assert (tmp_path / "p.plan").read_bytes() == b"PLAN"
    assert PARITY["fp32"].score_atol < PARITY["fp16"].score_atol


def test_build_plan_timing_cache_from_another_gpu_falls_back_to_a_fresh_one(
    fake_trt: type[FakeTrt], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """LABELLED FAKE (FakeTrt): a refused timing cache is replaced by a fresh one, the plan is written and the
    cache file rewritten from the cache the build really used."""
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"OTHER-GPU")
    tensorrt_plan.build_plan(tmp_path / "model.onnx", tmp_path / "p.plan", precision="fp16",
                             timing_cache=timing, strongly_typed=False)
    assert "does not fit this TensorRT and GPU; starting a fresh one" in caplog.text
    assert fake_trt.Builder.built[0].timing_cache.blob == b""
    assert timing.read_bytes() == b"+timings" and (tmp_path / "p.plan").is_file()
    tensorrt_plan.build_plan(tmp_path / "model.onnx", tmp_path / "p.plan", precision="fp16",
                             timing_cache=timing, strongly_typed=False)
    assert fake_trt.Builder.built[1].timing_cache.blob == b"+timings"  # its own cache is reused
    assert timing.read_bytes() == b"+timings+timings"


def test_build_plan_refused_profile_is_named(fake_trt: type[FakeTrt], tmp_path: Path) -> None:
    """LABELLED FAKE (FakeTrt): add_optimization_profile's -1 stops the build with the profile named."""
    fake_trt.profile_index = -1
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    with pytest.raises(EngineError, match=re.escape("refused the batch profile (1, 8, 32)")):
        tensorrt_plan.build_plan(tmp_path / "model.onnx", tmp_path / "p.plan", precision="fp16",
                                 strongly_typed=False)
    assert not (tmp_path / "p.plan").exists()


class FakeCudart:
    """LABELLED FAKE: cuda-python's runtime calls that _Session makes, recorded with the calling thread;
    pinned host memory is real (ctypes) so the numpy views work, device pointers are plain numbers."""

    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def __init__(self) -> None:
        self.calls: list[tuple[int, str, tuple]] = []
        self.host: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> tuple:
            self.calls.append((threading.get_ident(), name, args))
            if name == "cudaMallocHost":
                self.host.append(ctypes.create_string_buffer(args[0]))
                return 0, ctypes.addressof(self.host[-1])
            return (0, 4096 * len(self.calls)) if name in ("cudaMalloc", "cudaStreamCreate") else (0,)

        return call


class FakePlan:
    """LABELLED FAKE: a deserialized engine with one uint8 input and one float output, [N, 4] each."""

    num_io_tensors = 2
    accept_address = True

    def get_tensor_name(self, index: int) -> str:
        return ("image", "score")[index]

    def get_tensor_dtype(self, name: str) -> Any:
        return np.uint8 if name == "image" else np.float32

    def get_tensor_mode(self, name: str) -> Any:
        return FakeTrt.TensorIOMode.INPUT if name == "image" else FakeTrt.TensorIOMode.OUTPUT

    def create_execution_context(self) -> Any:
        plan, shape = self, [0]
        return types.SimpleNamespace(
            set_input_shape=lambda name, dims: shape.__setitem__(0, dims[0]) or True,
            get_tensor_shape=lambda name: (shape[0], 4),
            set_tensor_address=lambda name, ptr: plan.accept_address,
            execute_async_v3=lambda handle: True,
        )


def test_session_makes_its_device_current_on_the_calling_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """LABELLED FAKE (FakeCudart, FakePlan): every CUDA call of a run made from another thread than the load
    follows cudaSetDevice of the engine's device; a refused tensor address is an error naming the tensor."""
    monkeypatch.setattr(trt_engine, "_native_handle", lambda stream: stream)
    cudart, plan = FakeCudart(), FakePlan()
    session = trt_engine._Session(FakeTrt, cudart, 1, plan, runtime=None, logger=None)
    session.allocate("image", (4, 4))
    outputs: dict[str, np.ndarray] = {}
    worker = threading.Thread(target=lambda: outputs.update(session.run(np.ones((2, 4), np.uint8))))
    worker.start()
    worker.join()
    on_worker = [(name, args) for thread, name, args in cudart.calls if thread == worker.ident]
    assert on_worker[0] == ("cudaSetDevice", (1,)) and len(on_worker) > 1
    assert outputs["score"].shape == (2, 4)
    plan.accept_address = False
    with pytest.raises(EngineError, match="rejected the address of 'image'"):
        session.run(np.ones((2, 4), np.uint8))
    cudart.calls.clear()
    session.close()
    assert cudart.calls[0][1:] == ("cudaSetDevice", (1,))
    assert sum(name == "cudaFreeHost" for _, name, _ in cudart.calls) == 2


# --------------------------------------------------------------------------- build_engine CLI


def build_engine(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "tools" / "build_engine.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)


def test_build_engine_help() -> None:
    result = build_engine("--help")
    assert result.returncode == 0
    for text in ("--config", "--set", "--bundle", "--precision", "--profile", "--max-batch", "--cache",
                 "--force", "plan cache", "compute capability", "build recipe"):
        assert text in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--profile", "9,8,32"), "1 <= min <= opt <= max"),
        (("--set", "infer.trt.profil=1,2,3"), "unknown option infer.trt.profil"),
        (("--set", "infer.max_batch"), "expected SECTION.KEY=VALUE"),
    ],
)
def test_build_engine_rejects_a_bad_configuration(bundle_dir: Path, args: tuple, message: str) -> None:
    result = build_engine("--bundle", str(bundle_dir), *args)
    assert result.returncode == 2 and result.stderr.startswith("build_engine: error: ")
    assert message in result.stderr


def test_build_engine_builds_the_plan_the_run_asks_for(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tool and the infer stage read the same run config and resolve it through the same engine, so a
    plan built ahead has the key the run looks up, non-default profile and max batch included.

    LABELLED FAKE: `available` is forced true so the pipeline's engine is built (never loaded) without
    TensorRT; the key's device fields are given, as a GPU would report them."""
    monkeypatch.setattr(TrtEngine, "available", classmethod(lambda cls: (True, "LABELLED FAKE")))
    config_path = tmp_path / "run.toml"
    config_path.write_text(f'[infer]\nengine = "trt"\nbundle = "{bundle_dir}"\nmax_batch = 16\n'
                           f'precision = "fp32"\n[infer.trt]\nprofile = [4, 8, 12]\n')
    config = load_config(config_path)
    cfg = config.infer
    run_options = EngineOptions(device=cfg.device, max_batch=cfg.max_batch, precision=cfg.precision)
    run_engine, _ = select_engine(cfg.engine, load_bundle(cfg.bundle), run_options, cfg.backends)
    args = build_engine_cli.build_parser().parse_args(["--config", str(config_path), "--gpu", "1"])
    tool_engine = build_engine_cli.plan_engine(build_engine_cli.read_config(args), args.gpu)
    assert tool_engine.profile == run_engine.profile == (1, 8, 16)  # min lowered, max raised to 16

    def key(engine: TrtEngine) -> str:
        return cache_key(plan_key(engine.bundle, precision=engine.precision, profile=engine.profile,
                                  strongly_typed=True, **DEVICE))

    assert key(tool_engine) == key(run_engine)
    shortcuts = build_engine_cli.build_parser().parse_args(
        ["--bundle", str(bundle_dir), "--precision", "fp32", "--max-batch", "16", "--profile", "4,8,12"])
    assert key(build_engine_cli.plan_engine(build_engine_cli.read_config(shortcuts))) == key(run_engine)
    assert key(build_engine_cli.plan_engine(load_config(overrides={"infer.bundle": str(bundle_dir)}))) != key(
        run_engine)


@without_trt
def test_build_engine_without_tensorrt(bundle_dir: Path, tmp_path: Path) -> None:
    result = build_engine("--bundle", str(bundle_dir), "--cache", str(tmp_path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"build_engine: TensorRT is not available here: {TRT_REASON}\n"
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- on a GPU with TensorRT


@pytest.fixture(scope="module")
def ort_reference(bundle: Bundle) -> OrtEngine:
    engine = OrtEngine(bundle, EngineOptions(device="cpu", max_batch=8))
    engine.load()
    return engine


@pytest.fixture(scope="module")
def plan_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("plans")


@pytest.fixture(scope="module", params=["fp16", "fp32"])
def loaded(request: pytest.FixtureRequest, bundle: Bundle, plan_cache: Path) -> Iterator[TrtEngine]:
    options = EngineOptions(max_batch=8, precision=request.param)
    engine = TrtEngine(bundle, options, TrtOptions(cache_dir=str(plan_cache)))
    engine.load()
    yield engine
    engine.close()


@needs_trt
@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 3, 8])
def test_trt_matches_onnxruntime(loaded: TrtEngine, ort_reference: OrtEngine, n: int) -> None:
    batch = frames(n, seed=n)
    got = loaded.infer(batch)
    want = ort_reference.infer(batch)
    for spec in loaded.bundle.outputs.values():
        assert got[spec.name].shape == (n, *spec.shape) and got[spec.name].dtype == np.dtype(spec.dtype)
    parity = PARITY[loaded.precision]
    np.testing.assert_allclose(got["quality"], want["quality"], atol=parity.score_atol)
    np.testing.assert_allclose(got["planes"], want["planes"], atol=parity.score_atol)
    assert (got["mask"] == want["mask"]).mean() >= parity.min_mask_agreement


@needs_trt
@pytest.mark.gpu
def test_trt_outputs_are_copies(loaded: TrtEngine) -> None:
    first = loaded.infer(frames(2, seed=10))
    kept = {name: value.copy() for name, value in first.items()}
    loaded.infer(frames(2, seed=11))
    for name, value in first.items():
        np.testing.assert_array_equal(value, kept[name])


@needs_trt
@pytest.mark.gpu
def test_trt_describe(loaded: TrtEngine, plan_cache: Path) -> None:
    info = loaded.describe()
    assert info["backend"] == "tensorrt" and info["device"] == "cuda:0"
    assert info["precision"] == loaded.precision and info["max_batch"] == 8
    assert info["version"] and info["gpu"] and re.fullmatch(r"\d+\.\d+", info["compute_capability"])
    assert info["cache"] in ("built", "hit") and info["profile"] == [1, 8, 32]
    plan = Path(info["plan"])
    assert plan.parent == plan_cache and plan.is_file()
    meta = json.loads(plan.with_suffix(".json").read_text())
    assert meta["key_fields"]["bundle_sha256"] == loaded.bundle.sha256
    assert meta["key_fields"]["precision"] == loaded.precision


@needs_trt
@pytest.mark.gpu
def test_trt_second_load_hits_cache(loaded: TrtEngine, plan_cache: Path) -> None:
    plan = Path(loaded.describe()["plan"])
    before = plan.stat().st_mtime_ns
    options = EngineOptions(max_batch=8, precision=loaded.precision)
    again = TrtEngine(loaded.bundle, options, TrtOptions(cache_dir=str(plan_cache)))
    again.load()
    try:
        info = again.describe()
        assert info["cache"] == "hit" and info["build_seconds"] == 0.0 and Path(info["plan"]) == plan
        assert plan.stat().st_mtime_ns == before
        batch = frames(3, seed=5)
        np.testing.assert_array_equal(again.infer(batch)["mask"], loaded.infer(batch)["mask"])
    finally:
        again.close()
        again.close()


@needs_trt
@pytest.mark.gpu
def test_trt_rejects_batches_over_max(loaded: TrtEngine) -> None:
    with pytest.raises(EngineError, match="outside the engine's batch range 1..8"):
        loaded.infer(frames(9, seed=0))


@needs_trt
@pytest.mark.gpu
def test_build_engine_builds_then_reuses(bundle_dir: Path, tmp_path: Path) -> None:
    args = ("--bundle", str(bundle_dir), "--cache", str(tmp_path), "--precision", "fp32", "--max-batch", "8")
    first = build_engine(*args)
    assert first.returncode == 0, first.stderr
    plan = re.search(r"^plan: (.+)$", first.stdout, re.M)
    assert plan and Path(plan.group(1)).is_file() and re.search(r"^key: [0-9a-f]{20} ", first.stdout, re.M)
    assert re.search(r"^build: \d+\.\d s$", first.stdout, re.M)
    second = build_engine(*args)
    assert second.returncode == 0 and "build: cached plan reused" in second.stdout


@needs_trt
@pytest.mark.gpu
def test_plan_built_ahead_is_a_cache_hit_for_the_run(bundle: Bundle, bundle_dir: Path,
                                                     tmp_path: Path) -> None:
    """The issue's case: non-default profile and max batch; the run must find the tool's plan, not rebuild."""
    first = build_engine("--bundle", str(bundle_dir), "--cache", str(tmp_path), "--precision", "fp32",
                         "--profile", "2,4,8", "--max-batch", "6")
    assert first.returncode == 0, first.stderr
    options = EngineOptions(max_batch=6, precision="fp32")
    engine = TrtEngine(bundle, options, TrtOptions(cache_dir=str(tmp_path), profile=(2, 4, 8)))
    engine.load()
    try:
        assert engine.describe()["cache"] == "hit" and engine.profile == (1, 4, 8)
        engine.infer(frames(1, seed=0))
    finally:
        engine.close()
