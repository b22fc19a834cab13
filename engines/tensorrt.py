"""TensorRT engine: the bundle's ONNX as a plan for this GPU, found in the plan cache, run on a CUDA stream.

A plan only runs on the TensorRT version and GPU model that built it, so plans are built
on the target machine (by ``tools/build_engine.py`` ahead of time, or on first load, by
:mod:`engines.export.tensorrt_plan`) and cached under a key of everything that makes them differ.

tensorrt and cuda-python are imported only inside functions, and nothing touches CUDA at
import time: a CUDA context does not survive a fork, so importing a backend must leave no
CUDA state in a process that may still start others. The backend's own options
(:class:`TrtOptions`) are read by the run config, which therefore imports this module.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np

from engines.base import Engine, EngineError, EngineOptions
from engines.bundle import Bundle, TensorSig, check_model_io
from pipeline.options import option

log = logging.getLogger("sweepstream")

CACHE_ENV = "SWEEPSTREAM_TRT_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/sweepstream/trt"
DEFAULT_PROFILE = (1, 8, 32)
"""Batch (min, opt, max) the plan is tuned for unless asked otherwise; clipped to the bundle's batch range."""
PLAN_PRECISIONS = ("fp16", "fp32")
MAX_PROFILE_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class Parity:
    """How close a plan's outputs must come to ONNX Runtime fp32 on the same frames, for one precision."""

    score_atol: float
    """Largest absolute difference of a score in [0, 1] (``quality``, ``planes``)."""
    min_cosine: float
    """Lowest per-frame cosine of an ``embedding`` output."""
    min_mask_agreement: float
    """Lowest share of equal ``mask`` pixels (a pixel flips where its logit lies within rounding of 0)."""


PARITY: dict[str, Parity] = {
    # fp32 plans are built with TF32 off, so they differ from ORT only by summation order.
    "fp32": Parity(score_atol=1e-4, min_cosine=0.99999, min_mask_agreement=0.999),
    # fp16 keeps 11 significant bits (2**-11 = 4.9e-4 per rounding) and a few roundings chain.
    "fp16": Parity(score_atol=1e-2, min_cosine=0.999, min_mask_agreement=0.99),
}
"""The parity each plan precision is held to against ORT fp32 (the GPU tests and tools/gpu_check.py)."""


# --------------------------------------------------------------------------- lazy imports


def import_tensorrt() -> Any:
    """The tensorrt module, imported on first use (it is large, and optional)."""
    import tensorrt

    return tensorrt


def import_cudart() -> Any:
    """cuda-python's runtime API, imported on first use."""
    from cuda.bindings import runtime

    return runtime


def trt_major(trt: Any) -> int:
    """TensorRT's major version, which decides between weakly and strongly typed builds."""
    return int(str(trt.__version__).split(".")[0])


def _check(result: tuple[Any, ...], call: str) -> Any:
    """Unpack a cuda-python ``(error, value?)`` tuple, raising EngineError unless the error is cudaSuccess."""
    err, *values = result
    code = getattr(err, "value", err)
    if code != 0:
        raise EngineError(f"CUDA {call} failed: {getattr(err, 'name', 'error')} ({code})")
    return values[0] if values else None


