"""AttentionRemovalPass: the graph rewrite equals exporting with attention skipped."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from conftest import prefill_then_decode, rel_err

from ffnfusion.exporters import llama_surgery
from ffnfusion.exporters.onnx_export import ExportOptions, export_model
from ffnfusion.passes.attention_removal import AttentionRemovalPass, remove_attention
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.plan import InvalidPlanError
from ffnfusion.runtime.onnxruntime import create_session, run_logits


@pytest.fixture(scope="module")
def full_attention(tmp_path_factory, tiny_llama, tiny_full):
    """The tiny model exported with every layer's attention, with and without a KV cache."""
    cached = export_model(copy.deepcopy(tiny_llama), tmp_path_factory.mktemp("full-kv"), ExportOptions(kv_cache=True))
    return tiny_llama, tiny_full, cached


def _torch_without_attention(model, layers, input_ids):
    reference = copy.deepcopy(model)
    llama_surgery.drop_attention(reference, layers)
    with torch.no_grad():
        return reference(input_ids=torch.from_numpy(input_ids)).logits.numpy()


def test_matches_torch_with_attention_skipped(full_attention, tmp_path):
    model, plain, _ = full_attention
    onnx_model = ir.load(plain)
    result = remove_attention(onnx_model, [2, 3, 5])
    assert result.removed_inputs == [] and result.removed_outputs == []
    block_map = find_blocks(onnx_model)
    assert [layer.attention for layer in block_map.layers] == [i not in (2, 3, 5) for i in range(8)]
    assert block_map.runs == [(2, 3), (5, 5)]
    path = tmp_path / "dropped.onnx"
    ir.save(onnx_model, path)
    onnx.checker.check_model(str(path), full_check=True)
    ids = np.random.default_rng(5).integers(0, 128, (2, 10))
    assert rel_err(run_logits(create_session(path), ids), _torch_without_attention(model, [2, 3, 5], ids)) <= 1e-4
    assert sum(node.op_type == "Softmax" for node in onnx_model.graph) == 5


def test_kv_cache_io_removed_and_decode_matches(full_attention, tmp_path):
    model, _, cached = full_attention
    onnx_model = ir.load(cached)
    result = remove_attention(onnx_model, [3, 4])
    assert result.removed_outputs == ["present.3.key", "present.3.value", "present.4.key", "present.4.value"]
    assert result.removed_inputs == ["past_key_values.3.key", "past_key_values.3.value",
                                     "past_key_values.4.key", "past_key_values.4.value"]
    path = tmp_path / "dropped.onnx"
    ir.save(onnx_model, path)
    session = create_session(path)
    past_names = [i.name for i in session.get_inputs()][3:]
    assert len(past_names) == 2 * 6 and not any(".3." in n or ".4." in n for n in past_names)

    ids = np.random.default_rng(6).integers(0, 128, (2, 8))
    first, second = prefill_then_decode(session, ids, 5)
    expected = _torch_without_attention(model, [3, 4], ids)
    assert rel_err(first[0], expected[:, :5]) <= 1e-4
    assert rel_err(second[0], expected[:, 5:]) <= 1e-4


def test_layer_zero_cache_is_removed_although_the_mask_reads_its_shape(full_attention, tmp_path):
    model, _, cached = full_attention
    onnx_model = ir.load(cached)
    result = remove_attention(onnx_model, [0, 1])
    assert result.kept_inputs == []
    assert len(result.removed_inputs) == len(result.removed_outputs) == 4
    path = tmp_path / "dropped.onnx"
    ir.save(onnx_model, path)
    session = create_session(path)
    ids = np.random.default_rng(7).integers(0, 128, (1, 6))
    first, second = prefill_then_decode(session, ids, 4)
    expected = _torch_without_attention(model, [0, 1], ids)
    assert rel_err(np.concatenate([first[0], second[0]], 1), expected) <= 1e-4


def test_layer_without_attention_is_refused(tiny_dynamo20):
    with pytest.raises(InvalidPlanError, match="layer 3 has no attention to remove"):
        AttentionRemovalPass([3])(ir.load(tiny_dynamo20))
    with pytest.raises(Exception, match="layer 9 does not exist"):
        AttentionRemovalPass([9])(ir.load(tiny_dynamo20))
