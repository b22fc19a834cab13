"""The TensorRT ONNX parser's documented constraints, checked on an ONNX file without TensorRT.

TensorRT cannot be installed everywhere a bundle is built, and a graph it refuses is otherwise found only
at the first plan build on the GPU machine. :func:`check_tensorrt_onnx` names, per node, what breaks the
constraints the trt backend relies on:

- every node is a default-domain operator the parser supports, at an opset it supports, with a data type
  that operator's row lists, and within the few restrictions listed there that our exports can meet
  (Reduce ``axes`` a constant, Resize modes, LayerNormalization's single output);
- UINT8 appears only as network inputs or outputs, converted there by a Cast from or to FLOAT/FLOAT16:
  the only conversions TensorRT documents for it ("kUINT8 conversions are not supported for {kINT8,
  kINT32, kBOOL}", ``DataType::kUINT8`` and ``IIdentityLayer`` in include/NvInferRuntimeBase.h and
  include/NvInfer.h, TensorRT 10.x and 11.x);
- network inputs and outputs are of the bundle's types (uint8, fp32, fp16), and only their batch axis
  (axis 0) is dynamic: the engine builds one optimisation profile over the batch and sizes every output
  buffer at the largest batch.

BOOL tensors between nodes are allowed: the compare operators produce them and Where, And, Not and Cast
are documented to take them. Nodes inside subgraphs (If, Loop) are not checked; our exports have none.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import onnx
from onnx import TensorProto

OPSET_RANGE = (9, 24)
"""Default-domain opsets the parser supports ("TensorRT 10.15 supports operators in the inclusive range of
opset 9 to opset 24")."""

# Source: onnx/onnx-tensorrt, docs/operators.md, "Supported ONNX Operators" for TensorRT 10.15 (the
# Operator Support Matrix, rows marked Y, column "Supported Types"). Operators marked N are absent.
_SUPPORT_MATRIX = """
Abs FP32 FP16 BF16 INT32 INT64
Acos FP32 FP16 BF16
Acosh FP32 FP16 BF16
Add FP32 FP16 BF16 INT32 INT64
And BOOL
ArgMax FP32 FP16 BF16 INT32 INT64
ArgMin FP32 FP16 BF16 INT32 INT64
Asin FP32 FP16 BF16
Asinh FP32 FP16 BF16
Atan FP32 FP16 BF16
Atanh FP32 FP16 BF16
Attention FP32 FP16 BF16 INT8 FP8
AveragePool FP32 FP16 BF16
BatchNormalization FP32 FP16 BF16
BlackmanWindow FP32 FP16
Cast FP32 FP16 BF16 INT32 INT64 UINT8 BOOL
CastLike FP32 FP16 BF16 INT32 INT64 UINT8 BOOL
Ceil FP32 FP16 BF16
Celu FP32 FP16 BF16
Clip FP32 FP16 BF16
Concat FP32 FP16 BF16 INT32 INT64 BOOL
Constant FP32 FP16 BF16 FP8 FP4 INT4 INT32 INT64 BOOL
ConstantOfShape FP32 FP16 BF16 FP8 FP4 INT4 INT32 INT64 BOOL
Conv FP32 FP16 BF16
ConvTranspose FP32 FP16 BF16
Cos FP32 FP16 BF16
Cosh FP32 FP16 BF16
CumSum FP32 FP16 BF16
DeformConv FP32 FP16
DepthToSpace FP32 FP16 BF16 INT32 INT64
DequantizeLinear INT8 FP8 FP4 INT4
Div FP32 FP16 BF16 INT32 INT64
Dropout FP32 FP16 BF16
Einsum FP32 FP16 BF16
Elu FP32 FP16 BF16
Equal FP32 FP16 BF16 INT32 INT64
Erf FP32 FP16 BF16
Exp FP32 FP16 BF16
Expand FP32 FP16 BF16 INT32 INT64 BOOL
EyeLike FP32 FP16 BF16 INT32 INT64 BOOL
Flatten FP32 FP16 BF16 INT32 INT64 BOOL
Floor FP32 FP16 BF16
Gather FP32 FP16 BF16 INT32 INT64 BOOL
GatherElements FP32 FP16 BF16 INT32 INT64 BOOL
GatherND FP32 FP16 BF16 INT32 INT64 BOOL
Gelu FP32 FP16 BF16 INT8 INT32 INT64
Gemm FP32 FP16 BF16
GlobalAveragePool FP32 FP16 BF16
GlobalLpPool FP32 FP16 BF16
GlobalMaxPool FP32 FP16 BF16
Greater FP32 FP16 BF16 INT32 INT64
GreaterOrEqual FP32 FP16 BF16 INT32 INT64
GridSample FP32 FP16
GroupNormalization FP32 FP16 BF16
GRU FP32 FP16 BF16
HammingWindow FP32 FP16
HannWindow FP32 FP16
HardSigmoid FP32 FP16 BF16
HardSwish FP32 FP16 BF16
Hardmax FP32 FP16 BF16
Identity FP32 FP16 BF16 INT32 INT64 BOOL
If FP32 FP16 BF16 INT32 INT64 BOOL
ImageScaler FP32 FP16 BF16
InstanceNormalization FP32 FP16 BF16
IsInf FP32 FP16 BF16
IsNaN FP32 FP16 BF16 INT32 INT64
LayerNormalization FP32 FP16 BF16
LeakyRelu FP32 FP16 BF16
Less FP32 FP16 BF16 INT32 INT64
LessOrEqual FP32 FP16 BF16 INT32 INT64
Log FP32 FP16 BF16
LogSoftmax FP32 FP16 BF16
Loop FP32 FP16 BF16 INT32 INT64 BOOL
LRN FP32 FP16 BF16
LSTM FP32 FP16 BF16
LpNormalization FP32 FP16 BF16
LpPool FP32 FP16 BF16
MatMul FP32 FP16 BF16
Max FP32 FP16 BF16 INT32 INT64
MaxPool FP32 FP16 BF16
Mean FP32 FP16 BF16 FP8 INT32 INT64
MeanVarianceNormalization FP32 FP16 BF16
Min FP32 FP16 BF16 INT32 INT64
Mish FP32 FP16
Mod FP32 FP16 BF16 INT32 INT64
Mul FP32 FP16 BF16 INT32 INT64
Neg FP32 FP16 BF16 INT32 INT64
NonMaxSuppression FP32 FP16
NonZero FP32 FP16
Not BOOL
OneHot FP32 FP16 BF16 INT32 INT64 BOOL
Or BOOL
Pad FP32 FP16 BF16 INT32 INT64
ParametricSoftplus FP32 FP16 BF16
Pow FP32 FP16 BF16 INT32 INT64
PRelu FP32 FP16 BF16
QuantizeLinear FP32 FP16 BF16
RandomNormal FP32 FP16 BF16
RandomNormalLike FP32 FP16 BF16
RandomUniform FP32 FP16 BF16
RandomUniformLike FP32 FP16 BF16
Range FP32 FP16 BF16 INT32 INT64
Reciprocal FP32 FP16 BF16
ReduceL1 FP32 FP16 BF16 INT32 INT64
ReduceL2 FP32 FP16 BF16 INT32 INT64
ReduceLogSum FP32 FP16 BF16 INT32 INT64
ReduceLogSumExp FP32 FP16 BF16 INT32 INT64
ReduceMax FP32 FP16 BF16 INT32 INT64
ReduceMean FP32 FP16 BF16 INT32 INT64
ReduceMin FP32 FP16 BF16 INT32 INT64
ReduceProd FP32 FP16 BF16 INT32 INT64
ReduceSum FP32 FP16 BF16 INT32 INT64
ReduceSumSquare FP32 FP16 BF16 INT32 INT64
Relu FP32 FP16 BF16 INT32 INT64
Reshape FP32 FP16 BF16 INT32 INT64 BOOL
Resize FP32 FP16 BF16
ReverseSequence FP32 FP16 BF16 INT32 INT64 BOOL
RMSNormalization FP32 FP16 BF16
RNN FP32 FP16 BF16
RoiAlign FP32 FP16
RotaryEmbedding FP32 FP16 BF16
Round FP32 FP16 BF16
STFT FP32
ScaledTanh FP32 FP16 BF16
Scan FP32 FP16 BF16
Scatter FP32 FP16 BF16 INT32 INT64
ScatterElements FP32 FP16 BF16 INT32 INT64
ScatterND FP32 FP16 BF16 INT32 INT64
Selu FP32 FP16 BF16
Shape FP32 FP16 BF16 INT32 INT64 BOOL
Shrink FP32 FP16 BF16 INT32 INT64
Sigmoid FP32 FP16 BF16
Sign FP32 FP16 BF16 INT32 INT64
Sin FP32 FP16 BF16
Sinh FP32 FP16 BF16
Size FP32 FP16 BF16 INT32 INT64 BOOL
Slice FP32 FP16 BF16 INT32 INT64 BOOL
Softmax FP32 FP16 BF16
Softplus FP32 FP16 BF16
Softsign FP32 FP16 BF16
SpaceToDepth FP32 FP16 BF16 INT32 INT64
Split FP32 FP16 BF16 INT32 INT64 BOOL
Sqrt FP32 FP16 BF16
Squeeze FP32 FP16 BF16 INT32 INT64 BOOL
Sub FP32 FP16 BF16 INT32 INT64
Sum FP32 FP16 BF16 INT32 INT64
Tan FP32 FP16 BF16
Tanh FP32 FP16 BF16
TensorScatter FP32 FP16 BF16 INT32
ThresholdedRelu FP32 FP16 BF16
Tile FP32 FP16 BF16 INT32 INT64 BOOL
TopK FP32 FP16 BF16 INT32 INT64
Transpose FP32 FP16 BF16 INT32 INT64 BOOL
Trilu FP32 FP16 BF16 INT32 INT64 BOOL
Unsqueeze FP32 FP16 BF16 INT32 INT64 BOOL
Upsample FP32 FP16 BF16
Where FP32 FP16 BF16 INT32 INT64 BOOL
Xor BOOL
"""

SUPPORTED_OPS: dict[str, frozenset[str]] = {
    op: frozenset(kinds) for op, *kinds in (line.split() for line in _SUPPORT_MATRIX.strip().splitlines())
}
"""Operator -> the data types its row lists (of its first input; of its output for Constant)."""

TYPE_NAMES = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.INT8: "INT8",
    TensorProto.UINT8: "UINT8", TensorProto.BOOL: "BOOL", TensorProto.FLOAT8E4M3FN: "FP8",
    TensorProto.INT4: "INT4", TensorProto.FLOAT4E2M1: "FP4", TensorProto.DOUBLE: "DOUBLE",
}
"""ONNX element types by the names the support matrix uses."""

