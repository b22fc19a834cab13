"""The model bundle format: reading, validating and writing a bundle directory.

A bundle is a directory holding ``bundle.json`` and one ONNX file (plus, optionally,
the torch reference engine's model file named by ``model.torch`` and a gated int8 copy
of the ONNX model named by ``model.int8``). Everything the pipeline needs to feed the
model (input size, channels, resize) and to read its outputs (names, shapes, dtypes,
plane classes, which output picks the best frame) comes from the manifest, so no stage
hard-codes model details.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_NAME = "bundle.json"
BUNDLE_FORMAT = "sweepstream-bundle"
BUNDLE_FORMAT_VERSION = 1

OUTPUT_KINDS = ("quality", "mask", "planes", "embedding")
FLOAT_DTYPES = ("float16", "float32", "float64")
RESIZE_MODES = ("bicubic", "bilinear", "area", "nearest")
PRECISIONS = ("fp32", "fp16", "int8")

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HASH_CHUNK = 1 << 20


class BundleError(ValueError):
    """A bundle directory is missing, malformed, or does not match its model."""

    @classmethod
    def at(cls, bundle_path: str | os.PathLike[str], problem: str) -> BundleError:
        """Build the one-line message "bundle <path>: <problem>" used for every bundle failure."""
        return cls(f"bundle {bundle_path}: {problem}")


# --------------------------------------------------------------------------- bundle specs


@dataclass(frozen=True)
class InputSpec:
    """How frames must be prepared before they reach the engine."""

    name: str
    size: int
    channels: int
    dtype: str
    layout: str
    pad_to_square: bool
    resize: str
    normalization: str

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """Shape of one frame without the batch dimension."""
        if self.channels == 1:
            return (self.size, self.size)
        return (self.size, self.size, self.channels)


@dataclass(frozen=True)
class OutputSpec:
    """One named model output; ``shape`` excludes the batch dimension."""

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    classes: tuple[str, ...] | None
    description: str


@dataclass(frozen=True)
class BestFrameSpec:
    """Which output ranks frames when the pipeline picks the best one of a sweep."""

    output: str
    class_name: str | None
    class_index: int | None = None
    min_score: float | None = None
    """The model's own operating point: the score below which a frame is not worth measuring on (the
    run's ``sweep.min_score`` overrides it; without either the pipeline uses 0.5)."""

    def __post_init__(self) -> None:
        if (self.class_name is None) != (self.class_index is None):
            raise ValueError("BestFrameSpec needs class_index exactly when class_name is set")

    def score(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Return one float64 score per batch item: the quality value, or the chosen class's probability."""
        values = np.asarray(outputs[self.output])
        if self.class_index is None:
            return values.reshape(values.shape[0]).astype(np.float64)
        return values[:, self.class_index].astype(np.float64)


@dataclass(frozen=True)
class Bundle:
    """A validated bundle; ``manifest`` is the parsed bundle.json kept for provenance."""

    path: Path
    name: str
    version: str
    manifest: dict[str, Any]
    input: InputSpec
    outputs: dict[str, OutputSpec]
    best_frame: BestFrameSpec
    model_path: Path
    sha256: str
    min_batch: int
    max_batch: int
    int8_path: Path | None = None
    """The gated int8 model (``model.int8``), or None when the bundle has none."""

    @property
    def precision(self) -> str:
        """Numeric precision the model was exported in (``model.precision``, default fp32)."""
        return self.manifest["model"].get("precision", "fp32")


# --------------------------------------------------------------------------- manifest parsing

_MISSING = object()
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "a boolean", list: "a list", dict: "an object"}
_NUMBER = (int, float)


