"""Engine layer tests: real reference bundles on disk, real ONNX Runtime sessions."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import engines.registry
from engines.base import EngineError, EngineOptions
from engines.bundle import BestFrameSpec, Bundle, BundleError, load_bundle, write_manifest
from engines.export.reference import make_reference_bundle
from engines.kserve import KserveOptions
from engines.null import NullEngine
from engines.onnxruntime import OrtEngine
from engines.registry import ENGINE_MODULES, backend_options, engine_class, select_engine
from engines.tensorrt import TrtEngine, TrtOptions

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_reference_bundle(tmp_path_factory.mktemp("bundle") / "reference")


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path) -> Bundle:
    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def engine(bundle: Bundle) -> OrtEngine:
    eng = OrtEngine(bundle, EngineOptions(max_batch=8))
    eng.load()
    return eng


@pytest.fixture()
def copy_dir(bundle_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the reference bundle that a test may corrupt."""
    target = tmp_path / "copy"
    target.mkdir()
    for name in ("bundle.json", "model.onnx"):
        (target / name).write_bytes((bundle_dir / name).read_bytes())
    return target


def frames(n: int, size: int = 224, channels: int = 1, seed: int = 0) -> np.ndarray:
    shape = (n, size, size) if channels == 1 else (n, size, size, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def load_error(path: Path) -> str:
    """Load a bundle expected to be invalid; return the BundleError message."""
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    return str(info.value)


def edit_manifest(bundle_path: Path, edit) -> None:
    manifest = json.loads((bundle_path / "bundle.json").read_text())
    edit(manifest)
    (bundle_path / "bundle.json").write_text(json.dumps(manifest))


# --------------------------------------------------------------------------- bundles


def test_reference_bundle_loads(bundle: Bundle, bundle_dir: Path) -> None:
    assert bundle.path == bundle_dir.resolve()
    assert bundle.name == "reference-intensity"
    assert bundle.input.name == "image" and bundle.input.size == 224 and bundle.input.channels == 1
    assert bundle.input.frame_shape == (224, 224)
    assert bundle.outputs["quality"].shape == ()
    assert bundle.outputs["mask"].shape == (224, 224) and bundle.outputs["mask"].dtype == "uint8"
    assert bundle.outputs["planes"].classes == ("abdomen", "brain", "other")
    assert bundle.best_frame == BestFrameSpec("quality", None)
    assert (bundle.min_batch, bundle.max_batch) == (1, 32)
    assert "not a medical model" in bundle.manifest["description"]


def test_committed_default_bundle_is_valid() -> None:
    default = load_bundle(REPO / "bundles" / "reference")
    assert default.name == "reference-intensity"


def test_missing_bundle_json(tmp_path: Path) -> None:
    assert load_error(tmp_path) == f"bundle {tmp_path}: bundle.json not found"


def test_missing_key(copy_dir: Path) -> None:
    edit_manifest(copy_dir, lambda m: m["input"].pop("size"))
    assert load_error(copy_dir) == f"bundle {copy_dir}: bundle.json: missing key 'input.size'"


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda m: m.update(colour="red"), "unknown key 'colour'"),
        (lambda m: m["input"].update(pad_to_sqaure=True), "unknown key 'input.pad_to_sqaure'"),
        (lambda m: m["outputs"]["mask"].update(units="px"), "unknown key 'outputs.mask.units'"),
    ],
)
def test_unknown_key(copy_dir: Path, edit, problem: str) -> None:
    edit_manifest(copy_dir, edit)
    assert load_error(copy_dir) == f"bundle {copy_dir}: bundle.json: {problem}"


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda m: m["input"].update(size="224"), "'input.size' must be an integer"),
        (lambda m: m["input"].update(channels=2), "'input.channels' must be one of 1, 3"),
        (lambda m: m["batch"].update(max=0), "'batch.max' must be >= 1"),
        (lambda m: m.update(format_version=True), "'format_version' must be an integer"),
        (lambda m: m["outputs"]["planes"].update(shape=[4]), "'outputs.planes.shape' must be [3]"),
        (lambda m: m["model"].update(onnx="../model.onnx"), "'model.onnx' must be a file name"),
    ],
)
def test_invalid_values(copy_dir: Path, edit, fragment: str) -> None:
    edit_manifest(copy_dir, edit)
    message = load_error(copy_dir)
    assert message.startswith(f"bundle {copy_dir}: bundle.json: ") and fragment in message


