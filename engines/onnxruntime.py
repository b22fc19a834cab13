"""ONNX Runtime engine: the portable default that runs a bundle on CPU, or CUDA when present."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort

from engines.base import Bundle, Engine, EngineError, EngineOptions, TensorSig, check_model_io

_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"

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


def _signature(node: Any) -> TensorSig:
    if node.type not in _ORT_TYPES:
        raise EngineError(f"onnxruntime tensor '{node.name}' has unsupported type {node.type}")
    dims = tuple(d if isinstance(d, int) else None for d in node.shape)
    return _ORT_TYPES[node.type], dims


class OrtEngine(Engine):
    """Runs the bundle's ONNX file in an ONNX Runtime session.

    ``device`` "auto" uses CUDA only when this onnxruntime build offers it; an explicit
    "cuda" fails instead of silently running on CPU, since a CPU run would miss the
    frame budget without saying why.
    """

    type_key: ClassVar[str] = "ort"

    def __init__(self, bundle: Bundle, options: EngineOptions) -> None:
        super().__init__(bundle, options)
        self._session: ort.InferenceSession | None = None
        self._device = options.device
        self._outputs = [(spec.name, np.dtype(spec.dtype)) for spec in bundle.outputs.values()]
        self._output_names = [name for name, _ in self._outputs]

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return True, f"onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())})"

    def _providers(self) -> list[Any]:
        device = self.options.device
        offered = ort.get_available_providers()
        if device == "cpu" or (device == "auto" and _CUDA not in offered):
            return [_CPU]
        if _CUDA not in offered:
            raise EngineError(
                f"device '{device}' requested but this onnxruntime has no {_CUDA} "
                f"(offers: {', '.join(offered)})"
            )
        device_id = int(device.partition(":")[2] or 0)
        return [(_CUDA, {"device_id": device_id}), _CPU]

    def load(self) -> None:
        """Create the session, check its signature against the manifest, and warm it up."""
        providers = self._providers()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        if self.options.threads > 0:
            opts.intra_op_num_threads = self.options.threads
        session = ort.InferenceSession(str(self.bundle.model_path), sess_options=opts, providers=providers)

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
        self._session = session
        self.warm_up()

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self._session is None:
            raise EngineError("ort engine is not loaded: call load() first")
        self.check_batch(batch)
        results = self._session.run(self._output_names, {self.bundle.input.name: batch})
        return {
            name: value if value.dtype == dtype else value.astype(dtype)
            for (name, dtype), value in zip(self._outputs, results, strict=True)
        }

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "onnxruntime",
            "version": ort.__version__,
            "device": self._device,
            "precision": self.bundle.precision,
            "max_batch": self.max_batch,
            "bundle": self.bundle.name,
            "bundle_version": self.bundle.version,
            "providers": self._session.get_providers() if self._session is not None else [],
            "threads": self.options.threads,
        }

    def close(self) -> None:
        self._session = None


ENGINE_CLASS = OrtEngine
