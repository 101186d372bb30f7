"""The real model: SmolLM2-135M-Instruct with attention dropped in layers 10-17 (slow: ~2 min)."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from ffnfusion import demo
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.plan import FusionPlan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smollm2")
    report = demo.run(str(workdir), "smollm2", list(range(10, 18)), FusionPlan.parse("10-13,14-16"), tokens=512)
    return workdir, report


def test_blocks_and_runs(smollm2_demo):
    workdir, _ = smollm2_demo
    block_map = find_blocks(ir.load(workdir / "base" / "model.onnx"))
    assert len(block_map.layers) == 30
    assert block_map.runs == [(10, 17)]
    assert {layer.ffn.width for layer in block_map.layers} == {1536}
    assert {layer.ffn.norm.epsilon for layer in block_map.layers} == {1e-5}


def test_fused_model_has_two_wide_ffns(smollm2_demo):
    workdir, report = smollm2_demo
    block_map = find_blocks(ir.load(workdir / "fused" / "model.onnx"))
    widths = [layer.ffn.width for layer in block_map.layers]
    assert widths == [1536] * 10 + [4 * 1536, 3 * 1536] + [1536] * 13
    assert report["nodes_after"] < report["nodes_before"]


def test_exact_parallel_form_and_not_a_no_op(smollm2_demo):
    _, report = smollm2_demo
    assert report["fused_vs_torch_parallel_rel_err"] <= 1e-5
    assert report["unfused_vs_torch_sequential_rel_err"] <= 1e-5
    assert report["fused_vs_unfused_rel_diff"] > 1e-2
    assert 5 < report["perplexity"]["original"] < 40  # real text through the real model