class _Section:
    """Typed reads from one JSON object of bundle.json; remembers which keys were read.

    Tracking reads lets :meth:`finish` reject unknown keys, so a typo such as
    ``"pad_to_sqaure"`` fails loudly instead of silently falling back to a default.
    """

    def __init__(self, bundle_path: Path, obj: Any, prefix: str) -> None:
        self.bundle_path = bundle_path
        self.prefix = prefix
        if not isinstance(obj, dict):
            raise self.error(f"{prefix.rstrip('.') or 'top level'} must be an object")
        self.obj = obj
        self.seen: set[str] = set()

    def error(self, problem: str) -> BundleError:
        return BundleError.at(self.bundle_path, f"{MANIFEST_NAME}: {problem}")

    def key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def get(self, key: str, kind: type, default: Any = _MISSING, nullable: bool = False) -> Any:
        self.seen.add(key)
        if key not in self.obj:
            if default is _MISSING:
                raise self.error(f"missing key '{self.key(key)}'")
            return default
        value = self.obj[key]
        if value is None and nullable:
            return None
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            expected = _TYPE_NAMES[kind] + (" or null" if nullable else "")
            raise self.error(f"'{self.key(key)}' must be {expected}, got {json.dumps(value)}")
        return value

    def get_choice(self, key: str, choices: tuple[Any, ...], kind: type = str) -> Any:
        value = self.get(key, kind)
        if value not in choices:
            allowed = ", ".join(map(json.dumps, choices))
            raise self.error(f"'{self.key(key)}' must be one of {allowed}, got {json.dumps(value)}")
        return value

    def get_number(self, key: str, low: float, high: float) -> float:
        """An int or float (not a bool) within [low, high]."""
        self.seen.add(key)
        if key not in self.obj:
            raise self.error(f"missing key '{self.key(key)}'")
        value = self.obj[key]
        if isinstance(value, bool) or not isinstance(value, _NUMBER) or not low <= value <= high:
            problem = f"must be a number in [{low}, {high}], got {json.dumps(value)}"
            raise self.error(f"'{self.key(key)}' {problem}")
        return float(value)

    def get_sha256(self, key: str) -> str:
        value = self.get(key, str)
        if not _SHA256_RE.fullmatch(value):
            raise self.error(f"'{self.key(key)}' must be 64 lowercase hex digits")
        return value

    def get_names(self, key: str) -> list[str]:
        """A list of non-empty strings."""
        values = self.get(key, list)
        if not all(isinstance(v, str) and v for v in values):
            problem = f"must be a list of non-empty strings, got {json.dumps(values)}"
            raise self.error(f"'{self.key(key)}' {problem}")
        return values

    def get_int(self, key: str, minimum: int) -> int:
        value = self.get(key, int)
        if value < minimum:
            raise self.error(f"'{self.key(key)}' must be >= {minimum}, got {value}")
        return value

    def get_text(self, key: str, default: Any = _MISSING) -> str:
        value = self.get(key, str, default)
        if value is not None and not value.strip():
            raise self.error(f"'{self.key(key)}' must not be empty")
        return value

    def section(self, key: str) -> _Section:
        return _Section(self.bundle_path, self.get(key, dict), f"{self.key(key)}.")

    def finish(self) -> None:
        unknown = sorted(set(self.obj) - self.seen)
        if unknown:
            raise self.error(f"unknown key '{self.key(unknown[0])}'")


def _parse_input(top: _Section) -> InputSpec:
    sec = top.section("input")
    spec = InputSpec(
        name=sec.get_text("name"),
        size=sec.get_int("size", 1),
        channels=sec.get_choice("channels", (1, 3), int),
        dtype=sec.get_choice("dtype", ("uint8",)),
        layout=sec.get_choice("layout", ("NHW", "NHWC")),
        pad_to_square=sec.get("pad_to_square", bool),
        resize=sec.get_choice("resize", RESIZE_MODES),
        normalization=sec.get_choice("normalization", ("in_graph",)),
    )
    _parse_statistics(sec)
    sec.finish()
    expected_layout = "NHW" if spec.channels == 1 else "NHWC"
    if spec.layout != expected_layout:
        raise sec.error(f"'input.layout' must be \"{expected_layout}\" for {spec.channels} channel(s)")
    return spec


def _parse_statistics(sec: _Section) -> None:
    """Check the optional, informational ``input.mean`` / ``input.std``: what the graph normalises with."""
    if "mean" not in sec.obj and "std" not in sec.obj:
        return
    for key in ("mean", "std"):
        values = sec.get(key, list)
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if len(values) not in (1, 3) or not numbers or (key == "std" and not all(v > 0 for v in values)):
            kind = "positive numbers" if key == "std" else "numbers"
            raise sec.error(f"'{sec.key(key)}' must be a list of 1 or 3 {kind}, got {json.dumps(values)}")