def test_sha256_mismatch(copy_dir: Path) -> None:
    model = copy_dir / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    assert re.fullmatch(
        rf"bundle {re.escape(str(copy_dir))}: model.onnx sha256 mismatch "
        r"\(manifest [0-9a-f]{12}\.\., file [0-9a-f]{12}\.\.\)",
        load_error(copy_dir),
    )


def test_best_frame_names_missing_output(copy_dir: Path) -> None:
    edit_manifest(copy_dir, lambda m: m.update(best_frame={"output": "foo"}))
    assert load_error(copy_dir) == f"bundle {copy_dir}: best_frame.output 'foo' is not an output"


def test_best_frame_operating_point(copy_dir: Path) -> None:
    edit_manifest(copy_dir, lambda m: m.update(best_frame={"output": "quality", "min_score": 0.3}))
    assert load_bundle(copy_dir).best_frame == BestFrameSpec("quality", None, min_score=0.3)
    edit_manifest(copy_dir, lambda m: m.update(best_frame={"output": "quality", "min_score": 1.5}))
    assert load_error(copy_dir).endswith("'best_frame.min_score' must be a number in [0.0, 1.0], got 1.5")


def test_best_frame_planes_needs_known_class(copy_dir: Path) -> None:
    edit_manifest(copy_dir, lambda m: m.update(best_frame={"output": "planes", "class": "heart"}))
    assert load_error(copy_dir).endswith("best_frame.class 'heart' is not one of abdomen, brain, other")


def test_manifest_input_name_not_in_onnx(copy_dir: Path) -> None:
    edit_manifest(copy_dir, lambda m: m["input"].update(name="pixels"))
    assert load_error(copy_dir) == (
        f"bundle {copy_dir}: model.onnx: input 'pixels' from the manifest is not a model input "
        "(model inputs: image)"
    )


def test_manifest_output_not_in_onnx(copy_dir: Path) -> None:
    def add_output(m: dict) -> None:
        m["outputs"]["embedding"] = {"kind": "quality", "shape": [], "dtype": "float32"}

    edit_manifest(copy_dir, add_output)
    assert load_error(copy_dir).startswith(f"bundle {copy_dir}: model.onnx: output 'embedding' is missing")


def test_session_signature_checked_by_engine(bundle: Bundle) -> None:
    renamed = dataclasses.replace(bundle, input=dataclasses.replace(bundle.input, name="pixels"))
    with pytest.raises(BundleError, match="onnxruntime session: input 'pixels' from the manifest is not"):
        OrtEngine(renamed, EngineOptions()).load()


def test_write_manifest_validates_before_writing(copy_dir: Path) -> None:
    manifest = json.loads((copy_dir / "bundle.json").read_text())
    before = (copy_dir / "bundle.json").read_text()
    bad = json.loads(json.dumps(manifest))
    bad["best_frame"] = {"output": "mask"}
    with pytest.raises(BundleError, match="has kind 'mask'"):
        write_manifest(copy_dir, bad)
    assert (copy_dir / "bundle.json").read_text() == before

    manifest["model"]["sha256"] = "0" * 64
    manifest["version"] = "1.0.1"
    written = write_manifest(copy_dir, manifest)
    assert manifest["model"]["sha256"] == "0" * 64, "caller's manifest must not be modified"
    assert written.version == "1.0.1"
    assert written.sha256 == load_bundle(copy_dir).sha256 != "0" * 64


def test_make_reference_bundle_tool(tmp_path: Path) -> None:
    out = tmp_path / "tool"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_reference_bundle.py"), "--out", str(out), "--size", "32"],
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = load_bundle(out)
    assert loaded.input.size == 32
    assert loaded.sha256 in result.stdout and str(out) in result.stdout


# --------------------------------------------------------------------------- ORT engine