def _native_handle(obj: Any) -> int:
    """Address of a cuda-python object (a stream) as an int, as TensorRT's Python API takes it."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:  # cuda-python before 12.9.1, where int() is the documented way
        return int(obj)
    return get_cuda_native_handle(obj)


def gpu_properties(cudart: Any, device: int) -> tuple[str, tuple[int, int]]:
    """Name and compute capability (major, minor) of CUDA device ``device``."""
    prop = _check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return name.rstrip("\x00").strip(), (int(prop.major), int(prop.minor))


def set_device(cudart: Any, device: int) -> None:
    """Make ``device`` current for the calling thread: CUDA keeps the current device per thread, and an
    engine may be loaded on one thread and run on another."""
    _check(cudart.cudaSetDevice(device), "cudaSetDevice")


_TRT_WHEEL = re.compile(r"tensorrt[-_.]cu(\d+)(?:[-_.](?:libs|bindings))?")


def tensorrt_cuda_major() -> int | None:
    """The CUDA major the installed TensorRT wheels are built for (``tensorrt-cu12`` -> 12), or None when
    TensorRT came another way (a tar or deb install names no CUDA major)."""
    majors = {int(match.group(1)) for dist in importlib.metadata.distributions()
              if (match := _TRT_WHEEL.fullmatch(str(dist.metadata["Name"] or "").lower()))}
    return max(majors) if len(majors) == 1 else None


def cuda_mismatch(cudart: Any) -> str | None:
    """Why the CUDA driver, cuda-python and TensorRT's wheels cannot work together, or None.

    The driver must support the CUDA major of both cuda-python and TensorRT's wheels, and those two
    must share one major (the ``gpu-cu12`` and ``gpu-cu13`` extras pin matching pairs). Without this
    check a CUDA-13 cuda-python on a CUDA-12 driver reports only "no CUDA GPU".
    """
    err, driver = cudart.cudaDriverGetVersion()
    if getattr(err, "value", err) != 0 or not driver:
        return None  # no driver at all: the device query says so in its own words
    err, runtime = cudart.cudaRuntimeGetVersion()
    runtime_major = runtime // 1000 if getattr(err, "value", err) == 0 else None
    driver_major, trt_cuda = driver // 1000, tensorrt_cuda_major()
    driver_text = f"the NVIDIA driver supports CUDA up to {driver_major}.{driver % 1000 // 10}"
    if runtime_major is not None and runtime_major > driver_major:
        return (f"{driver_text} but cuda-python is built for CUDA {runtime_major}: install the "
                f"gpu-cu{driver_major} extra or a newer driver")
    if trt_cuda is not None and trt_cuda > driver_major:
        return (f"{driver_text} but TensorRT's wheels are tensorrt-cu{trt_cuda}: install the "
                f"gpu-cu{driver_major} extra or a newer driver")
    if trt_cuda is not None and runtime_major is not None and trt_cuda != runtime_major:
        return (f"TensorRT's wheels are tensorrt-cu{trt_cuda} but cuda-python is built for CUDA "
                f"{runtime_major}: install one extra, gpu-cu{trt_cuda} or gpu-cu{runtime_major}")
    return None


# --------------------------------------------------------------------------- options


def _check_profile(profile: tuple[int, int, int]) -> None:
    lo, opt, hi = profile
    if not 1 <= lo <= opt <= hi:
        raise EngineError(f"batch profile must satisfy 1 <= min <= opt <= max, got {tuple(profile)}")


@dataclasses.dataclass(frozen=True)
class TrtOptions:
    """The trt backend's own settings: the run config's ``[infer.trt]`` table (``--set infer.trt.KEY=...``).

    Precision, device and max_batch come from the backend-neutral :class:`EngineOptions`.
    """

    cache_dir: str | None = option(
        None, f"TensorRT plan cache directory (default ${CACHE_ENV}, else {DEFAULT_CACHE_DIR}); "
        "tools/build_engine.py --cache fills the same cache ahead of a run")
    profile: tuple[int, int, int] = option(
        DEFAULT_PROFILE, "batch min,opt,max the TensorRT plan is tuned for; clipped to the bundle's batch "
        "range, min lowered to the bundle's min batch and max raised to infer.max_batch so every batch the "
        "engine takes fits; part of the plan cache key", min=1, max=MAX_PROFILE_BATCH)
    progress: bool = option(
        False, "show a TensorRT plan build (minutes, when the cache has no plan) as progress bars")

    def __post_init__(self) -> None:
        _check_profile(self.profile)


# --------------------------------------------------------------------------- plan cache


@dataclasses.dataclass(frozen=True)
class PlanKey:
    """Everything a plan depends on: a plan built under any other value must not be reused."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    precision: str
    profile: tuple[int, int, int]
    bundle_sha256: str
    strongly_typed: bool
    recipe: str
    """How the plan is made from the ONNX (builder settings, fp16 conversion): see
    :func:`engines.export.tensorrt_plan.build_recipe`."""

    def fields(self) -> dict[str, Any]:
        """The key as JSON-native values, as written beside the plan."""
        return {
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": list(self.compute_capability),
            "precision": self.precision,
            "profile": list(self.profile),
            "bundle_sha256": self.bundle_sha256,
            "strongly_typed": self.strongly_typed,
            "recipe": self.recipe,
        }


class CachePaths(NamedTuple):
    """Where one plan, its key file and the timing cache it shares with other builds live."""

    plan: Path
    meta: Path
    timing_cache: Path


