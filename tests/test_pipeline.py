"""The pass inside other tools' pipelines: torch.onnx, onnx-ir PassManager + onnxscript's optimizer,
ModelProto in / ModelProto out, and ORT's transformer optimizer afterwards."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from conftest import TINY_DROPPED, rel_err

from ffnfusion import AttentionRemovalPass, FFNFusionPass, find_blocks, fuse_ffn
from ffnfusion.core.errors import InvalidArgumentError
from ffnfusion.exporters import llama_surgery
from ffnfusion.runtime.onnxruntime import create_session, run_logits

IDS = np.random.default_rng(12).integers(0, 128, (2, 9))


def _parallel_reference(tiny_llama, groups, dropped=TINY_DROPPED):
    model = copy.deepcopy(tiny_llama)
    llama_surgery.drop_attention(model, dropped)
    llama_surgery.parallelize_groups(model, groups)
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(IDS)).logits.numpy()


def test_torch_onnx_export_pipeline(tiny_llama, tmp_path):
    """The README example: export with dynamo, run the pass on program.model, save."""
    model = copy.deepcopy(tiny_llama)
    llama_surgery.drop_attention(model, TINY_DROPPED)

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids, use_cache=False).logits

    program = torch.onnx.export(LogitsOnly(model), (torch.from_numpy(IDS),), dynamo=True, opset_version=20,
                                input_names=["input_ids"], output_names=["logits"])
    FFNFusionPass([[2, 3, 4], [5, 6]])(program.model)
    program.model.ir_version = 10
    path = tmp_path / "model.onnx"
    program.save(str(path), external_data=True)
    assert rel_err(run_logits(create_session(path), IDS), _parallel_reference(tiny_llama, [[2, 3, 4], [5, 6]])) <= 1e-5


def test_pass_manager_with_onnxscript_optimizer(tiny_dynamo20, tiny_llama, tmp_path):
    from onnxscript import optimizer

    model = ir.load(tiny_dynamo20)
    pipeline = ir.passes.PassManager([AttentionRemovalPass([7]), FFNFusionPass([[2, 3, 4, 5, 6, 7]])])
    pipeline(model)
    optimizer.optimize_ir(model)
    assert find_blocks(model).layer(4).ffn.width == 6 * 160
    path = tmp_path / "model.onnx"
    ir.save(model, path)
    expected = _parallel_reference(tiny_llama, [list(range(2, 8))], dropped=TINY_DROPPED + [7])
    assert rel_err(run_logits(create_session(path), IDS), expected) <= 1e-5


def test_fuse_ffn_accepts_proto_ir_and_path(tiny_dynamo20, tiny_llama, tmp_path):
    proto = onnx.load(str(tiny_dynamo20))
    fused_proto = fuse_ffn(proto, "2-4")
    assert isinstance(fused_proto, onnx.ModelProto) and len(fused_proto.graph.node) < len(proto.graph.node)
    assert len(proto.graph.node) == len(onnx.load(str(tiny_dynamo20)).graph.node)  # input untouched
    model = ir.load(tiny_dynamo20)
    assert fuse_ffn(model, [[2, 3, 4]]) is model
    out = fuse_ffn(tiny_dynamo20, "2-4", output=tmp_path / "f" / "model.onnx")
    assert rel_err(run_logits(create_session(out), IDS), _parallel_reference(tiny_llama, [[2, 3, 4]])) <= 1e-5
    with pytest.raises(InvalidArgumentError, match="needs output=PATH"):
        fuse_ffn(tiny_dynamo20, "2-4")


def test_ort_transformer_optimizer_after_fusion(tiny_dynamo20, tmp_path):
    """ffnfusion first, then ORT's optimizer (which folds norms into SkipSimplifiedLayerNormalization)."""
    from onnxruntime.transformers.optimizer import optimize_model

    fused = fuse_ffn(tiny_dynamo20, "2-4,5-6", output=tmp_path / "fused.onnx")
    optimized = optimize_model(str(fused), model_type="gpt2", num_heads=0, hidden_size=0, opt_level=0)
    ops = {node.op_type for node in optimized.model.graph.node}
    assert ops & {"SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"}, sorted(ops)
    path = tmp_path / "optimized.onnx"
    optimized.save_model_to_file(str(path))
    assert rel_err(run_logits(create_session(path), IDS), run_logits(create_session(fused), IDS)) <= 1e-4


def test_errors_inside_pass_managers_reach_the_cli_as_one_line(tiny_dynamo20, tmp_path, capsys):
    """onnx-ir's Sequential/PassManager wrap what a pass raises in PassError (twice for a manager);
    the CLI reports the FFNFusionError underneath, and `fuse --repair` runs its passes unwrapped."""
    from ffnfusion.cli import main, user_error
    from ffnfusion.core.errors import InvalidPlanError

    model = ir.load(tiny_dynamo20)
    with pytest.raises(ir.passes.PassError) as caught:
        ir.passes.PassManager([FFNFusionPass([[0, 1]])])(model)
    error = user_error(caught.value)
    assert isinstance(error, InvalidPlanError) and "layer 1 has attention, between FFNs 0 and 1" in str(error)
    assert user_error(ir.passes.PassError("no cause")) is None  # not ours: a bug, shown with its traceback

    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 128, 4096))
    out = tmp_path / "never" / "model.onnx"
    code = main(["fuse", str(tiny_dynamo20), "-o", str(out), "--groups", "0-1", "--repair", "--repair-tokens", "1024",
                 "--calib-ids", str(ids)])
    stderr = capsys.readouterr().err
    assert code == 1 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("ffnfusion: error: group 0-1: layer 1 has attention")
    assert not out.parent.exists()
