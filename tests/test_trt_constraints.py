"""The TensorRT ONNX-parser constraint check (engines/export/trt_constraints.py), without TensorRT.

Every ONNX a bundle ships for the trt engine (reference, demo, their fp16 copies; the FetalCLIP exports in
tests/test_fetalclip.py) must pass it; graphs built with onnx.helper that break one documented rule each
must be refused with the node named.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.bundle import write_manifest
from engines.export.fp16 import convert_to_fp16
from engines.export.reference import make_reference_bundle
from engines.export.trt_constraints import OPSET_RANGE, SUPPORTED_OPS, check_tensorrt_onnx

REPO = Path(__file__).resolve().parents[1]
U8, F32, BOOL = TensorProto.UINT8, TensorProto.FLOAT, TensorProto.BOOL


def model_of(nodes: list, inputs: list, outputs: list, *, inits: list | None = None,
             opset: int = 17, domains: tuple = ()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "probe", inputs, outputs, initializer=inits or [])
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


def frames_in(dims: list | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("image", U8, dims or ["N", 8, 8])


def good_tail() -> list:
    """uint8 in -> FLOAT -> compare -> FLOAT -> uint8 mask out: the pattern the exporters write."""
    return [
        helper.make_node("Cast", ["image"], ["pixels"], name="to_float", to=F32),
        helper.make_node("ReduceMean", ["pixels"], ["mean"], name="mean", axes=[1, 2], keepdims=1),
        helper.make_node("Greater", ["pixels", "mean"], ["bright"], name="compare"),
        helper.make_node("Cast", ["bright"], ["bright_float"], name="bool_to_float", to=F32),
        helper.make_node("Cast", ["bright_float"], ["mask"], name="float_to_uint8", to=U8),
    ]


MASK_OUT = helper.make_tensor_value_info("mask", U8, ["N", 8, 8])


def test_the_exporters_mask_pattern_passes() -> None:
    model = model_of(good_tail(), [frames_in()], [MASK_OUT])
    onnx.checker.check_model(model, full_check=True)
    assert check_tensorrt_onnx(model) == []


def bad_models() -> dict[str, tuple[onnx.ModelProto, str]]:
    """One documented rule broken per model, and the words that must name it."""
    tail = good_tail()
    bool_to_uint8 = [*tail[:3], helper.make_node("Cast", ["bright"], ["mask"], name="bool_cast", to=U8)]
    inner_uint8 = [
        *tail[:4],
        helper.make_node("Cast", ["bright_float"], ["bytes"], name="to_bytes", to=U8),
        helper.make_node("Cast", ["bytes"], ["mask"], name="again", to=U8),
    ]
    straight = [helper.make_node("Identity", ["image"], ["mask"], name="passthrough")]
    unsupported = [*tail[:1], helper.make_node("Det", ["pixels"], ["det"], name="determinant")]
    custom = [*tail[:1],
              helper.make_node("FusedGelu", ["pixels"], ["out"], name="fused", domain="com.example")]
    nearest_cubic = [
        *tail[:1],
        helper.make_node("Resize", ["pixels", "", "scales"], ["big"], name="upsample", mode="cubic"),
    ]
    scales = numpy_helper.from_array(np.array([1, 2, 2], dtype=np.float32), "scales")
    float_out = lambda name, dims: helper.make_tensor_value_info(name, F32, dims)  # noqa: E731
    return {
        "bool to uint8": (model_of(bool_to_uint8, [frames_in()], [MASK_OUT]),
                          "node 3 Cast 'bool_cast': casts BOOL to UINT8"),
        "uint8 inside": (model_of(inner_uint8, [frames_in()], [MASK_OUT]),
                         "node 4 Cast 'to_bytes': makes UINT8 tensor 'bytes'"),
        "uint8 input used directly": (model_of(straight, [frames_in()], [MASK_OUT]),
                                      "node 0 Identity 'passthrough': Identity on UINT8 'image'"),
        "unsupported operator": (model_of(unsupported, [frames_in()], [float_out("det", ["N"])]),
                                 "node 1 Det 'determinant': Det is not in the TensorRT ONNX parser's"),
        "custom domain": (model_of(custom, [frames_in()], [float_out("out", ["N", 8, 8])],
                                   domains=("com.example",)),
                          "node 1 FusedGelu 'fused': domain 'com.example'"),
        "dynamic frame size": (model_of(tail, [frames_in(["N", "H", 8])], [MASK_OUT]),
                               "network input 'image' axis 1 is dynamic (H)"),
        "bool output": (model_of(tail[:3], [frames_in()], [helper.make_tensor_value_info("bright", BOOL,
                                                                                           ["N", 8, 8])]),
                        "network output 'bright' is BOOL"),
        "cubic resize": (model_of(nearest_cubic, [frames_in()], [float_out("big", ["N", 16, 16])],
                                  inits=[scales]),
                         "node 1 Resize 'upsample': Resize mode 'cubic'"),
        "opset too new": (model_of(tail, [frames_in()], [MASK_OUT], opset=OPSET_RANGE[1] + 1),
                          f"default-domain opset {OPSET_RANGE[1] + 1} is outside"),
    }


@pytest.mark.parametrize("case", sorted(bad_models()))
def test_a_graph_that_breaks_a_rule_is_refused_naming_the_node(case: str) -> None:
    model, message = bad_models()[case]
    problems = check_tensorrt_onnx(model)
    assert any(message in problem for problem in problems), problems


def test_support_matrix_is_the_documented_one() -> None:
    """Spot checks against the onnx-tensorrt table: what the exports use is in, known gaps are out."""
    for op in ("LayerNormalization", "MatMul", "Gemm", "Softmax", "Erf", "Resize", "Conv", "Where", "Mod"):
        assert op in SUPPORTED_OPS
    for op in ("Det", "MatMulInteger", "DynamicQuantizeLinear", "Unique", "StringNormalizer"):
        assert op not in SUPPORTED_OPS
    assert {"UINT8", "BOOL"} <= SUPPORTED_OPS["Cast"] and "BOOL" not in SUPPORTED_OPS["Greater"]


@pytest.mark.parametrize("bundle", ["reference", "demo"])
def test_shipped_bundles_and_their_fp16_copies_pass(bundle: str, tmp_path: Path) -> None:
    """The fp16 copy is what a strongly typed (TensorRT 11) fp16 build parses."""
    path = REPO / "bundles" / bundle / "model.onnx"
    assert check_tensorrt_onnx(path) == []
    assert check_tensorrt_onnx(convert_to_fp16(path, tmp_path / "model.fp16.onnx")) == []


@pytest.mark.parametrize(("channels", "work"), [(1, 0), (3, 0), (1, 2)])
def test_every_reference_variant_passes(tmp_path: Path, channels: int, work: int) -> None:
    bundle = make_reference_bundle(tmp_path / "ref", channels=channels, work=work)
    assert check_tensorrt_onnx(bundle / "model.onnx") == []


def test_the_int8_model_is_for_onnx_runtime_only() -> None:
    """ORT's dynamic int8 operators are not TensorRT's: the trt engine builds from model.onnx, never this."""
    problems = check_tensorrt_onnx(REPO / "bundles" / "demo" / "model.int8.onnx")
    assert problems and all("DynamicQuantizeLinear" in p or "MatMulInteger" in p for p in problems)


def test_build_engine_refuses_a_bundle_that_breaks_the_constraints(tmp_path: Path) -> None:
    """Before any TensorRT or GPU check: the user learns which node to fix, on any machine."""
    bundle = make_reference_bundle(tmp_path / "ref")
    model = onnx.load(str(bundle / "model.onnx"))
    [to_float] = [n for n in model.graph.node if list(n.output) == ["mask_float"]]
    [to_uint8] = [n for n in model.graph.node if list(n.output) == ["mask"]]
    to_uint8.input[0] = to_float.input[0]  # the old mask tail: Cast(BOOL -> UINT8)
    model.graph.node.remove(to_float)
    onnx.save(model, str(bundle / "model.onnx"))
    write_manifest(bundle, json.loads((bundle / "bundle.json").read_text()))  # the model's new sha256
    result = subprocess.run([sys.executable, str(REPO / "tools" / "build_engine.py"), "--bundle",
                             str(bundle)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 1 and result.stdout == ""
    assert "breaks the TensorRT ONNX parser's documented constraints" in result.stderr
    assert "Cast 'mask': casts BOOL to UINT8" in result.stderr