def cache_key(key: PlanKey) -> str:
    """Short stable digest of ``key``: sha256 of its canonical JSON."""
    text = json.dumps(key.fields(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cache_paths(cache_dir: Path, key: PlanKey) -> CachePaths:
    """File names for ``key`` under ``cache_dir``; readable prefix, digest for uniqueness.

    The timing cache is per TensorRT version and GPU only, so builds at other precisions or
    batch profiles reuse its kernel timings.
    """
    lo, opt, hi = key.profile
    stem = f"{key.precision}-b{lo}-{opt}-{hi}-{cache_key(key)}"
    device = json.dumps([key.tensorrt_version, key.gpu_name, list(key.compute_capability)])
    timing = f"timing-{hashlib.sha256(device.encode()).hexdigest()[:12]}.cache"
    return CachePaths(cache_dir / f"{stem}.plan", cache_dir / f"{stem}.json", cache_dir / timing)


def default_cache_dir() -> Path:
    """``$SWEEPSTREAM_TRT_CACHE`` if set, else ``~/.cache/sweepstream/trt``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def clip_profile(profile: tuple[int, int, int], min_batch: int, max_batch: int) -> tuple[int, int, int]:
    """Fit a (min, opt, max) batch profile inside a bundle's batch range, keeping min <= opt <= max."""
    _check_profile(profile)
    lo, opt, hi = profile
    lo = min(max(lo, min_batch), max_batch)
    hi = max(min(hi, max_batch), lo)
    return lo, min(max(opt, lo), hi), hi


def engine_profile(
    profile: tuple[int, int, int], bundle_min: int, bundle_max: int, max_batch: int
) -> tuple[int, int, int]:
    """The batch profile of the plan for an engine that takes batches of ``bundle_min..max_batch``.

    ``profile`` (the ``[infer.trt]`` option) is clipped to the bundle's batch range, then its min is
    lowered to ``bundle_min`` and its max raised to ``max_batch``: the engine is sent every size in that
    range (warm-up runs both ends), and a plan whose profile misses one fails there. The engine and
    tools/build_engine.py both resolve the profile here, so a plan built ahead is the one a run asks for.
    """
    _, opt, hi = clip_profile(profile, bundle_min, bundle_max)
    return bundle_min, opt, max(hi, max_batch)


@dataclasses.dataclass(frozen=True)
class PlanInfo:
    """A plan ready on disk: where, under which key, and whether this call built it."""

    path: Path
    key: PlanKey
    digest: str
    built: bool
    seconds: float


def _cached(paths: CachePaths, key: PlanKey) -> bool:
    if not paths.plan.is_file():
        return False
    try:
        meta = json.loads(paths.meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("key_fields") == key.fields()


def plan_key(
    bundle: Bundle,
    *,
    precision: str,
    profile: tuple[int, int, int],
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: tuple[int, int],
    strongly_typed: bool,
) -> PlanKey:
    """The key of the plan for ``bundle`` built this way on this TensorRT and GPU (no CUDA call)."""
    from engines.export.tensorrt_plan import build_recipe  # the recipe is the build's; its module is light

    return PlanKey(
        tensorrt_version=tensorrt_version,
        gpu_name=gpu_name,
        compute_capability=compute_capability,
        precision=precision,
        profile=clip_profile(profile, bundle.min_batch, bundle.max_batch),
        bundle_sha256=bundle.sha256,
        strongly_typed=strongly_typed,
        recipe=build_recipe(precision, strongly_typed),
    )


def ensure_plan(
    bundle: Bundle,
    *,
    precision: str = "fp16",
    profile: tuple[int, int, int] = DEFAULT_PROFILE,
    cache_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: bool = False,
    device: int = 0,
    strongly_typed: bool | None = None,
) -> PlanInfo:
    """Return the cached plan for ``bundle`` on CUDA device ``device``, building it first if needed.

    ``profile`` is clipped to the bundle's batch range. ``force`` rebuilds even on a cache hit.
    """
    trt = import_tensorrt()
    cudart = import_cudart()
    set_device(cudart, device)
    gpu_name, capability = gpu_properties(cudart, device)
    key = plan_key(
        bundle, precision=precision, profile=profile, tensorrt_version=str(trt.__version__),
        gpu_name=gpu_name, compute_capability=capability,
        strongly_typed=trt_major(trt) >= 11 if strongly_typed is None else strongly_typed,
    )
    digest = cache_key(key)
    paths = cache_paths(Path(cache_dir) if cache_dir is not None else default_cache_dir(), key)
    if not force and _cached(paths, key):
        return PlanInfo(paths.plan, key, digest, built=False, seconds=0.0)
    from engines.export.tensorrt_plan import build_into_cache  # deferred: building is export work

    seconds = build_into_cache(bundle, key, paths, progress=progress)
    return PlanInfo(paths.plan, key, digest, built=True, seconds=seconds)


# --------------------------------------------------------------------------- run


@dataclasses.dataclass
class _Buffer:
    """One I/O tensor's pinned host buffer and device buffer, both sized for the largest batch."""

    name: str
    is_input: bool
    host_ptr: int
    device_ptr: int
    host: np.ndarray  # flat view of the pinned memory, in the tensor's dtype


class _Session:
    """A deserialized plan with its execution context, stream and buffers on one CUDA device; owns all CUDA
    memory it uses. Every method first makes that device current, since the calling thread may differ."""

    def __init__(self, trt: Any, cudart: Any, device: int, engine: Any, runtime: Any, logger: Any) -> None:
        self.trt, self.cudart, self.device = trt, cudart, device
        self.logger, self.runtime, self.engine = logger, runtime, engine
        self.context: Any = None
        self.stream: Any = None
        self.stream_handle = 0
        self.buffers: list[_Buffer] = []

    @classmethod
    def deserialize(cls, plan: Path, device: int) -> _Session | None:
        """Load a plan file onto ``device``; None when TensorRT rejects it (corrupt, or another version's)."""
        trt, cudart = import_tensorrt(), import_cudart()
        set_device(cudart, device)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        return None if engine is None else cls(trt, cudart, device, engine, runtime, logger)

    def signature(self) -> tuple[dict[str, TensorSig], dict[str, TensorSig]]:
        """(inputs, outputs) as numpy dtype names and dims, None for dynamic dims."""
        inputs: dict[str, TensorSig] = {}
        outputs: dict[str, TensorSig] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            dims = tuple(None if d < 0 else int(d) for d in self.engine.get_tensor_shape(name))
            sig = (self.dtype(name).name, dims)
            if self.engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT:
                inputs[name] = sig
            else:
                outputs[name] = sig
        return inputs, outputs

    def dtype(self, name: str) -> np.dtype:
        trt_dtype = self.engine.get_tensor_dtype(name)
        try:
            return np.dtype(self.trt.nptype(trt_dtype))
        except TypeError as exc:
            raise EngineError(f"tensorrt tensor '{name}' has type {trt_dtype}, unknown to numpy") from exc

    def allocate(self, input_name: str, max_shape: tuple[int, ...]) -> None:
        """Create the context and stream, and buffers for every I/O tensor at the largest input shape."""
        cudart = self.cudart
        set_device(cudart, self.device)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError("tensorrt could not create an execution context (out of GPU memory?)")
        self.stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.stream_handle = _native_handle(self.stream)
        if not self.context.set_input_shape(input_name, max_shape):
            raise EngineError(f"tensorrt plan does not accept input '{input_name}' of shape {max_shape}")
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineError(f"tensorrt tensor '{name}' has no fixed shape at max batch: {shape}")
            dtype = self.dtype(name)
            nbytes = math.prod(shape) * dtype.itemsize
            host_ptr = _check(cudart.cudaMallocHost(nbytes), "cudaMallocHost")
            host = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(host_ptr)).view(dtype)
            buffer = _Buffer(name, name == input_name, host_ptr, 0, host)
            self.buffers.append(buffer)  # before cudaMalloc, so close() frees the host half if that fails
            buffer.device_ptr = _check(cudart.cudaMalloc(nbytes), "cudaMalloc")

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch; returns views of the pinned output buffers, valid until the next run."""
        cudart, context = self.cudart, self.context
        set_device(cudart, self.device)
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        views: dict[str, np.ndarray] = {}
        for buf in self.buffers:
            if buf.is_input:
                np.copyto(buf.host[: batch.size].reshape(batch.shape), batch)
                nbytes = batch.nbytes
                call = cudart.cudaMemcpyAsync(buf.device_ptr, buf.host_ptr, nbytes, to_device, self.stream)
                _check(call, "cudaMemcpyAsync (host to device)")
                if not context.set_input_shape(buf.name, batch.shape):
                    raise EngineError(f"tensorrt rejected input shape {batch.shape} for '{buf.name}'")
        for buf in self.buffers:
            if not context.set_tensor_address(buf.name, buf.device_ptr):
                raise EngineError(f"tensorrt rejected the address of '{buf.name}'; its log above says why")
        if not context.execute_async_v3(self.stream_handle):
            raise EngineError("tensorrt execute_async_v3 failed; its log above says why")
        for buf in self.buffers:
            if not buf.is_input:
                shape = tuple(context.get_tensor_shape(buf.name))
                count = math.prod(shape)
                nbytes = count * buf.host.itemsize
                call = cudart.cudaMemcpyAsync(buf.host_ptr, buf.device_ptr, nbytes, to_host, self.stream)
                _check(call, "cudaMemcpyAsync (device to host)")
                views[buf.name] = buf.host[:count].reshape(shape)
        _check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return views

    def close(self) -> None:
        """Free every buffer and the stream, then drop the TensorRT objects (context before engine)."""
        cudart = self.cudart
        failures: list[str] = []

        def attempt(result: tuple[Any, ...], call: str) -> None:
            try:
                _check(result, call)
            except EngineError as exc:
                failures.append(str(exc))

        attempt(cudart.cudaSetDevice(self.device), "cudaSetDevice")

        if self.stream is not None:
            attempt(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        for buf in self.buffers:
            if buf.device_ptr:
                attempt(cudart.cudaFree(buf.device_ptr), "cudaFree")
            attempt(cudart.cudaFreeHost(buf.host_ptr), "cudaFreeHost")
        self.buffers.clear()
        if self.stream is not None:
            attempt(cudart.cudaStreamDestroy(self.stream), "cudaStreamDestroy")
            self.stream = None
        self.context = None
        self.engine = None
        self.runtime = None
        if failures:
            raise EngineError("trt engine close: " + "; ".join(failures))


class TrtEngine(Engine):
    """Runs the bundle on one NVIDIA GPU through a TensorRT plan built for it.

    ``precision`` (from :class:`EngineOptions`) auto means fp16, where TensorRT's speed comes
    from; :class:`TrtOptions` says where plans are cached and the (min, opt, max) batch they are
    tuned for, resolved by :func:`engine_profile` to cover every batch this engine takes. A missing
    plan is built on :meth:`load`, which can take minutes: build it ahead with ``tools/build_engine.py``
    (same run config, same plan key) so a pipeline start does not wait for it.
    """

    type_key: ClassVar[str] = "trt"
    options_type: ClassVar[type] = TrtOptions

    def on_cpu(self) -> bool:
        return False

    @classmethod
    def suits_auto(cls, bundle: Bundle, options: EngineOptions) -> tuple[bool, str]:
        if options.precision == "int8":
            return False, "int8 runs on ort only"
        return True, ""

    def __init__(
        self, bundle: Bundle, options: EngineOptions, backend_options: TrtOptions | None = None
    ) -> None:
        super().__init__(bundle, options)
        if options.device == "cpu":
            raise EngineError("trt engine runs only on a CUDA GPU, but device 'cpu' was requested")
        if options.precision == "int8":
            raise EngineError("the trt engine builds fp16 or fp32 plans; int8 runs on --engine ort")
        self.precision = "fp16" if options.precision == "auto" else options.precision
        self.backend_options = backend_options or TrtOptions()
        self.device_id = int(options.device.partition(":")[2] or 0)
        self.profile = engine_profile(self.backend_options.profile, bundle.min_batch, bundle.max_batch,
                                      self.max_batch)
        self._plan: PlanInfo | None = None
        self._session: _Session | None = None

    @classmethod
    def available(cls) -> tuple[bool, str]:
        # Importing tensorrt and cuda-python starts no CUDA context, but cudaGetDeviceCount
        # initialises the CUDA driver in this process. That is fine: the registry calls this in
        # the infer stage, the process that then loads the engine; stages are spawned, never forked.
        try:
            trt = import_tensorrt()
        except ModuleNotFoundError as exc:
            if exc.name == "tensorrt":
                return False, "tensorrt is not installed"
            return False, f"tensorrt cannot be imported ({exc})"
        except Exception as exc:  # a broken or placeholder install must not stop "--engine auto"
            return False, f"tensorrt cannot be imported ({type(exc).__name__}: {exc})"
        version = str(getattr(trt, "__version__", "unknown"))
        if not hasattr(trt, "Builder"):
            return False, f"tensorrt {version} is a placeholder package without the TensorRT API"
        try:
            if trt_major(trt) < 10:
                return False, f"tensorrt {version} is too old (need 10 or newer)"
        except ValueError:
            return False, f"tensorrt reports an unreadable version {version!r}"
        try:
            cudart = import_cudart()
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("cuda.bindings"):
                return False, "cuda-python is too old (need 12.6 or newer, which provides cuda.bindings)"
            return False, "cuda-python is not installed"
        except Exception as exc:  # e.g. ImportError for a missing CUDA runtime library
            return False, f"cuda-python cannot be imported ({type(exc).__name__}: {exc})"
        try:
            mismatch = cuda_mismatch(cudart)
            if mismatch is not None:
                return False, mismatch
            err, count = cudart.cudaGetDeviceCount()
            if getattr(err, "value", err) != 0:
                return False, f"no CUDA GPU ({getattr(err, 'name', err)})"
            if count < 1:
                return False, "no CUDA GPU"
            name, (major, minor) = gpu_properties(cudart, 0)
        except Exception as exc:
            return False, f"CUDA query failed ({type(exc).__name__}: {exc})"
        return True, f"tensorrt {version}, {count} CUDA GPU(s), device 0: {name} (compute {major}.{minor})"

    def load(self) -> None:
        """Find or build the plan, check its I/O against the manifest, allocate buffers, warm up."""
        self.close()
        ok, reason = self.available()
        if not ok:
            raise EngineError(f"engine 'trt' is not available: {reason}")
        plan = self.ensure_plan()
        session = _Session.deserialize(plan.path, self.device_id)
        if session is None and not plan.built:
            log.warning("trt: cached plan %s does not load; rebuilding it", plan.path)
            plan = self.ensure_plan(force=True)
            session = _Session.deserialize(plan.path, self.device_id)
        if session is None:
            raise EngineError(f"tensorrt could not deserialize the plan it just built: {plan.path}")
        try:
            inputs, outputs = session.signature()
            check_model_io(self.bundle, inputs, outputs, f"tensorrt plan {plan.path.name}")
            session.allocate(self.bundle.input.name, (self.max_batch, *self.bundle.input.frame_shape))
        except BaseException:
            session.close()
            raise
        self._plan, self._session = plan, session
        self.warm_up()

    def ensure_plan(self, *, force: bool = False) -> PlanInfo:
        """The plan this engine loads, from the cache or built now; tools/build_engine.py calls this too,
        so the plan it builds ahead is the one a run with the same settings asks for."""
        return ensure_plan(
            self.bundle,
            precision=self.precision,
            profile=self.profile,
            cache_dir=self.backend_options.cache_dir,
            force=force,
            progress=self.backend_options.progress,
            device=self.device_id,
        )

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self._session is None:
            raise EngineError("trt engine is not loaded: call load() first")
        self.check_batch(batch)
        views = self._session.run(batch)
        # astype copies: the views point into pinned buffers that the next batch overwrites.
        return {spec.name: views[spec.name].astype(spec.dtype) for spec in self.bundle.outputs.values()}

    def describe(self) -> dict[str, Any]:
        plan = self._plan
        key = plan.key if plan is not None else None
        return {
            "backend": "tensorrt",
            "version": key.tensorrt_version if key else None,
            "device": f"cuda:{self.device_id}",
            "gpu": key.gpu_name if key else None,
            "compute_capability": ".".join(map(str, key.compute_capability)) if key else None,
            "precision": self.precision,
            "strongly_typed": key.strongly_typed if key else None,
            "max_batch": self.max_batch,
            "profile": list(self.profile),
            "bundle": self.bundle.name,
            "bundle_version": self.bundle.version,
            "plan": str(plan.path) if plan else None,
            "cache": ("built" if plan.built else "hit") if plan else None,
            "build_seconds": round(plan.seconds, 1) if plan else None,
        }

    def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close()


ENGINE_CLASS = TrtEngine
