"""TensorRT: the static check runs everywhere; building needs TensorRT and a GPU (skipped here)."""

from __future__ import annotations

import importlib.util
import re

import pytest
from onnx import TensorProto, helper

from ffnfusion.cli import main
from ffnfusion.core.errors import InvalidArgumentError
from ffnfusion.runtime import tensorrt
from ffnfusion.runtime.tensorrt_check import check_tensorrt

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_fused_model_passes_check_trt(tiny_dynamo20, tmp_path, capsys):
    fused = tmp_path / "fused.onnx"
    assert main(["fuse", str(tiny_dynamo20), "-o", str(fused), "--groups", "2-4,5-6"]) == 0
    result = check_tensorrt(fused)
    assert result.ok and result.nodes > 100 and result.tensorrt == "10.15"
    assert main(["check-trt", str(fused)]) == 0
    assert "OK:" in capsys.readouterr().out


def test_contrib_ops_and_opset_are_flagged(tmp_path, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("FastGelu", ["x"], ["h"], domain="com.microsoft", name="fast_gelu"),
             helper.make_node("Unique", ["h"], ["y"], name="unique")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[
        helper.make_opsetid("", 25), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    problems = check_tensorrt(path).problems
    assert any("fast_gelu" in p and "com.microsoft" in p for p in problems)
    assert any("unique" in p and "listed as unsupported" in p for p in problems)
    assert any("opset 25 is outside" in p for p in problems)
    assert main(["check-trt", str(path)]) == 1
    assert "node(s) or settings TensorRT cannot parse" in capsys.readouterr().err


def test_shapes_and_trtexec_command(tiny_kv_cache):
    assert tensorrt.parse_shapes("input_ids:1x128, attention_mask:1x128") == {
        "input_ids": (1, 128), "attention_mask": (1, 128)}
    with pytest.raises(InvalidArgumentError, match="bad shape"):
        tensorrt.parse_shapes("input_ids=1x128")
    profile = tensorrt.default_profile(tiny_kv_cache)
    assert profile.max["past_key_values.0.key"] == (8, 2, 512, 16)
    assert profile.min["past_key_values.0.key"][2] == 0 and profile.max["attention_mask"] == (8, 1024)
    command = tensorrt.trtexec_command("m.onnx", "m.plan", profile, 2048, "cache.bin")
    assert command.startswith("trtexec --onnx=m.onnx --saveEngine=m.plan --stronglyTyped --minShapes=input_ids:1x1,")
    assert "--noTF32" in command
    assert "--memPoolSize=workspace:2048M" in command and "--timingCacheFile=cache.bin" in command


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed: the missing-TensorRT path cannot be exercised")
def test_build_engine_without_tensorrt(tiny_dynamo20, tmp_path, capsys):
    plan = tmp_path / "model.plan"
    assert main(["build-engine", str(tiny_dynamo20), "-o", str(plan)]) == 3
    captured = capsys.readouterr()
    assert captured.out.startswith("trtexec --onnx=")
    assert "TensorRT is not installed" in captured.err and "pip install 'tensorrt>=10,<12'" in captured.err
    assert not plan.exists()


@pytest.mark.skipif(not HAVE_TENSORRT, reason="TensorRT is not installed (it needs NVIDIA's index and a GPU)")
def test_build_and_run_engine(tiny_dynamo20, tmp_path, capsys):
    plan = tmp_path / "model.plan"
    # max lowered below the default opt (1x128): opt is clamped to 1x64 before TensorRT sees it
    assert main(["build-engine", str(tiny_dynamo20), "-o", str(plan), "--max-shapes",
                 "input_ids:2x64,attention_mask:2x64"]) == 0
    assert "--optShapes=input_ids:1x64,attention_mask:1x64" in capsys.readouterr().out
    assert main(["run-engine", str(plan), str(tiny_dynamo20), "--batch", "2", "--seq", "16"]) == 0
    error = float(capsys.readouterr().out.split("relative error ")[1].split()[0])
    assert error <= 1e-4  # float32 without TF32


# --- the optimisation profile is checked before TensorRT is imported ---------------------------------

def _merge(model, **overrides):
    return tensorrt.merge_profile(tensorrt.default_profile(model),
                                  {point: tensorrt.parse_shapes(text) for point, text in overrides.items()})


def test_lower_max_clamps_the_default_opt(tiny_dynamo20):
    profile = _merge(tiny_dynamo20, max="input_ids:2x64,attention_mask:2x64")
    assert profile.opt["input_ids"] == (1, 64) and profile.opt["attention_mask"] == (1, 64)
    assert profile.max["input_ids"] == (2, 64) and profile.min["input_ids"] == (1, 1)


def test_decode_opt_keeps_mask_equal_past_plus_sequence(tiny_kv_cache):
    profile = _merge(tiny_kv_cache, opt="input_ids:1x1")
    past = profile.opt["past_key_values.0.key"][2]
    assert profile.opt["attention_mask"] == (1, past + 1)
    for point in ("min", "max"):
        shapes = profile.point(point)
        assert shapes["attention_mask"][1] == shapes["past_key_values.0.key"][2] + shapes["input_ids"][1]
    batch8 = _merge(tiny_kv_cache, opt="input_ids:8x1")  # the past follows the batch
    assert batch8.opt["past_key_values.0.key"][0] == 8 and batch8.opt["attention_mask"][0] == 8


@pytest.mark.parametrize(("overrides", "message"), [
    ({"max": "input_ids:2x64", "opt": "input_ids:1x128"}, "input_ids: axis 1 needs min <= opt <= max, got 1 <= 128 <= 64"),
    ({"min": "input_ids:1x1x1"}, "have different ranks"),
    ({"opt": "input_ids:1x16,attention_mask:1x16"}, "attention_mask has length 16, but past + sequence = 144"),
    ({"opt": "input_ids:2x16,attention_mask:1x144"}, "opt shapes disagree on the batch size: input_ids 2, attention_mask 1"),
    ({"max": "logits:1x2"}, "names 'logits', which is not a model input"),
])
def test_bad_profiles_are_refused_in_one_line(tiny_kv_cache, tmp_path, capsys, overrides, message):
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        _merge(tiny_kv_cache, **overrides)
    plan = tmp_path / "m.plan"
    argv = ["build-engine", str(tiny_kv_cache), "-o", str(plan)]
    for point, text in overrides.items():
        argv += [f"--{point}-shapes", text]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1
    assert captured.out == "" and not plan.exists()  # refused before the trtexec line and before TensorRT


def test_inputs_without_default_shape_need_all_three_points(tmp_path):
    x = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 3, 8, 8, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["features"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    profile = tensorrt.default_profile(path)  # no longer raises before the overrides are known
    assert profile.unknown == {"features": ["batch", "3", "8", "8", "2"]}
    with pytest.raises(InvalidArgumentError, match="input features .* has no default shape"):
        tensorrt.merge_profile(profile, {"max": {"features": (2, 3, 8, 8, 2)}})
    shapes = {p: {"features": (b, 3, 8, 8, 2)} for p, b in (("min", 1), ("opt", 1), ("max", 4))}
    assert tensorrt.merge_profile(profile, shapes).max["features"] == (4, 3, 8, 8, 2)


# --- check-trt: IR versions, subgraphs, LLM restrictions ---------------------------------------------

def _save(tmp_path, graph, opset=20, ir_version=10, functions=()):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], functions=list(functions))
    model.ir_version = ir_version
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_ir_versions_11_and_12_are_not_flagged(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    for ir_version in (11, 12):
        result = check_tensorrt(_save(tmp_path, graph, opset=24, ir_version=ir_version))
        assert result.ok and result.ir_version == ir_version


def test_subgraphs_and_functions_are_checked(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    c = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    branch_out = helper.make_tensor_value_info("b", TensorProto.FLOAT, None)
    then_branch = helper.make_graph([helper.make_node("Unique", ["x"], ["b"], name="unique_in_then")], "then", [],
                                    [branch_out])
    else_branch = helper.make_graph([helper.make_node("Relu", ["x"], ["b"], name="relu_in_else")], "else", [],
                                    [branch_out])
    function = helper.make_function("custom", "MyGelu", ["a"], ["o"],
                                    [helper.make_node("FastGelu", ["a"], ["o"], domain="com.microsoft", name="in_fn")],
                                    [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    nodes = [helper.make_node("If", ["c"], ["t"], then_branch=then_branch, else_branch=else_branch, name="if"),
             helper.make_node("MyGelu", ["t"], ["y"], domain="custom", name="call")]
    graph = helper.make_graph(nodes, "g", [x, c], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("custom", 1),
                                                    helper.make_opsetid("com.microsoft", 1)], functions=[function])
    model.ir_version = 10
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    problems = check_tensorrt(path).problems
    assert any("in subgraph then: node unique_in_then (Unique)" in p for p in problems)
    assert any("in function custom::MyGelu: node in_fn (com.microsoft::FastGelu)" in p for p in problems)
    assert not any("relu_in_else" in p or "node call" in p for p in problems)


def test_llm_restrictions(tmp_path):
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, f, [1, 2, 4, 8]) for n in ("q", "k", "v")]
    inputs += [helper.make_tensor_value_info("past_k", f, [1, 2, 0, 8]), helper.make_tensor_value_info("x", f, [2, 8]),
               helper.make_tensor_value_info("axes", TensorProto.INT64, [1]),
               helper.make_tensor_value_info("pos", TensorProto.INT32, [1, 4]),
               helper.make_tensor_value_info("cos", f, [8, 4]), helper.make_tensor_value_info("sin", f, [8, 4]),
               helper.make_tensor_value_info("data", f, [4]), helper.make_tensor_value_info("idx", TensorProto.INT64, [1, 1]),
               helper.make_tensor_value_info("upd", f, [1])]
    nodes = [helper.make_node("Attention", ["q", "k", "v", "", "past_k", ""], ["att"], name="attention_with_past"),
             helper.make_node("Attention", ["q", "k", "v"], ["att2"], name="plain_attention"),
             helper.make_node("ReduceMean", ["x", "axes"], ["mean"], name="dynamic_axes"),
             helper.make_node("ReduceMean", ["x", "const_axes"], ["mean2"], name="constant_axes"),
             helper.make_node("RotaryEmbedding", ["q", "cos", "sin", "pos"], ["rot"], name="rope_int32"),
             helper.make_node("ScatterND", ["data", "idx", "upd"], ["sc"], reduction="add", name="scatter_add")]
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("att", "att2", "mean", "mean2", "rot", "sc")]
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              initializer=[helper.make_tensor("const_axes", TensorProto.INT64, [1], [1])])
    problems = check_tensorrt(_save(tmp_path, graph, opset=24, ir_version=11)).problems
    flagged = {p.split("node ")[1].split(" ")[0] for p in problems}
    assert flagged == {"attention_with_past", "dynamic_axes", "rope_int32", "scatter_add"}, problems
    assert any("past_key/past_value" in p for p in problems) and any("INT64 position_ids" in p for p in problems)