def _check_sha256(sec: _Section, key: str) -> None:
    """Check an optional sha256 key: 64 lowercase hex digits."""
    if key in sec.obj and not _SHA256_RE.fullmatch(sec.get(key, str)):
        raise sec.error(f"'{sec.key(key)}' must be 64 lowercase hex digits")


def _parse_int8(model: _Section, taken: set[str], fp32_sha256: str) -> str:
    """Check ``model.int8`` (written by engines.export.quantize) and return its file name.

    The entry is the int8 file, its sha256, and the accuracy gate it passed against this
    bundle's model.onnx. Only a passing gate is ever recorded, so a gate that misses its
    own thresholds, or one run against another model.onnx, means the manifest was edited
    or the fp32 model rebuilt since: either way the int8 model is not vouched for.
    """
    sec = model.section("int8")
    name = sec.get_text("onnx")
    if Path(name).name != name or name in taken:
        problem = "a file name inside the bundle, distinct from the other models"
        raise sec.error(f"'model.int8.onnx' must be {problem}, got {json.dumps(name)}")
    sec.get_sha256("sha256")
    gate = sec.section("gate")
    gate.get_text("method")
    gate.get_text("onnxruntime")
    if gate.get_sha256("fp32_sha256") != fp32_sha256:
        raise gate.error(
            "'model.int8.gate.fp32_sha256' is not 'model.sha256': the int8 model was gated against another "
            "model.onnx; re-run tools/quantize_bundle.py"
        )
    frames = gate.section("frames")
    frames.get_int("count", 1)
    frames.get_text("source")
    frames.get_sha256("sha256")
    frames.finish()
    quant = gate.section("quantization")
    quant.get_names("op_types")
    quant.get("per_channel", bool)
    quant.get_text("weight_type")
    quant.get_int("quantized_nodes", 1)
    quant.get_names("fp32_nodes")
    quant.finish()
    threshold = gate.section("threshold")
    min_cosine = threshold.get_number("embedding_cosine_min", 0.0, 1.0)
    min_top1 = threshold.get_number("planes_top1_agreement", 0.0, 1.0)
    if "int8_batch_max_abs_diff" in threshold.obj:  # gates since batch invariance was checked
        threshold.get_number("int8_batch_max_abs_diff", 0.0, 0.0)
    threshold.finish()
    results = gate.section("results")
    cosine = results.get_number("embedding_cosine_min", -1.0, 1.0)
    results.get_number("embedding_cosine_mean", -1.0, 1.0)
    top1 = results.get_number("planes_top1_agreement", 0.0, 1.0)
    results.get_number("planes_max_abs_diff", 0.0, 1.0)
    # Present when the bundle has those heads, and since batch invariance was checked.
    for key in ("quality_max_abs_diff", "mask_agreement", "int8_batch_max_abs_diff"):
        if key in results.obj:
            results.get_number(key, 0.0, 1.0)
    results.finish()
    passed = gate.get("passed", bool)
    gate.finish()
    sec.finish()
    if not (passed and cosine >= min_cosine and top1 >= min_top1):
        raise gate.error(
            f"'model.int8.gate' does not pass its own thresholds (passed {json.dumps(passed)}, embedding "
            f"cosine min {cosine} vs {min_cosine}, planes top-1 agreement {top1} vs {min_top1}); "
            "only a passing gate may be recorded"
        )
    return name


