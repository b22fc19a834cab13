"""The engine registry: backends looked up by key and imported lazily.

A backend whose module or library is missing (TensorRT, torch) only makes that key
unavailable, and importing this module never pulls in a backend.
"""

from __future__ import annotations

import importlib
import os

from engines.base import Engine, EngineError, EngineOptions
from engines.bundle import Bundle

ENGINE_MODULES: dict[str, str] = {
    "ort": "engines.onnxruntime",
    "trt": "engines.tensorrt",
    "torch": "engines.torch",
    "null": "engines.null",
}
"""Engine key -> module defining ``ENGINE_CLASS``. Adding a backend is one module plus one line here."""

AUTO_ORDER = ("trt", "torch", "ort")
"""Preference of ``select_engine("auto")``: fastest first; each backend's ``suits_auto`` may decline."""

_GPU_ONLY_IN_AUTO = ("trt", "torch")
_OWN_PACKAGES = ("engines", "pipeline")


def _probe(kind: str) -> tuple[type[Engine] | None, str]:
    """Import the engine module for ``kind``; return (class or None, reason)."""
    module_name = ENGINE_MODULES[kind]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None, f"{module_name} is not present"
        if exc.name and exc.name.split(".")[0] not in _OWN_PACKAGES:
            return None, f"{exc.name.split('.')[0]} is not installed"
        raise
    cls = module.ENGINE_CLASS
    if not (isinstance(cls, type) and issubclass(cls, Engine) and cls.type_key == kind):
        raise TypeError(f"{module_name}.ENGINE_CLASS must be an Engine subclass with type_key '{kind}'")
    ok, reason = cls.available()
    return (cls if ok else None), reason


def nvidia_driver_present() -> bool:
    """An NVIDIA kernel driver is loaded (Linux), without initialising CUDA in this process."""
    return os.path.exists("/proc/driver/nvidia/version")


def engine_class(kind: str) -> type[Engine]:
    """Return the engine class for ``kind`` or raise EngineError saying why it cannot run here."""
    if kind not in ENGINE_MODULES:
        raise EngineError(f"unknown engine '{kind}' (choose from {', '.join(ENGINE_MODULES)})")
    cls, reason = _probe(kind)
    if cls is None:
        raise EngineError(f"engine '{kind}' is not available: {reason}")
    return cls


def select_engine(kind: str, bundle: Bundle, options: EngineOptions) -> tuple[Engine, str]:
    """Build (not load) the engine for ``kind``; "auto" takes the first usable of :data:`AUTO_ORDER`.

    Returns the engine and a one-line reason for logs, e.g.
    ``"auto: chose ort (trt: tensorrt is not installed; torch: engines.torch is not present)"``.
    """
    if kind != "auto":
        return engine_class(kind)(bundle, options), f"{kind}: requested"
    skipped: list[str] = []
    for candidate in AUTO_ORDER:
        if candidate in _GPU_ONLY_IN_AUTO and (options.device == "cpu" or not nvidia_driver_present()):
            # Checked before importing the backend: importing torch alone costs seconds on a cart.
            skipped.append(f"{candidate}: {'device is cpu' if options.device == 'cpu' else 'no NVIDIA GPU'}")
            continue
        cls, reason = _probe(candidate)
        if cls is not None:
            suits, why = cls.suits_auto(bundle, options)
            if suits:
                detail = f" ({'; '.join(skipped)})" if skipped else ""
                return cls(bundle, options), f"auto: chose {candidate}{detail}"
            reason = why
        skipped.append(f"{candidate}: {reason}")
    raise EngineError(f"no engine available: {'; '.join(skipped)}")
