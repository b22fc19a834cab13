"""ONNX Runtime engine: the portable default that runs a bundle on CPU, or CUDA when present.

onnxruntime is imported on first use, not at module import: the run config imports every backend
module to read its options.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from engines.base import Engine, EngineError, EngineOptions
from engines.bundle import Bundle, TensorSig, check_model_io

if TYPE_CHECKING:
    import onnxruntime as ort

_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"
X64_QUANT_PRECISION = ("session.x64quantprecision", "1")
"""Session config entry: exact int8 products on x86-64 CPUs without VNNI; see session_options."""

# ONNX Runtime reports tensor types as "tensor(<onnx type>)"; map them to numpy dtype names.
_ORT_TYPES = {
    "tensor(bool)": "bool",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(uint16)": "uint16",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(float16)": "float16",
    "tensor(float)": "float32",
    "tensor(double)": "float64",
}


def session_options(threads: int) -> ort.SessionOptions:
    """The engine's session settings, shared with the int8 gate so it measures the graph the engine runs.

    ``session.x64quantprecision`` (:data:`X64_QUANT_PRECISION`): on x86-64 CPUs without VNNI (AVX2 or
    AVX-512 alone: AMD Zen 2/3, older Intel), ONNX Runtime's uint8 x int8 kernels add pairs of products
    in int16 (VPMADDUBSW) and saturate at 32767, so an int8 model's outputs depend on the CPU: the tiny
    FetalCLIP's int8 embeddings fall from cosine 0.99997 to 0.990. With the option on, such CPUs get the
    int8 weights converted to uint8 at load time (exact uint8 x uint8 kernels); on VNNI and Arm CPUs it
    changes nothing, nor for float models. The int8 gate and every engine then compute the same numbers.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry(*X64_QUANT_PRECISION)
    opts.inter_op_num_threads = 1
    if threads > 0:
        opts.intra_op_num_threads = threads
    return opts


def run_session(session: ort.InferenceSession, names: list[str], input_name: str, batch: np.ndarray,
                per_frame: bool) -> list[np.ndarray]:
    """One batch through a session. `per_frame` runs it a frame at a time: dynamic int8 quantization
    computes its activation scales over the whole input tensor, so a frame's score would depend on its
    batch-mates (up to 0.010 in `quality` on the demo bundle); on a CPU a batch of N costs N frames anyway,
    so nothing is lost. The int8 gate measures through this same function."""
    if not per_frame or len(batch) == 1:
        return session.run(names, {input_name: batch})
    rows = [session.run(names, {input_name: batch[i : i + 1]}) for i in range(len(batch))]
    return [np.concatenate([row[k] for row in rows]) for k in range(len(names))]


def _signature(node: Any) -> TensorSig:
    if node.type not in _ORT_TYPES:
        raise EngineError(f"onnxruntime tensor '{node.name}' has unsupported type {node.type}")
    dims = tuple(d if isinstance(d, int) else None for d in node.shape)
    return _ORT_TYPES[node.type], dims