def check_reference_outputs(outputs: dict[str, np.ndarray], batch: np.ndarray) -> None:
    pixels = batch.astype(np.float64)
    channels = 1 if batch.ndim == 3 else batch.shape[3]
    brightness = pixels if channels == 1 else pixels.sum(axis=3)
    n = batch.shape[0]
    assert outputs["quality"].dtype == np.float32 and outputs["quality"].shape == (n,)
    expected_quality = pixels.mean(axis=tuple(range(1, pixels.ndim))) / 255
    np.testing.assert_allclose(outputs["quality"], expected_quality, atol=1e-6)
    expected_mask = (brightness > brightness.mean(axis=(1, 2), keepdims=True)).astype(np.uint8)
    assert outputs["mask"].dtype == np.uint8
    np.testing.assert_array_equal(outputs["mask"], expected_mask)
    assert outputs["planes"].dtype == np.float32 and outputs["planes"].shape == (n, 3)
    np.testing.assert_allclose(outputs["planes"].sum(axis=1), 1.0, atol=1e-6)
    assert (outputs["planes"] > 0).all()


def test_ort_matches_numpy(engine: OrtEngine) -> None:
    batch = frames(5)
    batch[3] = 77  # flat frame: nothing is brighter than the mean
    batch[4, :, :112], batch[4, :, 112:] = 0, 255  # half dark, half bright
    outputs = engine.infer(batch)
    check_reference_outputs(outputs, batch)
    assert not outputs["mask"][3].any()
    assert outputs["mask"][4].sum() == 224 * 112
    assert outputs["quality"][4] == pytest.approx(0.5)


def test_ort_three_channel_bundle(tmp_path: Path) -> None:
    bundle = load_bundle(make_reference_bundle(tmp_path, size=64, channels=3))
    assert bundle.input.layout == "NHWC" and bundle.input.frame_shape == (64, 64, 3)
    eng = OrtEngine(bundle, EngineOptions(max_batch=4))
    eng.load()
    batch = frames(4, size=64, channels=3)
    check_reference_outputs(eng.infer(batch), batch)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_batch_sizes(engine: OrtEngine, n: int) -> None:
    batch = frames(n, seed=n)
    outputs = engine.infer(batch)
    check_reference_outputs(outputs, batch)
    assert set(outputs) == {"quality", "mask", "planes"}


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (frames(2).astype(np.float32), "batch dtype is float32, bundle reference-intensity needs uint8"),
        (
            frames(2, size=225),
            r"batch shape \(2, 225, 225\) does not match bundle reference-intensity input \(N, 224, 224\)",
        ),
        (frames(2)[..., None], r"batch shape \(2, 224, 224, 1\) does not match"),
        (frames(9), r"batch of 9 frames is outside the engine's batch range 1..8"),
        (frames(1)[:0], r"batch of 0 frames is outside"),
        (frames(1).tolist(), "batch must be a numpy array, got list"),
    ],
)
def test_bad_batches(engine: OrtEngine, batch, message: str) -> None:
    with pytest.raises(EngineError, match=message):
        engine.infer(batch)


def test_max_batch_capped_by_bundle(bundle: Bundle) -> None:
    assert OrtEngine(bundle, EngineOptions(max_batch=100)).max_batch == bundle.max_batch


def test_infer_before_load(bundle: Bundle) -> None:
    with pytest.raises(EngineError, match="not loaded"):
        OrtEngine(bundle, EngineOptions()).infer(frames(1))


def test_describe(engine: OrtEngine) -> None:
    info = engine.describe()
    assert info["backend"] == "onnxruntime" and info["device"] == "cpu" and info["precision"] == "fp32"
    assert info["max_batch"] == 8 and info["bundle"] == "reference-intensity"
    assert info["providers"] == ["CPUExecutionProvider"]


def test_threads_option(bundle: Bundle) -> None:
    eng = OrtEngine(bundle, EngineOptions(threads=1, device="cpu", max_batch=2))
    eng.load()
    batch = frames(2)
    check_reference_outputs(eng.infer(batch), batch)
    assert eng.describe()["threads"] == 1
    eng.close()
    with pytest.raises(EngineError, match="not loaded"):
        eng.infer(batch)


