"""TensorRT: the static check runs everywhere; building needs TensorRT and a GPU (skipped here)."""

from __future__ import annotations

import importlib.util

import pytest
from onnx import TensorProto, helper

from ffnfusion.cli import main
from ffnfusion.errors import UsageError
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
    with pytest.raises(UsageError, match="bad shape"):
        tensorrt.parse_shapes("input_ids=1x128")
    profile = tensorrt.default_profile(tiny_kv_cache)
    assert profile.max["past_key_values.0.key"] == (8, 2, 512, 16)
    assert profile.min["past_key_values.0.key"][2] == 0 and profile.max["attention_mask"] == (8, 1024)
    command = tensorrt.trtexec_command("m.onnx", "m.plan", profile, 2048, "cache.bin")
    assert command.startswith("trtexec --onnx=m.onnx --saveEngine=m.plan --stronglyTyped --minShapes=input_ids:1x1,")
    assert "--memPoolSize=workspace:2048M" in command and "--timingCacheFile=cache.bin" in command


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed: the missing-TensorRT path cannot be exercised")
def test_build_engine_without_tensorrt(tiny_dynamo20, tmp_path, capsys):
    plan = tmp_path / "model.plan"
    assert main(["build-engine", str(tiny_dynamo20), "-o", str(plan)]) == 3
    captured = capsys.readouterr()
    assert captured.out.startswith("trtexec --onnx=")
    assert "TensorRT is not installed" in captured.err and "pip install tensorrt" in captured.err
    assert not plan.exists()


@pytest.mark.skipif(not HAVE_TENSORRT, reason="TensorRT is not installed (it needs NVIDIA's index and a GPU)")
def test_build_and_run_engine(tiny_dynamo20, tmp_path, capsys):
    plan = tmp_path / "model.plan"
    assert main(["build-engine", str(tiny_dynamo20), "-o", str(plan), "--max-shapes",
                 "input_ids:2x64,attention_mask:2x64"]) == 0
    assert main(["run-engine", str(plan), str(tiny_dynamo20), "--batch", "2", "--seq", "16"]) == 0
    error = float(capsys.readouterr().out.split("relative error ")[1].split()[0])
    assert error <= 1e-3
