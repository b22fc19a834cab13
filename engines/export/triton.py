"""Write a Triton model repository for a bundle: ``OUT/NAME/config.pbtxt`` and ``OUT/NAME/1/<model file>``,
which a Triton server loads unchanged; carts then score through it with ``--engine kserve``.

The config is built as Triton's own ``ModelConfig`` protobuf (the definitions tritonclient ships) and
written in its text format, so it holds only fields Triton knows: the bundle's input and outputs with their
types and per-frame dims (the batch axis is Triton's, up to ``max_batch_size``), the dynamic batcher
(requests of several carts share one model run), the instance group, and the backend:

- ``onnxruntime`` (default): the bundle's ONNX as it is (``--precision int8``: its gated int8 model, which
  runs on CPU instances only);
- ``tensorrt``: a TensorRT plan (``--plan``), built for the serving GPU and the TensorRT version of that
  Triton release (a plan runs nowhere else), e.g. by ``tools/build_engine.py`` on that machine.

A Triton server cannot run here: what is checked here is the config against Triton's schema.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from engines.bundle import Bundle, BundleError, load_bundle

BACKENDS = {"onnxruntime": "model.onnx", "tensorrt": "model.plan"}
"""Triton backend -> the file name it loads from the version folder."""
TRITON_TYPES = {"bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "uint16": "TYPE_UINT16",
                "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64", "float16": "TYPE_FP16",
                "float32": "TYPE_FP32", "float64": "TYPE_FP64"}
"""numpy dtype names -> Triton's DataType enum names."""
DEFAULT_QUEUE_DELAY_US = 1000


class TritonExportError(ValueError):
    """The repository cannot be written as asked (missing plan, int8 on a GPU, output folder taken)."""


def model_config(bundle: Bundle, backend: str, instance_kind: str, instances: int,
                 queue_delay_us: int) -> Any:
    """The bundle's Triton ``ModelConfig`` message."""
    from tritonclient.grpc import model_config_pb2 as pb

    config = pb.ModelConfig(name=bundle.name, backend=backend, max_batch_size=bundle.max_batch,
                            default_model_filename=BACKENDS[backend])
    spec = bundle.input
    config.input.add(name=spec.name, data_type=pb.DataType.Value(TRITON_TYPES[spec.dtype]),
                     dims=list(spec.frame_shape))
    for out in bundle.outputs.values():
        tensor = config.output.add(name=out.name, data_type=pb.DataType.Value(TRITON_TYPES[out.dtype]))
        if out.shape:
            tensor.dims.extend(out.shape)
        else:  # one number a frame: Triton needs dims, so [1] reshaped to the model's batch-only shape
            tensor.dims.append(1)
            tensor.reshape.SetInParent()
    config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    config.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.Kind.Value(f"KIND_{instance_kind}"))
    return config


def config_text(config: Any) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def parse_config(text: str) -> Any:
    """A config.pbtxt read back as Triton reads it: a field Triton does not know is an error."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    return text_format.Parse(text, pb.ModelConfig())


def write_repository(bundle: Bundle, out: Path, backend: str = "onnxruntime", precision: str = "fp32",
                     plan: Path | None = None, instance_kind: str = "GPU", instances: int = 1,
                     queue_delay_us: int = DEFAULT_QUEUE_DELAY_US) -> Path:
    """Write the bundle's model folder under the repository ``out``; returns that folder."""
    model_file = _model_file(bundle, backend, precision, plan, instance_kind)
    folder = out / bundle.name
    if folder.exists():
        raise TritonExportError(f"{folder} exists already; choose another repository or remove it")
    config = model_config(bundle, backend, instance_kind, instances, queue_delay_us)
    (folder / "1").mkdir(parents=True)
    shutil.copyfile(model_file, folder / "1" / BACKENDS[backend])
    (folder / "config.pbtxt").write_text(config_text(config), encoding="utf-8")
    return folder


def _model_file(bundle: Bundle, backend: str, precision: str, plan: Path | None, instance_kind: str) -> Path:
    if backend == "tensorrt":
        if plan is None or not plan.is_file():
            raise TritonExportError("backend tensorrt needs --plan FILE: a plan built on the serving GPU "
                                    "for that Triton release's TensorRT (tools/build_engine.py there)")
        if instance_kind != "GPU":
            raise TritonExportError("backend tensorrt runs on GPU instances only")
        return plan
    if plan is not None:
        raise TritonExportError("--plan is for --backend tensorrt")
    if precision == "int8":
        if bundle.int8_path is None:
            raise TritonExportError(f"bundle {bundle.name} has no gated int8 model "
                                    "(tools/quantize_bundle.py)")
        if instance_kind != "CPU":
            raise TritonExportError("the int8 model (dynamic quantization) runs on CPU instances only: "
                                    "--instance-kind cpu")
        return bundle.int8_path
    return bundle.model_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="bundle directory")
    parser.add_argument("--out", type=Path, required=True, help="model repository folder (created if absent)")
    parser.add_argument("--backend", choices=tuple(BACKENDS), default="onnxruntime",
                        help="Triton backend (default %(default)s)")
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                        help="onnxruntime backend: the bundle's model.onnx or its gated int8 model")
    parser.add_argument("--plan", type=Path, help="tensorrt backend: the plan file to serve")
    parser.add_argument("--instance-kind", choices=("gpu", "cpu"), default="gpu",
                        help="where Triton runs the model instances (default %(default)s)")
    parser.add_argument("--instances", type=int, default=1, help="model instances (default %(default)s)")
    parser.add_argument("--queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US,
                        help="dynamic batcher: longest a request waits for others to share its batch, "
                             "microseconds (default %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.instances < 1 or args.queue_delay_us < 0:
        print("export_triton: error: --instances must be >= 1 and --queue-delay-us >= 0", file=sys.stderr)
        return 2
    try:
        bundle = load_bundle(args.bundle)
        folder = write_repository(bundle, args.out, args.backend, args.precision, args.plan,
                                  args.instance_kind.upper(), args.instances, args.queue_delay_us)
    except (BundleError, TritonExportError) as exc:
        print(f"export_triton: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {folder} (backend {args.backend}); serve it with "
          f"tritonserver --model-repository {args.out}")
    return 0
