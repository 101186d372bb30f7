"""Older exports: the legacy TorchScript exporter at opset 17 (optimum's path) writes GELU out in
elementwise ops (no Gelu op before opset 20) and keeps parameter arithmetic (Gemma's 1 + w) in the
graph; GPT-NeoX's default layers are parallel-residual. Recognised by the math, fused exactly."""

from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import pytest
import torch
from conftest import rel_err

from ffnfusion.api import fuse_ffn
from ffnfusion.core.errors import InvalidPlanError
from ffnfusion.exporters import llama_surgery
from ffnfusion.exporters.onnx_export import ExportOptions, export_model
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.runtime.model_rewrite import remove_attention_file
from ffnfusion.runtime.onnxruntime import create_session, run_logits

IDS = np.random.default_rng(4).integers(0, 128, (2, 9))
LEGACY_17 = dict(opset=17, dynamo=False, drop_attention=[2, 3, 4])


def _logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(IDS)).logits.numpy()


@pytest.fixture(scope="module")
def gemma_17(tmp_path_factory):
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(1)
    model = GemmaForCausalLM(GemmaConfig(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=6,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                         max_position_embeddings=64)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(-0.5, 0.5)
    return model, export_model(copy.deepcopy(model), tmp_path_factory.mktemp("gemma17"), ExportOptions(**LEGACY_17))


@pytest.fixture(scope="module")
def neox_17(tmp_path_factory):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(2)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=6,
                                             num_attention_heads=4, max_position_embeddings=64)).eval()
    assert model.config.use_parallel_residual and model.config.hidden_act == "gelu"
    return model, export_model(copy.deepcopy(model), tmp_path_factory.mktemp("neox17"), ExportOptions(**LEGACY_17))


def test_geglu_written_out_at_opset_17_fuses_exactly(gemma_17, tmp_path):
    model, path = gemma_17
    ops = {node.op_type for node in ir.load(path).graph}
    assert "Gelu" not in ops and {"Tanh", "Pow"} <= ops  # GELU(tanh) as the exporter wrote it
    block_map = find_blocks(ir.load(path))
    assert block_map.runs == [(2, 4)] and {layer.ffn.activation for layer in block_map.layers} == {"gelu_tanh"}
    fused = fuse_ffn(path, [[2, 3, 4]], output=tmp_path / "fused")
    assert "Gelu" not in {node.op_type for node in ir.load(fused).graph}  # still opset 17: written out again
    reference = copy.deepcopy(model)
    llama_surgery.drop_attention(reference, [2, 3, 4])
    llama_surgery.parallelize_groups(reference, [[2, 3, 4]])
    assert rel_err(run_logits(create_session(fused), IDS), _logits(reference)) < 1e-5


def test_reading_changes_nothing_and_every_entry_point_writes_the_same_model(gemma_17, tmp_path):
    """Gemma's ``1 + w`` gains are folded for the walk: find_blocks does it on a clone, and the pass,
    fuse_ffn on a ModelProto, Olive and the CLI all write one and the same fused model."""
    from entry_points import fused_by_every_entry_point

    _, path = gemma_17  # exported with attention dropped in 2-4
    model = ir.load(path)
    before = ir.serde.serialize_model(model).SerializeToString(deterministic=True)
    assert [layer.attention for layer in find_blocks(model).layers] == [True, True, False, False, False, True]
    assert ir.serde.serialize_model(model).SerializeToString(deterministic=True) == before
    results = fused_by_every_entry_point(path, "2-4", tmp_path)
    assert len(results) >= 3 and len(set(results.values())) == 1, {k: len(v) for k, v in results.items()}


def test_parallel_residual_layers_are_recognised_dropped_and_fused(neox_17, tmp_path):
    model, path = neox_17
    block_map = find_blocks(ir.load(path))
    assert [(layer.index, layer.attention, layer.parallel) for layer in block_map.layers] == \
        [(0, True, True), (1, True, True), (2, False, False), (3, False, False), (4, False, False), (5, True, True)]
    assert {layer.ffn.activation for layer in block_map.layers} == {"gelu"}  # erf GELU, written out
    with pytest.raises(InvalidPlanError, match="layer 1, a parallel-residual layer"):
        fuse_ffn(path, [[1, 2]], output=tmp_path / "refused")

    # once its attention is dropped (in the graph) a parallel layer is an ordinary FFN layer
    remove_attention_file(path, tmp_path / "dropped", [1])
    reference = copy.deepcopy(model)
    llama_surgery.drop_attention(reference, [1, 2, 3, 4])
    assert rel_err(run_logits(create_session(tmp_path / "dropped" / "model.onnx"), IDS), _logits(reference)) < 1e-5
    assert find_blocks(ir.load(tmp_path / "dropped" / "model.onnx")).runs == [(1, 4)]
    fused = fuse_ffn(tmp_path / "dropped", [[1, 2, 3, 4]], output=tmp_path / "fused")
    llama_surgery.parallelize_groups(reference, [[1, 2, 3, 4]])
    assert rel_err(run_logits(create_session(fused), IDS), _logits(reference)) < 1e-5


def test_layernorm_written_out_below_opset_17_fuses_exactly(tmp_path):
    """At opset 14 there is no LayerNormalization op either: mean, centring, variance, Sqrt, Div,
    then the gain and bias, recognised by structure and fused (the bias folded into the projections)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(3)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=6,
                                             num_attention_heads=4, max_position_embeddings=64)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.uniform_(0.5, 1.5) if name.endswith("weight") else param.uniform_(-0.2, 0.2)
    path = export_model(copy.deepcopy(model), tmp_path / "neox14", ExportOptions(**{**LEGACY_17, "opset": 14}))
    assert "LayerNormalization" not in {node.op_type for node in ir.load(path).graph}
    block_map = find_blocks(ir.load(path))
    assert {layer.ffn.norm.kind for layer in block_map.layers} == {"layernorm_decomposed"}
    assert block_map.runs == [(2, 4)]
    fused = fuse_ffn(path, [[2, 3, 4]], output=tmp_path / "fused")
    reference = copy.deepcopy(model)
    llama_surgery.drop_attention(reference, [2, 3, 4])
    llama_surgery.parallelize_groups(reference, [[2, 3, 4]])
    assert rel_err(run_logits(create_session(fused), IDS), _logits(reference)) < 1e-5