IO_TYPES = frozenset({TensorProto.UINT8, TensorProto.FLOAT, TensorProto.FLOAT16})
"""Network input and output types the bundle format and the trt engine's buffers take."""

UINT8_PEERS = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16})
"""The only types TensorRT converts UINT8 from or to (kFLOAT, kHALF)."""

RESIZE_MODES = frozenset({"nearest", "linear"})
RESIZE_COORDINATES = frozenset(
    {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
)
CONSTANT_AXES_OPS = frozenset(op for op in SUPPORTED_OPS if op.startswith("Reduce"))


def _label(index: int, node: onnx.NodeProto) -> str:
    return f"node {index} {node.op_type} '{node.name or (node.output[0] if node.output else '?')}'"


def _type_name(elem_type: int) -> str:
    return TYPE_NAMES.get(elem_type, TensorProto.DataType.Name(elem_type))


def _attribute(node: onnx.NodeProto, name: str, default: object) -> object:
    for attr in node.attribute:
        if attr.name == name:
            value = onnx.helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _io_problems(graph: onnx.GraphProto) -> Iterable[str]:
    """Network inputs and outputs: allowed types, fixed dims except the batch axis."""
    initializers = {t.name for t in graph.initializer}
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for value in values:
            if value.name in initializers:
                continue  # an old-style graph input that is really a weight
            tensor = value.type.tensor_type
            if tensor.elem_type not in IO_TYPES:
                allowed = ", ".join(sorted(_type_name(t) for t in IO_TYPES))
                yield (f"network {kind} '{value.name}' is {_type_name(tensor.elem_type)}; the trt engine "
                       f"takes {allowed}")
            if not tensor.HasField("shape"):
                yield f"network {kind} '{value.name}' has no shape; only the batch axis may be dynamic"
                continue
            for axis, dim in enumerate(tensor.shape.dim):
                if axis > 0 and not (dim.HasField("dim_value") and dim.dim_value > 0):
                    shown = dim.dim_param or "unknown"
                    yield (f"network {kind} '{value.name}' axis {axis} is dynamic ({shown}); only the "
                           f"batch axis (0) may be")


def _node_problems(graph: onnx.GraphProto, types: dict[str, int]) -> Iterable[str]:
    """Every node: supported operator and type, documented UINT8 conversions and restrictions."""
    graph_inputs = {v.name for v in graph.input}
    graph_outputs = {v.name for v in graph.output}
    constants = {t.name for t in graph.initializer}
    constants.update(out for node in graph.node if node.op_type == "Constant" for out in node.output)
    for index, node in enumerate(graph.node):
        label = _label(index, node)
        if node.domain not in ("", "ai.onnx"):
            yield f"{label}: domain '{node.domain}' is not the ONNX default domain the parser supports"
            continue
        supported = SUPPORTED_OPS.get(node.op_type)
        if supported is None:
            yield f"{label}: {node.op_type} is not in the TensorRT ONNX parser's supported operators"
            continue
        typed = node.input[0] if node.input and node.input[0] else (node.output[0] if node.output else "")
        if typed in types and _type_name(types[typed]) not in supported:
            yield (f"{label}: {node.op_type} on {_type_name(types[typed])} '{typed}' (the parser supports "
                   f"{', '.join(sorted(supported))})")
        for name in node.output:
            at_output = name in graph_outputs and node.op_type == "Cast"
            if types.get(name) == TensorProto.UINT8 and not at_output:
                yield f"{label}: makes UINT8 tensor '{name}'; UINT8 may only be a network input or output"
        if node.op_type == "Cast":
            source, target = types.get(node.input[0]), int(_attribute(node, "to", 0))
            peers = {source, target} - {TensorProto.UINT8}
            if TensorProto.UINT8 in (source, target) and not peers <= UINT8_PEERS:
                yield (f"{label}: casts {_type_name(source or 0)} to {_type_name(target)}; TensorRT converts "
                       f"UINT8 only from or to FLOAT and FLOAT16 (cast through FLOAT)")
        elif any(name in graph_inputs and types.get(name) == TensorProto.UINT8 for name in node.input):
            yield f"{label}: takes the UINT8 network input directly; only a Cast to FLOAT or FLOAT16 may"
        yield from _restriction_problems(label, node, constants)


def _restriction_problems(label: str, node: onnx.NodeProto, constants: set[str]) -> Iterable[str]:
    """The support matrix's Restrictions column, for the operators our exports use."""
    if node.op_type in CONSTANT_AXES_OPS and len(node.input) > 1 and node.input[1] and (
            node.input[1] not in constants):
        yield f"{label}: axes '{node.input[1]}' must be an initializer or a Constant"
    elif node.op_type == "Resize":
        mode = _attribute(node, "mode", "nearest")
        coordinates = _attribute(node, "coordinate_transformation_mode", "half_pixel")
        if mode not in RESIZE_MODES:
            yield f"{label}: Resize mode '{mode}' (the parser supports {', '.join(sorted(RESIZE_MODES))})"
        if coordinates not in RESIZE_COORDINATES:
            yield f"{label}: Resize coordinate_transformation_mode '{coordinates}' is not supported"
        if _attribute(node, "antialias", 0):
            yield f"{label}: Resize antialiasing is not supported"
        if _attribute(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
            yield f"{label}: Resize keep_aspect_ratio_policy must be 'stretch'"
    elif node.op_type == "LayerNormalization" and any(node.output[1:]):
        yield f"{label}: only LayerNormalization's first output (Y) is supported"


def check_tensorrt_onnx(model: str | os.PathLike[str] | onnx.ModelProto) -> list[str]:
    """Every way ``model`` (a path or a loaded model) breaks the documented constraints, one line each,
    naming the node or tensor; an empty list when TensorRT's parser should take it."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(Path(model)), load_external_data=False)  # types need no weights
    problems = []
    opsets = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
    opset = opsets.get("ai.onnx")
    if opset is None or not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        low, high = OPSET_RANGE
        problems.append(f"default-domain opset {opset} is outside the parser's {low}..{high}")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    types = {name: elem for name, elem in types.items() if elem != TensorProto.UNDEFINED}
    problems.extend(_io_problems(graph))
    problems.extend(_node_problems(graph, types))
    problems.extend(f"initializer '{t.name}' is UINT8; UINT8 is only supported as network input or output"
                    for t in graph.initializer if t.data_type == TensorProto.UINT8)
    return problems