def _parse_output(top: _Section, name: str, obj: Any) -> OutputSpec:
    sec = _Section(top.bundle_path, obj, f"outputs.{name}.")
    kind = sec.get_choice("kind", OUTPUT_KINDS)
    shape_list = sec.get("shape", list)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape_list):
        raise sec.error(f"'{sec.key('shape')}' must be a list of positive integers, got {shape_list}")
    shape = tuple(shape_list)
    dtype = sec.get_choice("dtype", ("uint8",) if kind == "mask" else FLOAT_DTYPES)
    classes = None
    if kind == "planes":
        class_list = sec.get("classes", list)
        if not all(isinstance(c, str) and c for c in class_list) or len(set(class_list)) != len(class_list):
            raise sec.error(f"'{sec.key('classes')}' must be unique non-empty strings, got {class_list}")
        classes = tuple(class_list)
    description = sec.get("description", str, "")
    sec.finish()

    expected_rank = {"quality": 0, "mask": 2, "planes": 1, "embedding": 1}[kind]
    if len(shape) != expected_rank:
        raise sec.error(f"'{sec.key('shape')}' must have {expected_rank} dimension(s) for kind '{kind}'")
    if classes is not None and (len(classes) < 2 or shape != (len(classes),)):
        raise sec.error(f"'{sec.key('shape')}' must be [{len(classes)}] to match at least 2 classes")
    return OutputSpec(name, kind, shape, dtype, classes, description)


def _parse_best_frame(top: _Section, outputs: dict[str, OutputSpec]) -> BestFrameSpec:
    sec = top.section("best_frame")
    output_name = sec.get_text("output")
    class_name = sec.get_text("class", None)
    min_score = sec.get_number("min_score", 0.0, 1.0) if "min_score" in sec.obj else None
    sec.finish()
    out = outputs.get(output_name)
    if out is None:
        raise BundleError.at(top.bundle_path, f"best_frame.output '{output_name}' is not an output")
    if out.kind == "quality":
        if class_name is not None:
            problem = f"best_frame.class is not allowed for quality output '{out.name}'"
            raise BundleError.at(top.bundle_path, problem)
        return BestFrameSpec(output_name, None, min_score=min_score)
    if out.kind == "planes":
        assert out.classes is not None
        if class_name is None:
            problem = f"best_frame.class is required for planes output '{out.name}'"
            raise BundleError.at(top.bundle_path, problem)
        if class_name not in out.classes:
            raise BundleError.at(
                top.bundle_path, f"best_frame.class '{class_name}' is not one of {', '.join(out.classes)}"
            )
        return BestFrameSpec(output_name, class_name, out.classes.index(class_name), min_score)
    problem = f"best_frame.output '{output_name}' has kind '{out.kind}'; use a quality or planes output"
    raise BundleError.at(top.bundle_path, problem)


def _parse_training(sec: _Section) -> None:
    """Check the optional ``training`` section of a bundle trained by this project (tools/train_demo.py).

    It makes a trained bundle reproducible and accountable: the exact ``command`` that rebuilds it, the
    ``seeds`` it was trained with, and the ``metrics`` it reached on held-out data; ``data``, ``schedule``,
    ``software`` and ``wall_seconds`` say what went in and how long it took.
    """
    sec.get_text("command")
    sec.get("seeds", dict)
    sec.get("metrics", dict)
    for key in ("data", "schedule", "software"):
        if key in sec.obj:
            sec.get(key, dict)
    if "wall_seconds" in sec.obj:
        sec.get_number("wall_seconds", 0.0, 1e9)
    sec.finish()