class OrtEngine(Engine):
    """Runs one of the bundle's ONNX files in an ONNX Runtime session.

    ``device`` "auto" uses CUDA only when this onnxruntime build offers it; an explicit
    "cuda" fails instead of silently running on CPU, since a CPU run would miss the
    frame budget without saying why.

    ``precision`` picks the file: "fp32" the bundle's model.onnx; "int8" its gated int8
    model (dynamic quantization, whose integer kernels are CPU kernels, so it runs on
    CPU only, a frame at a time: see :func:`run_session`); "auto" the int8 model when the
    bundle has one and the session runs on CPU, else model.onnx. fp16 is refused: ONNX
    Runtime on CPU has no fp16 speed to offer.
    """

    type_key: ClassVar[str] = "ort"

    def __init__(self, bundle: Bundle, options: EngineOptions) -> None:
        super().__init__(bundle, options)
        if options.precision == "fp16":
            raise EngineError(
                "precision fp16 is not an onnxruntime option here (no fp16 speed-up on CPU); use the trt "
                "engine (fp16 plans) or the torch engine on CUDA (fp16 autocast)"
            )
        if options.precision == "int8" and bundle.int8_path is None:
            raise EngineError(
                f"bundle {bundle.name} has no gated int8 model; build it with tools/quantize_bundle.py"
            )
        if options.precision == "int8" and options.device.startswith("cuda"):
            raise EngineError(
                f"precision int8 runs on CPU only (dynamic quantization), but device is '{options.device}'"
            )
        self._session: ort.InferenceSession | None = None
        self._device = options.device
        self._precision = options.precision
        self._model_path: Path | None = None
        self._outputs = [(spec.name, np.dtype(spec.dtype)) for spec in bundle.outputs.values()]
        self._output_names = [name for name, _ in self._outputs]

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ModuleNotFoundError as exc:
            return False, f"{(exc.name or 'onnxruntime').split('.')[0]} is not installed"
        return True, f"onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())})"

    def _providers(self) -> list[Any]:
        import onnxruntime as ort

        device = self.options.device
        offered = ort.get_available_providers()
        if device == "cpu" or self.options.precision == "int8" or (device == "auto" and _CUDA not in offered):
            return [_CPU]
        if _CUDA not in offered:
            raise EngineError(
                f"device '{device}' requested but this onnxruntime has no {_CUDA} "
                f"(offers: {', '.join(offered)})"
            )
        device_id = int(device.partition(":")[2] or 0)
        return [(_CUDA, {"device_id": device_id}), _CPU]

    def _model_choice(self, on_cpu: bool) -> tuple[str, Path]:
        """(precision, file) to run, following the rules in the class docstring."""
        int8, wanted = self.bundle.int8_path, self.options.precision
        if int8 is not None and (wanted == "int8" or (wanted == "auto" and on_cpu)):
            return "int8", int8
        return self.bundle.precision, self.bundle.model_path

    def load(self) -> None:
        """Create the session, check its signature against the manifest, and warm it up."""
        import onnxruntime as ort

        providers = self._providers()
        precision, model_path = self._model_choice(on_cpu=providers[0] == _CPU)
        session = ort.InferenceSession(
            str(model_path), sess_options=session_options(self.options.threads), providers=providers
        )

        wants_cuda = providers[0] != _CPU
        got_cuda = session.get_providers()[0] == _CUDA
        if wants_cuda and not got_cuda and self.options.device != "auto":
            raise EngineError(
                f"device '{self.options.device}' requested but onnxruntime could not start {_CUDA} "
                f"(session providers: {', '.join(session.get_providers())})"
            )
        check_model_io(
            self.bundle,
            {node.name: _signature(node) for node in session.get_inputs()},
            {node.name: _signature(node) for node in session.get_outputs()},
            "onnxruntime session",
        )
        self._device = f"cuda:{providers[0][1]['device_id']}" if got_cuda else "cpu"
        self._precision, self._model_path = precision, model_path
        self._session = session
        self.warm_up()

    def on_cpu(self) -> bool:
        return self._device == "cpu" if self._session is not None else self._providers()[0] == _CPU

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self._session is None:
            raise EngineError("ort engine is not loaded: call load() first")
        self.check_batch(batch)
        results = run_session(self._session, self._output_names, self.bundle.input.name, batch,
                              per_frame=self._precision == "int8")
        return {
            name: value if value.dtype == dtype else value.astype(dtype)
            for (name, dtype), value in zip(self._outputs, results, strict=True)
        }

    def describe(self) -> dict[str, Any]:
        """Before load(), ``precision`` is the requested one and ``model`` is None."""
        import onnxruntime as ort

        return {
            "backend": "onnxruntime",
            "version": ort.__version__,
            "device": self._device,
            "precision": self._precision,
            "model": self._model_path.name if self._model_path is not None else None,
            "max_batch": self.max_batch,
            "bundle": self.bundle.name,
            "bundle_version": self.bundle.version,
            "providers": self._session.get_providers() if self._session is not None else [],
            "threads": self.options.threads,
        }

    def close(self) -> None:
        self._session = None


ENGINE_CLASS = OrtEngine
