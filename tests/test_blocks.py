"""find_blocks: the same BlockMap from every exporter's encoding, clear errors otherwise."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import TINY_CONFIG, TINY_DROPPED
from onnx import TensorProto, helper

from ffnfusion.core.errors import BlockRecognitionError
from ffnfusion.passes.blocks import find_blocks

EXPECTED_NORM = {"dynamo-opset20": "rms_decomposed", "dynamo-opset23": "RMSNormalization",
                 "torchscript-opset18": "rms_decomposed"}


@pytest.mark.parametrize("variant", sorted(EXPECTED_NORM))
def test_layers_and_runs_on_every_exporter(tiny_variants, variant):
    block_map = find_blocks(ir.load(tiny_variants[variant]))
    assert len(block_map.layers) == TINY_CONFIG["num_hidden_layers"]
    assert [layer.attention for layer in block_map.layers] == [
        i not in TINY_DROPPED for i in range(TINY_CONFIG["num_hidden_layers"])
    ]
    assert block_map.runs == [(2, 6)]
    for layer in block_map.layers:
        ffn = layer.ffn
        assert ffn is not None and ffn.layer == layer.index
        assert (ffn.hidden, ffn.width) == (96, 160)
        assert ffn.norm.kind == EXPECTED_NORM[variant]
        assert ffn.norm.epsilon == pytest.approx(1e-6)
        assert ffn.down.shape_in_out == (160, 96)


def test_kv_cache_export_has_same_blocks(tiny_kv_cache):
    block_map = find_blocks(ir.load(tiny_kv_cache))
    assert block_map.runs == [(2, 6)]
    assert block_map.to_dict()["runs"] == [[2, 6]]


def test_json_shape(tiny_dynamo20):
    data = find_blocks(ir.load(tiny_dynamo20)).to_dict()
    assert data["blocks"][0]["layer"] == 0 and data["blocks"][0]["attention"] is True
    assert data["blocks"][3]["ffn"]["width"] == 160
    assert data["blocks"][3]["attention"] is False


def test_weights_are_the_layer_weights(tiny_llama, tiny_dynamo20):
    """The matched gate weight is layer 4's gate_proj (transposed to [in, out])."""
    block = find_blocks(ir.load(tiny_dynamo20)).ffn(4)
    expected = tiny_llama.model.layers[4].mlp.gate_proj.weight.detach().numpy().T
    assert (block.gate.numpy_in_out() == expected).all()
    gain = tiny_llama.model.layers[4].post_attention_layernorm.weight.detach().numpy()
    assert (block.norm.gain.const_value.numpy() == gain).all()


def test_ort_optimized_model_is_read_through_its_skip_norms(tiny_dynamo20, tmp_path):
    """ORT's transformer optimizer folds the residual Adds into Skip norms (as ORT GenAI's builder
    does): the blocks are found anyway, and fusing there equals fusing the exported model."""
    from onnxruntime.transformers.optimizer import optimize_model

    from ffnfusion.api import fuse_ffn
    from ffnfusion.runtime.onnxruntime import create_session, run_logits

    optimized = optimize_model(str(tiny_dynamo20), model_type="gpt2", num_heads=0, hidden_size=0,
                               opt_level=0, only_onnxruntime=False)
    ops = {node.op_type for node in optimized.model.graph.node}
    if not ops & {"SkipSimplifiedLayerNormalization", "SkipLayerNormalization"}:
        pytest.skip(f"this onnxruntime's optimizer did not fuse skip norms (ops: {sorted(ops)[:8]}...)")
    path = tmp_path / "optimized.onnx"
    optimized.save_model_to_file(str(path))
    plain = find_blocks(ir.load(tiny_dynamo20))
    found = find_blocks(ir.load(path))
    assert [(b.attention, b.ffn.width) for b in found.layers] == [(b.attention, b.ffn.width) for b in plain.layers]
    assert found.runs == plain.runs == [(2, 6)]
    ids = np.random.default_rng(0).integers(0, 128, (2, 9))
    fused_optimized = fuse_ffn(path, [[2, 3, 4, 5, 6]], output=tmp_path / "a")
    fused_plain = fuse_ffn(tiny_dynamo20, [[2, 3, 4, 5, 6]], output=tmp_path / "b")
    a, b = (run_logits(create_session(f), ids) for f in (fused_optimized, fused_plain))
    assert np.abs(a - b).max() / np.abs(b).max() < 1e-5


def _single_node_model(op_type="Conv"):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 1, 1], [1.0])
    graph = helper.make_graph([helper.make_node(op_type, ["x", "w"], ["y"])], "g", [x], [y], [w])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


def test_not_a_decoder_says_what_was_expected():
    with pytest.raises(BlockRecognitionError, match="no token embedding found: expected a Gather"):
        find_blocks(_single_node_model())


def test_embedding_without_residual_stream():
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 3])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    table = helper.make_tensor("table", TensorProto.FLOAT, [4, 2], [0.0] * 8)
    graph = helper.make_graph([helper.make_node("Gather", ["table", "input_ids"], ["y"])], "g",
                              [ids], [out], [table])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    with pytest.raises(BlockRecognitionError, match=r"found 0 residual branches.*Add\(x, branch\(x\)\)"):
        find_blocks(model)
