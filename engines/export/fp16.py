"""fp16 copies of fp32 ONNX models, for strongly typed TensorRT builds.

TensorRT 11 dropped weak typing (``BuilderFlag.FP16``): a network runs in the types its
graph declares, so an fp16 engine needs an fp16 graph. The conversion is done by the
converter that ships with ONNX Runtime rather than by a graph pass of our own; this
module only chooses what stays fp32 and checks the result.

NVIDIA's documented route, ModelOpt's AutoCast (``modelopt.onnx.autocast.convert_to_mixed_precision``,
nvidia-modelopt 0.47), was tried: it runs without TensorRT and, told to keep :data:`FP32_OPS`, matches
this converter on the tiny FetalCLIP export. It is not used because its documented install,
``nvidia-modelopt[onnx]``, pins onnx~=1.21 and onnxruntime-gpu~=1.24 (a second ONNX Runtime over the
one the engines and the int8 gate run) and cupy-cuda12x, and its base requirement torch>=2.8 brings
torch's own CUDA libraries into a TensorRT runtime that otherwise needs no torch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
import onnxruntime
from onnx.external_data_helper import uses_external_data
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

FP32_OPS = (
    "LayerNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "Softmax",
    "ReduceMean",
    "Pow",
    "Sqrt",
)
"""Ops kept in fp32: normalisations and softmax reduce over many values, where fp16 sums overflow
or lose the small differences they exist to measure. ReduceMean, Pow and Sqrt cover layer norms
exported as primitive ops (older opsets)."""

IN_MEMORY_LIMIT = 1_800_000_000
"""Models stored in fewer bytes are typed in memory. Protobuf cannot serialise a message of 2 GiB or
more, which in-memory shape inference needs to do; the margin covers what the converter adds."""


def recipe() -> str:
    """What decides the converted graph, for the TensorRT plan key: the converter (ONNX Runtime's, by
    version) and the ops it keeps fp32, so editing either rebuilds plans made from the old conversion."""
    kept = ",".join(sorted({*DEFAULT_OP_BLOCK_LIST, *FP32_OPS}))
    return f"ort-float16-{onnxruntime.__version__}-{hashlib.sha256(kept.encode()).hexdigest()[:8]}"


def _stored_size(src: Path, model: onnx.ModelProto) -> int:
    """Bytes of the model file plus every external data file it names."""
    locations = {
        entry.value
        for tensor in model.graph.initializer
        if uses_external_data(tensor)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return src.stat().st_size + sum((src.parent / name).stat().st_size for name in locations)


def convert_to_fp16(src: Path, dst: Path) -> Path:
    """Write an fp16 copy of the fp32 ONNX model ``src`` to ``dst`` and return ``dst``.

    Graph inputs and outputs keep their types (uint8 frames in, fp32 scores out) so the
    bundle manifest still describes the converted model; :data:`FP32_OPS` stay fp32.

    Models with external data are supported, and the copy keeps its weights in
    ``<dst>.data``. Below :data:`IN_MEMORY_LIMIT` the converter's type inference runs on
    the loaded model and sees every constant. Above it, inference runs from the file and
    cannot read constants stored externally, so shape constants (Reshape shapes, Unsqueeze
    axes) must be stored inline, as ``onnx.save`` and ``torch.onnx.export`` do by default;
    a model that breaks this fails the final ONNX check instead of producing a wrong graph.
    """
    src, dst = Path(src), Path(dst)
    stored = onnx.load(str(src), load_external_data=False)
    external = any(uses_external_data(tensor) for tensor in stored.graph.initializer)
    source = onnx.load(str(src)) if _stored_size(src, stored) < IN_MEMORY_LIMIT else str(src)
    model = convert_float_to_float16(
        source, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OPS]
    )
    dst.parent.mkdir(parents=True, exist_ok=True)
    # The converter appends its Cast nodes at the end of the graph; ONNX requires topological order.
    OnnxModel(model).save_model_to_file(str(dst), use_external_data_format=external)
    onnx.checker.check_model(str(dst), full_check=True)
    return dst