def _parse_manifest(bundle_path: Path, manifest: Any) -> Bundle:
    """Validate a manifest without touching the model files."""
    top = _Section(bundle_path, manifest, "")
    top.get_choice("format", (BUNDLE_FORMAT,))
    top.get_choice("format_version", (BUNDLE_FORMAT_VERSION,), int)
    name = top.get_text("name")
    if not _NAME_RE.fullmatch(name):
        raise top.error(f"'name' must use only letters, digits, '.', '_' and '-', got {json.dumps(name)}")
    version = top.get_text("version")
    top.get_text("description")
    top.get_text("license")

    source = top.section("source")
    source.get_text("built_by")
    checkpoint_sha = source.get("checkpoint_sha256", str, None, nullable=True)
    if checkpoint_sha is not None and not _SHA256_RE.fullmatch(checkpoint_sha):
        raise source.error("'source.checkpoint_sha256' must be 64 lowercase hex digits or null")
    if "config" in source.obj:
        source.get("config", dict)
    _check_sha256(source, "heads_sha256")
    _check_sha256(source, "prompts_sha256")
    source.finish()

    model = top.section("model")
    onnx_name = model.get_text("onnx")
    if Path(onnx_name).name != onnx_name:
        raise model.error(f"'model.onnx' must be a file name inside the bundle, got {json.dumps(onnx_name)}")
    sha256 = model.get_text("sha256")
    if not _SHA256_RE.fullmatch(sha256):
        raise model.error("'model.sha256' must be 64 lowercase hex digits")
    if "precision" in model.obj:
        model.get_choice("precision", PRECISIONS)
    taken = {onnx_name}
    if "torch" in model.obj:
        torch_name = model.get_text("torch")
        taken.add(torch_name)
        if Path(torch_name).name != torch_name or torch_name == onnx_name:
            problem = f"'model.torch' must be a file name inside the bundle, got {json.dumps(torch_name)}"
            raise model.error(problem)
        if "torch_sha256" not in model.obj:
            raise model.error("missing key 'model.torch_sha256' (required with 'model.torch')")
        _check_sha256(model, "torch_sha256")
    elif "torch_sha256" in model.obj:
        raise model.error("'model.torch_sha256' needs 'model.torch'")
    int8_name = _parse_int8(model, taken, sha256) if "int8" in model.obj else None
    model.finish()

    input_spec = _parse_input(top)

    batch = top.section("batch")
    min_batch = batch.get_int("min", 1)
    max_batch = batch.get_int("max", min_batch)
    batch.finish()

    outputs_obj = top.get("outputs", dict)
    if not outputs_obj:
        raise top.error("'outputs' must name at least one output")
    outputs = {name: _parse_output(top, name, obj) for name, obj in outputs_obj.items()}
    best_frame = _parse_best_frame(top, outputs)

    if "pixel_spacing" in top.obj:
        spacing = top.section("pixel_spacing")
        spacing.get_choice("source", ("input",))
        spacing.finish()
    if "training" in top.obj:
        _parse_training(top.section("training"))
    top.finish()

    return Bundle(
        path=bundle_path,
        name=name,
        version=version,
        manifest=manifest,
        input=input_spec,
        outputs=outputs,
        best_frame=best_frame,
        model_path=bundle_path / onnx_name,
        sha256=sha256,
        min_batch=min_batch,
        max_batch=max_batch,
        int8_path=bundle_path / int8_name if int8_name is not None else None,
    )


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB models do not need to fit in memory twice."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- model signature checks

TensorSig = tuple[str, tuple[int | None, ...] | None]
"""(numpy dtype name, dims) of a model tensor as a backend reports it; None marks an unknown dim or rank."""


def check_model_io(
    bundle: Bundle, inputs: Mapping[str, TensorSig], outputs: Mapping[str, TensorSig], source: str
) -> None:
    """Check that a model's inputs and outputs (as ``source`` reports them) fit the manifest.

    Shared by :func:`load_bundle` (reading the ONNX graph) and by engines (reading their
    session), so every backend rejects a mismatched model with the same wording.
    """
    spec = bundle.input

    def fail(problem: str) -> BundleError:
        return BundleError.at(bundle.path, f"{source}: {problem}")

    def check_dims(what: str, dims: tuple[int | None, ...] | None, expected: tuple[int, ...]) -> None:
        if dims is None:
            return
        if len(dims) != 1 + len(expected):
            want = 1 + len(expected)
            raise fail(f"{what} has rank {len(dims)}, manifest implies {want} (batch + {expected})")
        batch_dim = dims[0]
        if batch_dim is not None and not bundle.min_batch == bundle.max_batch == batch_dim:
            batch_range = f"{bundle.min_batch}..{bundle.max_batch}"
            raise fail(f"{what} has fixed batch {batch_dim} but manifest batch is {batch_range}")
        for axis, (got, want) in enumerate(zip(dims[1:], expected, strict=True), start=1):
            if got is not None and got != want:
                raise fail(f"{what} dim {axis} is {got}, manifest says {want}")

    if spec.name not in inputs:
        names = ", ".join(inputs)
        raise fail(f"input '{spec.name}' from the manifest is not a model input (model inputs: {names})")
    extra = sorted(set(inputs) - {spec.name})
    if extra:
        raise fail(f"model needs inputs the engine cannot feed: {', '.join(extra)}")
    in_dtype, in_dims = inputs[spec.name]
    if in_dtype != spec.dtype:
        raise fail(f"input '{spec.name}' is {in_dtype}, manifest says {spec.dtype}")
    check_dims(f"input '{spec.name}'", in_dims, spec.frame_shape)

    for out in bundle.outputs.values():
        if out.name not in outputs:
            raise fail(f"output '{out.name}' is missing (model outputs: {', '.join(outputs)})")
        dtype, dims = outputs[out.name]
        if not np.can_cast(np.dtype(dtype), np.dtype(out.dtype), casting="same_kind"):
            raise fail(f"output '{out.name}' is {dtype}, which cannot be cast to manifest dtype {out.dtype}")
        check_dims(f"output '{out.name}'", dims, out.shape)


