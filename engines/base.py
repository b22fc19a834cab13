"""The engine interface every runtime backend implements, and the backend-neutral options it gets.

A backend is one module defining ``ENGINE_CLASS``, an :class:`Engine` subclass; the
registry (:mod:`engines.registry`) finds it by its ``type_key``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from engines.bundle import PRECISIONS, Bundle, BundleError

ENGINE_PRECISIONS = ("auto", *PRECISIONS)

_DEVICE_RE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


class EngineError(ValueError):
    """An engine cannot be selected or used as asked (unavailable backend, bad batch, bad options)."""


class EngineTimeout(EngineError):
    """One batch got no answer in time (a remote server slow, restarting or gone): its frames are lost,
    the engine stays usable and the stream goes on (the infer stage counts them: drop_engine_timeout)."""


AUTO = "auto"
GPU_AUTO_BATCH = 8


@dataclass(frozen=True)
class EngineOptions:
    """Backend-neutral engine settings; ``threads`` 0 keeps the backend default.

    ``precision``: "auto" lets each engine choose (ort: the gated int8 model on CPU when the
    bundle has one, else fp32; trt: fp16; torch: fp16 autocast on CUDA, fp32 on CPU); an
    explicit value is honoured or refused, never silently changed.
    """

    threads: int = 0
    device: str = "auto"
    max_batch: int | str = AUTO  # AUTO: the engine's own choice for its device (Engine.auto_batch)
    precision: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise EngineError(f"threads must be an integer >= 0, got {self.threads!r}")
        if self.max_batch != AUTO and (isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int)
                                       or self.max_batch < 1):
            raise EngineError(f"max_batch must be 'auto' or an integer >= 1, got {self.max_batch!r}")
        if not isinstance(self.device, str) or not _DEVICE_RE.fullmatch(self.device):
            raise EngineError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.precision not in ENGINE_PRECISIONS:
            choices = ", ".join(ENGINE_PRECISIONS)
            raise EngineError(f"precision must be one of {choices}, got {self.precision!r}")


class Engine(ABC):
    """Runs batches of prepared uint8 frames through one bundle's model.

    Construction is cheap (the registry builds engines to compare them); :meth:`load`
    does the heavy set-up. ``infer`` never splits batches: callers keep ``N <= max_batch``.
    """

    type_key: ClassVar[str]
    options_type: ClassVar[type | None] = None
    """The backend's own settings beyond :class:`EngineOptions`, or None when it has none: a frozen
    dataclass of ``pipeline.options.option`` fields (help text, bounds), which the run config offers as
    the table ``[infer.<type_key>]``. A backend that declares one takes an instance as the third
    argument of its constructor. The run config imports every backend module to read these, so a
    backend module imports its library lazily, never at module import."""

    def __init__(self, bundle: Bundle, options: EngineOptions) -> None:
        if options.max_batch != AUTO and options.max_batch < bundle.min_batch:
            raise EngineError(
                f"max_batch {options.max_batch} is below bundle {bundle.name}'s minimum batch "
                f"{bundle.min_batch}"
            )
        self.bundle = bundle
        self.options = options

    @property
    def max_batch(self) -> int:
        """Largest batch ``infer`` accepts: the option (or the engine's own choice), within what the bundle
        supports."""
        wanted = self.auto_batch() if self.options.max_batch == AUTO else self.options.max_batch
        return max(self.bundle.min_batch, min(wanted, self.bundle.max_batch))

    def auto_batch(self) -> int:
        """The batch limit for `max_batch = "auto"`. On a CPU a batch of N costs N inferences, so a batch
        only makes frames wait behind each other: 1. On a GPU a batch costs little more than one frame:
        up to GPU_AUTO_BATCH, so a backlog clears in one call."""
        return 1 if self.on_cpu() else GPU_AUTO_BATCH

    def on_cpu(self) -> bool:
        """Whether this engine computes on the CPU (known after load for backends that pick a device)."""
        return True

    reconnects: int = 0
    """Times the engine tried to reach its remote server again after losing it (local engines: 0)."""

    @property
    def reachable(self) -> bool:
        """False while a remote engine's server is lost (its last call failed); local engines: True."""
        return True

    @classmethod
    @abstractmethod
    def available(cls) -> tuple[bool, str]:
        """Whether this backend can run here, and why (or why not). Must not raise."""

    @classmethod
    def suits_auto(cls, bundle: Bundle, options: EngineOptions) -> tuple[bool, str]:
        """Whether `--engine auto` should pick this backend for this bundle (an explicit choice skips this):
        a backend can run here yet be the wrong default, like torch without a GPU."""
        return True, ""

    def preflight(self) -> None:  # noqa: B027 - most backends have nothing to check before load
        """Checks that can fail before any stage starts, without loading the model (a remote server's
        model against the manifest): the supervisor calls this on an engine it builds, then closes it."""

    @abstractmethod
    def load(self) -> None:
        """Create the session and warm it up."""

    @abstractmethod
    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch; returns every bundle output with a leading batch dim and the manifest dtype."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Backend, device, precision, max_batch and bundle name, for logs and run records."""

    @abstractmethod
    def close(self) -> None:
        """Release the session; the engine must be loaded again before further use."""

    def check_batch(self, batch: Any) -> None:
        """Raise EngineError unless ``batch`` is uint8 frames of the bundle's shape, N within batch limits."""
        if not isinstance(batch, np.ndarray):
            raise EngineError(f"batch must be a numpy array, got {type(batch).__name__}")
        if batch.dtype != np.uint8:
            raise EngineError(f"batch dtype is {batch.dtype}, bundle {self.bundle.name} needs uint8")
        frame_shape = self.bundle.input.frame_shape
        if batch.ndim != 1 + len(frame_shape) or batch.shape[1:] != frame_shape:
            expected = ", ".join(["N", *map(str, frame_shape)])
            raise EngineError(
                f"batch shape {tuple(batch.shape)} does not match bundle {self.bundle.name} "
                f"input ({expected})"
            )
        n = batch.shape[0]
        low = self.bundle.min_batch
        if not low <= n <= self.max_batch:
            raise EngineError(
                f"batch of {n} frames is outside the engine's batch range {low}..{self.max_batch}"
            )

    def warm_up(self) -> None:
        """Run zero batches at size min and max so first real frames do not pay allocation costs.

        Also checks the output shapes the backend actually produces against the manifest,
        which catches models whose symbolic output dims resolve differently.
        """
        for n in sorted({self.bundle.min_batch, self.max_batch}):
            outputs = self.infer(np.zeros((n, *self.bundle.input.frame_shape), dtype=np.uint8))
            for spec in self.bundle.outputs.values():
                got = outputs[spec.name].shape
                if got != (n, *spec.shape):
                    raise BundleError.at(
                        self.bundle.path,
                        f"{self.type_key} engine: output '{spec.name}' has shape {got} for a batch of {n}, "
                        f"manifest says {(n, *spec.shape)}",
                    )
