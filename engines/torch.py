"""Torch engine: the reference backend, running a bundle's torch model (``model.torch``) instead of its ONNX.

It rebuilds the exact module that was exported (:class:`engines.export.fetalclip.FetalClipExport`),
so it is the yardstick the ONNX and TensorRT engines are checked against, and a GPU
fallback (fp16 autocast on CUDA) where TensorRT is missing.

torch and the model code are imported on first use, not at module import: the run config imports
every backend module to read its options, and importing torch costs seconds on a cart.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from engines.base import Engine, EngineError, EngineOptions
from engines.bundle import Bundle, BundleError, check_model_io, file_sha256

if TYPE_CHECKING:
    import torch

    from engines.export.fetalclip import FetalClipExport


class TorchEngine(Engine):
    """Runs ``FetalClipExport`` rebuilt from the bundle's torch model file.

    ``--engine auto`` only picks torch on a GPU and for a bundle with a torch model
    (``suits_auto``); ``--engine torch`` runs it anywhere torch imports. On CUDA the model
    runs under fp16 autocast; on CPU in fp32.
    """

    type_key: ClassVar[str] = "torch"

    def __init__(self, bundle: Bundle, options: EngineOptions) -> None:
        import torch

        super().__init__(bundle, options)
        if options.precision == "int8":
            raise EngineError("the torch engine has no int8 path; use --engine ort with a gated int8 bundle")
        self._model: FetalClipExport | None = None
        self._device = torch.device("cpu")

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import torch

            import engines.export.fetalclip  # noqa: F401  (the model code needs open_clip)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] in ("engines", "pipeline"):
                raise
            return False, f"{(exc.name or 'torch').split('.')[0]} is not installed"
        return True, f"torch {torch.__version__}"

    @classmethod
    def suits_auto(cls, bundle: Bundle, options: EngineOptions) -> tuple[bool, str]:
        import torch

        if options.precision == "int8":
            return False, "int8 runs on ort only"
        if not torch.cuda.is_available():
            return False, f"no CUDA device (torch {torch.__version__})"
        if "torch" not in bundle.manifest["model"]:
            return False, "the bundle has no torch model"
        return True, ""

    def _resolve_device(self) -> torch.device:
        import torch

        device = self.options.device
        if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise EngineError(
                f"device '{device}' requested but torch {torch.__version__} sees no CUDA device"
            )
        return torch.device("cuda:0" if device == "auto" else device)

    def on_cpu(self) -> bool:
        device = self._device if self._model is not None else self._resolve_device()
        return device.type == "cpu"

    @property
    def _half(self) -> bool:
        """fp16 autocast on CUDA unless fp32 was asked for; CPU always runs fp32."""
        return self._device.type == "cuda" and self.options.precision in ("auto", "fp16")

    def load(self) -> None:
        """Check and rebuild the torch model, move it to the device, check its signature, warm up.

        ``threads`` > 0 sets torch's intra-op threads, which is process-wide: the
        engine owns its inference process.
        """
        import torch

        from engines.export.fetalclip import CheckpointError, load_torch_artifact

        device = self._resolve_device()
        if device.type == "cpu" and self.options.precision == "fp16":
            raise EngineError("the torch engine runs fp16 only on CUDA; use precision fp32 or auto on CPU")
        model_info = self.bundle.manifest["model"]
        name = model_info.get("torch")
        if name is None:
            raise BundleError.at(
                self.bundle.path,
                "has no torch model ('model.torch'); rebuild it with tools/build_bundle.py without "
                "--no-torch, or use another engine",
            )
        path = self.bundle.path / name
        if not path.is_file():
            raise BundleError.at(self.bundle.path, f"{name} not found")
        actual = file_sha256(path)
        if actual != model_info["torch_sha256"]:
            problem = (
                f"{name} sha256 mismatch (manifest {model_info['torch_sha256'][:12]}.., file {actual[:12]}..)"
            )
            raise BundleError.at(self.bundle.path, problem)
        try:
            model = load_torch_artifact(path)
        except CheckpointError as exc:
            raise BundleError.at(self.bundle.path, str(exc)) from exc

        size = model.image_size
        check_model_io(
            self.bundle,
            {"image": ("uint8", (None, size, size))},
            {
                out: ("uint8" if out == "mask" else "float32", (None, *shape))
                for out, shape in model.output_shapes.items()
            },
            name,
        )
        if self.options.threads > 0:
            torch.set_num_threads(self.options.threads)
        self._device = device
        self._model = model.to(device)
        self.warm_up()

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        if self._model is None:
            raise EngineError("torch engine is not loaded: call load() first")
        self.check_batch(batch)
        image = torch.from_numpy(batch).to(self._device)
        autocast = torch.autocast("cuda", dtype=torch.float16) if self._half else nullcontext()
        with torch.inference_mode(), autocast:
            results = dict(zip(self._model.output_names, self._model(image), strict=True))
        return {
            spec.name: results[spec.name].cpu().numpy().astype(spec.dtype, copy=False)
            for spec in self.bundle.outputs.values()
        }

    def describe(self) -> dict[str, Any]:
        import torch

        return {
            "backend": "torch",
            "version": torch.__version__,
            "device": str(self._device),
            "precision": "fp16-autocast" if self._half else "fp32",
            "max_batch": self.max_batch,
            "bundle": self.bundle.name,
            "bundle_version": self.bundle.version,
            "threads": self.options.threads,
        }

    def close(self) -> None:
        on_cuda = self._model is not None and self._device.type == "cuda"
        self._model = None
        if on_cuda:
            import torch

            torch.cuda.empty_cache()


ENGINE_CLASS = TorchEngine