def _onnx_io(bundle: Bundle, path: Path) -> tuple[dict[str, TensorSig], dict[str, TensorSig]]:
    import onnx  # deferred: only bundle loading needs it, engines import their own runtime
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as exc:
        problem = f"{path.name} is not a valid ONNX model ({exc})"
        raise BundleError.at(bundle.path, problem) from exc

    def sig(value: Any) -> TensorSig:
        tensor_type = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        if not tensor_type.HasField("shape"):
            return dtype, None
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
        return dtype, dims

    initializers = {init.name for init in model.graph.initializer}
    inputs = {v.name: sig(v) for v in model.graph.input if v.name not in initializers}
    outputs = {v.name: sig(v) for v in model.graph.output}
    return inputs, outputs


# --------------------------------------------------------------------------- load / write


def _read_manifest(bundle_path: Path) -> Any:
    if not bundle_path.is_dir():
        raise BundleError.at(bundle_path, "not a directory")
    manifest_path = bundle_path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError.at(bundle_path, f"{MANIFEST_NAME} not found")
    try:
        return json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError.at(bundle_path, f"{MANIFEST_NAME}: invalid JSON ({exc})") from exc


def _check_model_file(bundle: Bundle, path: Path, expected_sha256: str) -> None:
    """The file exists, has the manifest's sha256, and its ONNX inputs and outputs fit the manifest."""
    if not path.is_file():
        raise BundleError.at(bundle.path, f"{path.name} not found")
    actual = file_sha256(path)
    if actual != expected_sha256:
        problem = f"{path.name} sha256 mismatch (manifest {expected_sha256[:12]}.., file {actual[:12]}..)"
        raise BundleError.at(bundle.path, problem)
    inputs, outputs = _onnx_io(bundle, path)
    check_model_io(bundle, inputs, outputs, path.name)


def _validate(bundle_path: Path, manifest: Any) -> Bundle:
    bundle = _parse_manifest(bundle_path, manifest)
    _check_model_file(bundle, bundle.model_path, bundle.sha256)
    if bundle.int8_path is not None:
        _check_model_file(bundle, bundle.int8_path, manifest["model"]["int8"]["sha256"])
    return bundle


def load_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Load and fully validate a bundle directory.

    The model file is hashed on every load: it is cheap next to building a session and
    it catches a half-copied or edited bundle before a model silently scores frames.
    """
    bundle_path = Path(path).resolve()
    return _validate(bundle_path, _read_manifest(bundle_path))


def write_manifest(bundle_dir: str | os.PathLike[str], manifest: Mapping[str, Any]) -> Bundle:
    """Write bundle.json for the model already in ``bundle_dir`` and return the loaded bundle.

    ``model.sha256`` is filled in from the model file. The manifest is validated before
    anything is written and the bundle is re-loaded afterwards, so no tool can leave an
    invalid bundle behind. The caller's mapping is not modified.
    """
    bundle_path = Path(bundle_dir).resolve()
    data = copy.deepcopy(dict(manifest))
    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("onnx"), str):
        raise BundleError.at(bundle_path, f"{MANIFEST_NAME}: missing key 'model.onnx'")
    model_file = bundle_path / model["onnx"]
    if not model_file.is_file():
        raise BundleError.at(bundle_path, f"{model['onnx']} not found")
    model["sha256"] = file_sha256(model_file)
    _validate(bundle_path, data)

    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    tmp = bundle_path / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, bundle_path / MANIFEST_NAME)
    return load_bundle(bundle_path)