def test_int8_products_are_exact_on_every_cpu() -> None:
    """uint8 x int8 with the largest values: pairs of products (2 x 255 x 127 = 64770) overflow int16, which
    ONNX Runtime's VPMADDUBSW kernels on x86-64 CPUs without VNNI saturate unless the session asks for its
    precise mode, as session_options does; the int8 gate and the engine both build their sessions with it."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from engines.onnxruntime import X64_QUANT_PRECISION, session_options

    depth = 64
    weight = numpy_helper.from_array(np.full((depth, 16), 127, np.int8), "weight")  # constant, as quantized
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "weight"], ["y"])],
        "int8_products",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, depth])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [None, 16])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = session_options(1)
    assert opts.get_session_config_entry(X64_QUANT_PRECISION[0]) == X64_QUANT_PRECISION[1]
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    got = session.run(None, {"a": np.full((2, depth), 255, np.uint8)})[0]
    assert (got == depth * 255 * 127).all()  # saturated: depth / 2 * 32767


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"threads": -1}, "threads"), ({"max_batch": 0}, "max_batch"), ({"device": "gpu"}, "device")],
)
def test_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(EngineError, match=message):
        EngineOptions(**kwargs)


# --------------------------------------------------------------------------- registry / null


def test_auto_picks_ort(bundle: Bundle) -> None:
    eng, reason = select_engine("auto", bundle, EngineOptions())
    assert isinstance(eng, OrtEngine)
    assert reason.startswith("auto: chose ort (") and "trt: " in reason and "torch: " in reason


def test_auto_on_cpu_skips_gpu_backends(bundle: Bundle) -> None:
    eng, reason = select_engine("auto", bundle, EngineOptions(device="cpu"))
    assert isinstance(eng, OrtEngine)
    assert reason == "auto: chose ort (trt: device is cpu; torch: device is cpu)"


def test_explicit_kinds(bundle: Bundle) -> None:
    eng, reason = select_engine("ort", bundle, EngineOptions())
    assert isinstance(eng, OrtEngine) and reason == "ort: requested"
    assert engine_class("null") is NullEngine
    with pytest.raises(EngineError) as info:
        select_engine("trt", bundle, EngineOptions())
    assert str(info.value) == f"engine 'trt' is not available: {TrtEngine.available()[1]}"
    with pytest.raises(EngineError, match="unknown engine 'tflite'"):
        select_engine("tflite", bundle, EngineOptions())


def test_null_engine(bundle: Bundle) -> None:
    eng, reason = select_engine("null", bundle, EngineOptions(max_batch=4))
    assert isinstance(eng, NullEngine) and reason == "null: requested"
    eng.load()
    outputs = eng.infer(frames(3))
    assert {k: (v.shape, v.dtype) for k, v in outputs.items()} == {
        "quality": ((3,), np.float32),
        "mask": ((3, 224, 224), np.uint8),
        "planes": ((3, 3), np.float32),
    }
    assert not any(v.any() for v in outputs.values())
    assert eng.describe()["backend"] == "null"
    with pytest.raises(EngineError, match="batch of 5 frames"):
        eng.infer(frames(5))


# --------------------------------------------------------------------------- best frame


def test_best_frame_score_quality() -> None:
    spec = BestFrameSpec("quality", None)
    outputs = {"quality": np.array([0.1, 0.7, 0.3], dtype=np.float32), "planes": np.zeros((3, 3))}
    scores = spec.score(outputs)
    assert scores.dtype == np.float64 and scores.shape == (3,)
    assert int(np.argmax(scores)) == 1
    np.testing.assert_allclose(scores, [0.1, 0.7, 0.3], rtol=1e-6)


def test_best_frame_score_planes(copy_dir: Path) -> None:
    edit_manifest(copy_dir, lambda m: m.update(best_frame={"output": "planes", "class": "brain"}))
    spec = load_bundle(copy_dir).best_frame
    assert spec == BestFrameSpec("planes", "brain", 1)
    planes = np.array([[0.2, 0.5, 0.3], [0.1, 0.8, 0.1]], dtype=np.float32)
    np.testing.assert_allclose(spec.score({"planes": planes}), [0.5, 0.8], rtol=1e-6)


def test_best_frame_score_on_engine_outputs(engine: OrtEngine, bundle: Bundle) -> None:
    batch = frames(3)
    batch[1] = 250
    assert int(np.argmax(bundle.best_frame.score(engine.infer(batch)))) == 1


# --------------------------------------------------------------------------- work graph


def best_time(eng: OrtEngine, batch: np.ndarray, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        eng.infer(batch)
        times.append(time.perf_counter() - start)
    return min(times)


def test_work_layers_cost_time_but_keep_outputs(engine: OrtEngine, tmp_path: Path) -> None:
    slow = OrtEngine(load_bundle(make_reference_bundle(tmp_path, work=8)), EngineOptions(max_batch=8))
    slow.load()
    batch = frames(8, seed=3)
    batch[0] = 0
    fast_out, slow_out = engine.infer(batch), slow.infer(batch)
    for name in ("quality", "mask", "planes"):
        np.testing.assert_array_equal(slow_out[name], fast_out[name])
    check_reference_outputs(slow_out, batch)
    assert best_time(slow, batch) > best_time(engine, batch)


# --------------------------------------------------------------------------- registry extension


FAKE_ENGINE = '''
from engines.null import NullEngine

class FakeEngine(NullEngine):
    type_key = "{kind}"

    @classmethod
    def available(cls):
        return {ok}, "{reason}"

ENGINE_CLASS = FakeEngine
'''


def install_fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kind: str, source: str) -> None:
    """Register a throwaway module under ``kind``, as a new backend file would be.

    LABELLED FAKE: TensorRT and a CUDA GPU cannot exist in this workplace, so the order in which `auto`
    prefers backends that *are* usable is shown with stand-in modules; tests/test_tensorrt.py runs the
    real TensorRT backend where it exists."""
    module = f"fake_{kind}_{tmp_path.name}"
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(ENGINE_MODULES, kind, module)


def test_backend_with_missing_library_is_unavailable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bundle: Bundle
) -> None:
    install_fake(monkeypatch, tmp_path, "trt", "import tensorrt_not_installed_here\n")
    with pytest.raises(EngineError) as info:
        engine_class("trt")
    assert str(info.value) == "engine 'trt' is not available: tensorrt_not_installed_here is not installed"
    monkeypatch.setattr(engines.registry, "nvidia_driver_present", lambda: True)  # LABELLED FAKE: no GPU here
    _, reason = select_engine("auto", bundle, EngineOptions())
    assert reason.startswith("auto: chose ort (trt: tensorrt_not_installed_here is not installed; torch: ")


def test_auto_without_a_gpu_driver_never_imports_gpu_backends(bundle: Bundle) -> None:
    """On a cart without an NVIDIA driver, auto must not pay for importing torch (seconds) to learn that."""
    if engines.registry.nvidia_driver_present():
        pytest.skip("this machine has an NVIDIA driver")
    code = ("import sys; from engines.base import EngineOptions; from engines.bundle import load_bundle; "
            "from engines.registry import select_engine; b = load_bundle(sys.argv[1]); "
            "print(select_engine('auto', b, EngineOptions())[1]); print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(bundle.path)], capture_output=True, text=True,
                            check=True)
    chosen, torch_imported = result.stdout.splitlines()
    assert chosen == "auto: chose ort (trt: no NVIDIA GPU; torch: no NVIDIA GPU)"
    assert torch_imported == "False"


def test_auto_prefers_available_backends_in_order(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bundle: Bundle
) -> None:
    monkeypatch.setattr(engines.registry, "nvidia_driver_present", lambda: True)  # LABELLED FAKE: no GPU here
    install_fake(monkeypatch, tmp_path, "torch", FAKE_ENGINE.format(kind="torch", ok=False, reason="no CUDA"))
    _, reason = select_engine("auto", bundle, EngineOptions())
    assert reason == f"auto: chose ort (trt: {TrtEngine.available()[1]}; torch: no CUDA)"

    install_fake(monkeypatch, tmp_path, "trt", FAKE_ENGINE.format(kind="trt", ok=True, reason="ready"))
    eng, reason = select_engine("auto", bundle, EngineOptions())
    assert eng.type_key == "trt" and reason == "auto: chose trt"


# --------------------------------------------------------------------------- each backend's own options


def test_backends_declare_their_own_options() -> None:
    assert backend_options() == {"trt": TrtOptions, "kserve": KserveOptions}
    assert OrtEngine.options_type is None and NullEngine.options_type is None


def test_select_engine_hands_each_backend_its_own_options(
    bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    eng, _ = select_engine("null", bundle, EngineOptions(), {"trt": TrtOptions(profile=(1, 2, 4))})
    assert isinstance(eng, NullEngine)  # another backend's options are not its business
    monkeypatch.setattr(TrtEngine, "available", classmethod(lambda cls: (True, "LABELLED FAKE")))
    own = TrtOptions(cache_dir="/plans", profile=(1, 2, 4))
    eng, _ = select_engine("trt", bundle, EngineOptions(max_batch=4), {"trt": own})
    assert isinstance(eng, TrtEngine) and eng.backend_options is own and eng.profile == (1, 2, 4)
    eng, _ = select_engine("trt", bundle, EngineOptions())
    assert eng.backend_options == TrtOptions()


@pytest.mark.parametrize(("kind", "backend", "message"), [
    ("null", {"null": {"x": 1}}, "engine 'null' has no options of its own"),
    ("trt", {"trt": {"cache_dir": "/x"}}, "engine 'trt' takes TrtOptions, got dict"),
    ("null", {"tflite": {}}, "options for unknown engine 'tflite'"),
])
def test_select_engine_refuses_options_that_do_not_fit(
    bundle: Bundle, monkeypatch: pytest.MonkeyPatch, kind: str, backend: dict, message: str
) -> None:
    monkeypatch.setattr(TrtEngine, "available", classmethod(lambda cls: (True, "LABELLED FAKE")))
    with pytest.raises(EngineError, match=re.escape(message)):
        select_engine(kind, bundle, EngineOptions(), backend)


HEAVY = ("torch", "tensorrt", "cuda", "onnxruntime", "open_clip", "tritonclient", "kserve", "grpc")


def imported_after(code: str, *args: str) -> list[str]:
    """Modules of HEAVY packages, and of engines.export, that `code` imports in a fresh process."""
    probe = (f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules "
             f"if m.split('.')[0] in {HEAVY!r} or m.startswith('engines.export'))))")
    result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True,
                            cwd=REPO)
    return json.loads(result.stdout)


def test_backend_modules_import_no_library() -> None:
    """The run config imports every backend module for its options: none may import its library."""
    code = "".join(f"import {module}\n" for module in ENGINE_MODULES.values())
    assert imported_after(code) == []


def test_cart_runtime_imports_no_torch(bundle: Bundle) -> None:
    """The cart's runtime (the pipeline and the ONNX Runtime engine, loaded and run) needs no torch and no
    export code."""
    code = textwrap.dedent("""
        import sys
        import numpy as np
        import pipeline.infer, pipeline.supervisor
        from engines.base import EngineOptions
        from engines.bundle import load_bundle
        from engines.registry import select_engine
        bundle = load_bundle(sys.argv[1])
        engine, _ = select_engine("ort", bundle, EngineOptions(max_batch=2))
        engine.load()
        engine.infer(np.zeros((2, *bundle.input.frame_shape), np.uint8))
    """)
    loaded = imported_after(code, str(bundle.path))
    assert not [m for m in loaded if not m.startswith("onnxruntime")], loaded


def test_an_int8_frame_scores_the_same_alone_and_in_a_batch(tmp_path: Path) -> None:
    """Dynamic int8 quantization scales activations over the whole input tensor, batch included; the ORT
    engine runs int8 a frame at a time, so a frame's outputs do not depend on its batch-mates."""
    from engines.export.quantize import sample_frames

    bundle = load_bundle(REPO / "bundles" / "demo")
    frames = sample_frames(8)
    engine, _ = select_engine("ort", bundle, EngineOptions(max_batch=8, precision="int8", threads=1))
    engine.load()
    batched = engine.infer(frames)
    for i in range(len(frames)):
        alone = engine.infer(frames[i : i + 1])
        for name, value in alone.items():
            assert np.array_equal(value[0], batched[name][i]), name
    engine.close()
