"""The engine registry: backends looked up by key and imported lazily.

A backend whose module or library is missing (TensorRT, torch) only makes that key
unavailable, and importing this module never pulls in a backend. Each backend may declare its
own options (``Engine.options_type``); :func:`backend_options` collects them for the run config
and :func:`select_engine` hands each backend its own.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any

from engines.base import Engine, EngineError, EngineOptions
from engines.bundle import Bundle

ENGINE_MODULES: dict[str, str] = {
    "ort": "engines.onnxruntime",
    "trt": "engines.tensorrt",
    "torch": "engines.torch",
    "null": "engines.null",
    "kserve": "engines.kserve",
}
"""Engine key -> module defining ``ENGINE_CLASS``. Adding a backend is one module plus one line here."""

AUTO_ORDER = ("trt", "torch", "ort")
"""Preference of ``select_engine("auto")``: fastest first; each backend's ``suits_auto`` may decline. Never
kserve (it needs a server named in the config) nor null (a benchmark stand-in): those only when asked."""

_GPU_ONLY_IN_AUTO = ("trt", "torch")
_OWN_PACKAGES = ("engines", "pipeline")


def _import(kind: str) -> tuple[type[Engine] | None, str]:
    """Import the engine module for ``kind`` (not its library); return (class or None, reason)."""
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
    return cls, ""


def _probe(kind: str) -> tuple[type[Engine] | None, str]:
    """The engine class for ``kind`` if its backend can run here; else None and why not."""
    cls, reason = _import(kind)
    if cls is None:
        return None, reason
    ok, reason = cls.available()
    return (cls if ok else None), reason


def backend_options() -> dict[str, type]:
    """Each backend's own options type by engine key; backends without options of their own are absent.

    Imports every backend module but none of their libraries, so loading a run config stays cheap.
    """
    found: dict[str, type] = {}
    for kind in ENGINE_MODULES:
        cls, _ = _import(kind)
        if cls is not None and cls.options_type is not None:
            found[kind] = cls.options_type
    return found


def _build(cls: type[Engine], bundle: Bundle, options: EngineOptions, backend: Mapping[str, Any]) -> Engine:
    """Construct ``cls`` with its own entry of ``backend`` (its defaults when absent)."""
    own = backend.get(cls.type_key)
    if cls.options_type is None:
        if own is not None:
            raise EngineError(f"engine '{cls.type_key}' has no options of its own, got {own!r}")
        return cls(bundle, options)
    if own is not None and not isinstance(own, cls.options_type):
        raise EngineError(
            f"engine '{cls.type_key}' takes {cls.options_type.__name__}, got {type(own).__name__}"
        )
    return cls(bundle, options, own)  # type: ignore[call-arg]


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


def select_engine(
    kind: str, bundle: Bundle, options: EngineOptions, backend: Mapping[str, Any] | None = None
) -> tuple[Engine, str]:
    """Build (not load) the engine for ``kind``; "auto" takes the first usable of :data:`AUTO_ORDER`.

    ``backend`` maps engine keys to their own options (the run config's ``infer.<key>`` tables); the
    chosen engine gets its entry. Returns the engine and a one-line reason for logs, e.g.
    ``"auto: chose ort (trt: tensorrt is not installed; torch: engines.torch is not present)"``.
    """
    backend = backend or {}
    unknown = sorted(set(backend) - set(ENGINE_MODULES))
    if unknown:
        known = ", ".join(ENGINE_MODULES)
        raise EngineError(f"options for unknown engine '{unknown[0]}' (choose from {known})")
    if kind != "auto":
        return _build(engine_class(kind), bundle, options, backend), f"{kind}: requested"
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
                return _build(cls, bundle, options, backend), f"auto: chose {candidate}{detail}"
            reason = why
        skipped.append(f"{candidate}: {reason}")
    raise EngineError(f"no engine available: {'; '.join(skipped)}")
