"""Olive's GraphSurgeries pass runs ffnfusion's FuseFFN and ParallelizeBlocks surgeons by name."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from ffnfusion.passes.blocks import find_blocks
from ffnfusion.runtime.onnxruntime import create_session, run_logits

olive = pytest.importorskip("olive", reason="olive-ai is not installed (pip install ffnfusion[olive])")


def test_graph_surgeries_pass_runs_fuse_ffn(tiny_dynamo20, tmp_path):
    from olive.model import ONNXModelHandler
    from olive.passes.olive_pass import create_pass_from_dict
    from olive.passes.onnx.graph_surgeries import GraphSurgeries, Surgeon

    import ffnfusion.olive  # noqa: F401  (registers the surgeon)

    assert "fuseffn" in Surgeon.registry
    config = {"surgeries": [{"surgeon": "FuseFFN", "groups": "2-4,5-6"}]}
    surgery = create_pass_from_dict(GraphSurgeries, config, disable_search=True)
    output = surgery.run(ONNXModelHandler(str(tiny_dynamo20)), str(tmp_path / "olive_out"))
    block_map = find_blocks(ir.load(output.model_path))
    assert [layer.ffn.width for layer in block_map.layers] == [160, 160, 480, 320, 160]
    ids = np.random.default_rng(14).integers(0, 128, (1, 6))
    assert run_logits(create_session(output.model_path), ids).shape == (1, 6, 128)


def test_plan_file_and_bad_arguments(tiny_dynamo20, tmp_path):
    from ffnfusion.olive import FuseFFN

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"groups": [[2, 3]]}))
    model = FuseFFN(plan=str(plan)).call_ir(ir.load(tiny_dynamo20))
    assert find_blocks(model).layers[2].ffn.width == 320
    with pytest.raises(ValueError, match="exactly one of 'groups'"):
        FuseFFN()


def test_parallelize_blocks_surgeon(tiny_full, tmp_path):
    from olive.model import ONNXModelHandler
    from olive.passes.olive_pass import create_pass_from_dict
    from olive.passes.onnx.graph_surgeries import GraphSurgeries

    import ffnfusion.olive  # noqa: F401  (registers the surgeons)

    config = {"surgeries": [{"surgeon": "ParallelizeBlocks", "windows": "1-3"}]}
    surgery = create_pass_from_dict(GraphSurgeries, config, disable_search=True)
    output = surgery.run(ONNXModelHandler(str(tiny_full)), str(tmp_path / "olive_out"))
    block_map = find_blocks(ir.load(output.model_path))
    assert [(layer.index, layer.last) for layer in block_map.layers if layer.window] == [(1, 3)]
    assert block_map.sequential_steps == 16 - 4
