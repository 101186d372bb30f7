"""Encodings no exporter of ours emits but others do: SimplifiedLayerNormalization norms (ORT's
optimizer) and [out, in] weights behind a Transpose. Recognised and fused exactly."""

from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import torch
from conftest import TINY_DROPPED, rel_err

from ffnfusion.exporters import llama_surgery
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.ffn_fusion import FFNFusionPass
from ffnfusion.runtime.onnxruntime import create_session, run_logits


def _as_simplified_layer_norm(graph: ir.Graph, block) -> None:
    """Replace a decomposed RMSNorm by one SimplifiedLayerNormalization(x, gain) node."""
    norm = block.norm
    node = ir.node("SimplifiedLayerNormalization", [block.input, norm.gain],
                   {"epsilon": norm.epsilon, "axis": -1}, name=f"sln_{block.layer}")
    graph.insert_before(norm.gain_node, node)
    ir.convenience.replace_all_uses_with(norm.output, node.outputs[0])
    graph.remove(list(norm.nodes), safe=True)


def _as_transposed_weight(graph: ir.Graph, weight, matmul: ir.Node) -> None:
    """Store W as [out, in] and feed MatMul through Transpose(perm=[1, 0])."""
    stored = ir.Value(name=f"{weight.name}_out_in",
                      const_value=ir.tensor(np.ascontiguousarray(weight.value.const_value.numpy().T)))
    graph.register_initializer(stored)
    transpose = ir.node("Transpose", [stored], {"perm": [1, 0]}, name=f"{weight.name}_T")
    graph.insert_before(matmul, transpose)
    matmul.replace_input_with(1, transpose.outputs[0])


def _rewritten(path, tmp_path):
    model = ir.load(path)
    block_map = find_blocks(model)
    for index in (2, 3, 4, 5, 6):
        _as_simplified_layer_norm(model.graph, block_map.ffn(index))
    for index in (3, 5):  # mixed layouts inside one group
        block = block_map.ffn(index)
        for weight in (block.gate, block.up, block.down):
            matmul = next(use.node for use in weight.value.uses() if use.node.op_type == "MatMul")
            _as_transposed_weight(model.graph, weight, matmul)
    out = tmp_path / "rewritten.onnx"
    ir.save(model, out)
    return out


def test_simplified_norm_and_transposed_weights(tiny_dynamo20, tiny_llama, tmp_path):
    rewritten = _rewritten(tiny_dynamo20, tmp_path)
    block_map = find_blocks(ir.load(rewritten))
    assert block_map.runs == [(2, 6)]
    assert block_map.ffn(4).norm.kind == "SimplifiedLayerNormalization"
    assert block_map.ffn(3).gate.transposed and not block_map.ffn(4).gate.transposed

    ids = np.random.default_rng(4).integers(0, 128, (2, 9))
    reference = copy.deepcopy(tiny_llama)
    llama_surgery.drop_attention(reference, TINY_DROPPED)
    with torch.no_grad():
        sequential = reference(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert rel_err(run_logits(create_session(rewritten), ids), sequential) <= 1e-5

    model = ir.load(rewritten)
    FFNFusionPass([[2, 3, 4], [5, 6]])(model)
    fused_path = tmp_path / "fused.onnx"
    ir.save(model, fused_path)
    llama_surgery.parallelize_groups(reference, [[2, 3, 4], [5, 6]])
    with torch.no_grad():
        parallel = reference(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert rel_err(run_logits(create_session(fused_path), ids), parallel) <= 1e-5
    kinds = [layer.ffn.norm.kind for layer in find_blocks(model).layers]
    assert kinds[2:4] == ["SimplifiedLayerNormalization"] * 2
