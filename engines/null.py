"""Null engine: a benchmark stand-in, not a model."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from engines.base import GPU_AUTO_BATCH, Engine, EngineError, EngineOptions
from engines.bundle import Bundle


class NullEngine(Engine):
    """BENCHMARK STAND-IN: returns zeros of the manifest's output shapes and dtypes, computing nothing.

    It lets tools/bench_latency.py measure the pipeline's transport and framing cost
    alone. It validates batches like a real engine so the same call sites work, and
    ``select_engine("auto")`` never picks it.
    """

    type_key: ClassVar[str] = "null"

    def __init__(self, bundle: Bundle, options: EngineOptions) -> None:
        super().__init__(bundle, options)
        self._loaded = False

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return True, "null engine needs no backend"

    def auto_batch(self) -> int:
        """Nothing is computed, so a batch costs nothing and never delays a frame."""
        return GPU_AUTO_BATCH

    def load(self) -> None:
        self._loaded = True

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if not self._loaded:
            raise EngineError("null engine is not loaded: call load() first")
        self.check_batch(batch)
        n = batch.shape[0]
        outputs = self.bundle.outputs.values()
        return {spec.name: np.zeros((n, *spec.shape), dtype=spec.dtype) for spec in outputs}

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "null",
            "device": "none",
            "precision": "none",
            "max_batch": self.max_batch,
            "bundle": self.bundle.name,
            "bundle_version": self.bundle.version,
        }

    def close(self) -> None:
        self._loaded = False


ENGINE_CLASS = NullEngine
