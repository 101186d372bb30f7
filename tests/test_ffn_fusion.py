"""FFNFusionPass: exact parallel form, real rewrite, clean graph, errors for bad groups."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from conftest import TINY_DROPPED, rel_err

from ffnfusion.exporters import llama_surgery
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.ffn_fusion import FFNFusionPass, fuse_ffn_groups
from ffnfusion.passes.plan import FusionPlan, InvalidPlanError
from ffnfusion.runtime.onnxruntime import create_session, run_logits

GROUPS = [[2, 3, 4], [5, 6]]


def _reference_logits(tiny_llama, input_ids, groups=None):
    model = copy.deepcopy(tiny_llama)
    llama_surgery.drop_attention(model, TINY_DROPPED)
    if groups:
        llama_surgery.parallelize_groups(model, groups)
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(input_ids)).logits.numpy()


def _fused_copy(path, groups, tmp_path):
    model = ir.load(path)
    FFNFusionPass(groups)(model)
    out = tmp_path / "fused.onnx"
    ir.save(model, out)
    return out


@pytest.mark.parametrize("variant", ["dynamo-opset20", "dynamo-opset23", "torchscript-opset18"])
def test_fused_equals_parallel_form(tiny_variants, tiny_llama, variant, tmp_path):
    # ORT's RotaryEmbedding (opset 23) fails for batch > 1, so that variant runs one sequence.
    batch = 1 if variant == "dynamo-opset23" else 2
    input_ids = np.random.default_rng(1).integers(0, 128, (batch, 11))
    fused_path = _fused_copy(tiny_variants[variant], GROUPS, tmp_path)
    onnx.checker.check_model(str(fused_path), full_check=True)

    fused = run_logits(create_session(fused_path), input_ids)
    unfused = run_logits(create_session(tiny_variants[variant]), input_ids)
    assert rel_err(fused, _reference_logits(tiny_llama, input_ids, GROUPS)) <= 1e-5
    assert rel_err(unfused, _reference_logits(tiny_llama, input_ids)) <= 1e-5
    assert rel_err(fused, unfused) > 1e-3  # the parallel form is not the sequential one


@pytest.mark.parametrize("variant", ["dynamo-opset20", "torchscript-opset18"])
def test_group_headed_by_a_layer_with_attention(tiny_variants, tiny_llama, variant, tmp_path):
    # FFN 1 (after layer 1's attention) and the attention-free 2-3 read the stream after attention 1.
    input_ids = np.random.default_rng(2).integers(0, 128, (2, 11))
    fused_path = _fused_copy(tiny_variants[variant], [[1, 2, 3]], tmp_path)
    block_map = find_blocks(ir.load(fused_path))
    assert [(layer.index, layer.attention, list(layer.span)) for layer in block_map.layers][1:3] == \
        [(1, True, [1, 2, 3]), (4, False, [4])]
    fused = run_logits(create_session(fused_path), input_ids)
    assert rel_err(fused, _reference_logits(tiny_llama, input_ids, [[1, 2, 3]])) <= 1e-5


def test_group_becomes_one_wide_ffn(tiny_dynamo20, tmp_path):
    model = ir.from_proto(onnx.load(str(_fused_copy(tiny_dynamo20, GROUPS, tmp_path))))
    initializers = model.graph.initializers
    assert initializers["ffnfusion.layers.2-4.gate_proj.weight"].shape == ir.Shape([96, 480])
    assert initializers["ffnfusion.layers.2-4.up_proj.weight"].shape == ir.Shape([96, 480])
    assert initializers["ffnfusion.layers.2-4.down_proj.weight"].shape == ir.Shape([480, 96])
    assert initializers["ffnfusion.layers.5-6.down_proj.weight"].shape == ir.Shape([320, 96])
    block_map = find_blocks(model)
    # 8 layers -> 5 positions on the residual stream; the wide FFNs keep the original numbering.
    assert [layer.ffn.width for layer in block_map.layers] == [160, 160, 480, 320, 160]
    assert [list(layer.span) for layer in block_map.layers] == [[0], [1], [2, 3, 4], [5, 6], [7]]
    assert block_map.runs == [(2, 6)] and block_map.layer(7).attention
    assert model.metadata_props["ffnfusion.fused_groups"] == "2-4,5-6"


def test_fusing_fused_groups_again_is_exact(tiny_dynamo20, tiny_llama, tmp_path):
    """Hierarchical fusion: 2-4 and 5-6, then 2-6, equals fusing 2-6 at once."""
    model = ir.load(_fused_copy(tiny_dynamo20, GROUPS, tmp_path))
    with pytest.raises(InvalidPlanError, match="group 3-6 splits the FFN already fused from layers 2-4"):
        FFNFusionPass([[3, 4, 5, 6]])(model)
    FFNFusionPass([[2, 3, 4, 5, 6]])(model)
    assert model.metadata_props["ffnfusion.fused_groups"] == "2-6"
    assert find_blocks(model).layer(4).ffn.width == 800
    path = tmp_path / "twice.onnx"
    ir.save(model, path)
    ids = np.random.default_rng(3).integers(0, 128, (2, 7))
    fused = run_logits(create_session(path), ids)
    assert rel_err(fused, _reference_logits(tiny_llama, ids, [[2, 3, 4, 5, 6]])) <= 1e-5


def test_old_weights_and_nodes_are_gone(tiny_dynamo20, tmp_path):
    before = ir.load(tiny_dynamo20)
    old_gates = {find_blocks(before).ffn(i).gate.name for i in range(2, 7)}
    after = ir.load(_fused_copy(tiny_dynamo20, GROUPS, tmp_path))
    assert not old_gates & set(after.graph.initializers)
    assert len(after.graph) < len(before.graph)
    matmuls = lambda m: sum(node.op_type == "MatMul" for node in m.graph)  # noqa: E731
    assert matmuls(before) - matmuls(after) == 3 * (len(GROUPS[0]) - 1 + len(GROUPS[1]) - 1)


def test_plain_function_returns_the_model(tiny_dynamo20):
    model = ir.load(tiny_dynamo20)
    assert fuse_ffn_groups(model, FusionPlan.parse("2-3")) is model
    assert find_blocks(model).layers[2].ffn.width == 320


def test_input_model_is_not_modified_on_disk(tiny_dynamo20, tmp_path):
    before = tiny_dynamo20.read_bytes()
    _fused_copy(tiny_dynamo20, GROUPS, tmp_path)
    assert tiny_dynamo20.read_bytes() == before


@pytest.mark.parametrize("groups, message", [
    ([[2, 3], [3, 4]], "groups 2-3 and 3-4 overlap at layer 3"),
    ([[0, 1]], r"group 0-1: layer 1 has attention, between FFNs 0 and 1; a group is one FFN and attention-free "
               r"layers after it \(attention-free runs: 2-6\)"),
    ([[6, 7]], "group 6-7: layer 7 has attention, between FFNs 6 and 7"),
    ([[8, 9]], "group 8-9 names layer 8, but the model has layers 0-7"),
    ([[3]], "group 3 has one layer"),
    ([[2, 4]], "not a range of consecutive layers"),
    ([], "the plan has no groups"),
])
def test_bad_groups_are_refused(tiny_dynamo20, groups, message):
    model = ir.load(tiny_dynamo20)
    with pytest.raises(InvalidPlanError, match=message):
        FFNFusionPass(groups)(model)


def test_mismatched_epsilons_are_refused(tiny_dynamo20):
    model = ir.load(tiny_dynamo20)
    block = find_blocks(model).ffn(3)
    add = next(node for node in block.norm.nodes if node.op_type == "Add")
    eps_input = next(v for v in add.inputs if v.producer() is None or v.producer().op_type == "Constant")
    new_eps = ir.Value(name="other_eps", const_value=ir.tensor(np.array(1e-5, np.float32)))
    model.graph.register_initializer(new_eps)
    add.replace_input_with(list(add.inputs).index(eps_input), new_eps)
    with pytest.raises(InvalidPlanError, match="layer 3 has norm epsilon 1e-05, layer 2 has 1e-06; a fused group needs one norm epsilon"):
        FFNFusionPass([[2, 3]])(model)


@pytest.mark.parametrize(("width", "padded"), [(12288, 12304), (10752, 10768), (480, 496), (496, 496), (1550, 1552)])
def test_cpu_padding_makes_an_odd_multiple_of_16(width, padded):
    from ffnfusion.passes.ffn_fusion import cpu_padding

    assert width + cpu_padding(width) == padded
    assert (padded // 16) % 2 == 1


def test_cpu_target_pads_with_zeros_and_keeps_outputs(tiny_dynamo20, tmp_path):
    input_ids = np.random.default_rng(5).integers(0, 128, (2, 9))
    paths = {}
    for target in ("gpu", "cpu"):
        model = ir.load(tiny_dynamo20)
        FFNFusionPass(GROUPS, target=target)(model)
        paths[target] = tmp_path / f"{target}.onnx"
        ir.save(model, paths[target])
    padded = ir.load(paths["cpu"]).graph.initializers
    # 3 x 160 = 480 columns -> 496; 2 x 160 = 320 -> 336
    assert padded["ffnfusion.layers.2-4.gate_proj.weight"].shape == ir.Shape([96, 496])
    assert padded["ffnfusion.layers.5-6.down_proj.weight"].shape == ir.Shape([336, 96])
    assert not padded["ffnfusion.layers.2-4.down_proj.weight"].const_value.numpy()[480:].any()
    cpu = run_logits(create_session(paths["cpu"]), input_ids)
    gpu = run_logits(create_session(paths["gpu"]), input_ids)
    assert rel_err(cpu, gpu) <= 1e-6
    assert find_blocks(ir.load(paths["cpu"])).layer(2).ffn.width == 496  # still one wide FFN


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="target must be one of gpu, cpu"):
        FFNFusionPass(GROUPS, target="tpu")
