"""float16 and bfloat16 models keep their dtype; gains are folded in float32 and cast once.

Tolerances (relative, fused group vs the parallel sum evaluated in float32 from the stored weights):
float16 <= 2e-3 and bfloat16 <= 1e-2, the rounding of one cast of the folded weights (10 and 7
mantissa bits)."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from ffnfusion.cli import main
from ffnfusion.exporters.synthetic import write_synthetic
from ffnfusion.runtime.exactness import fused_group_error

TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2}


@pytest.mark.parametrize("dtype", sorted(TOLERANCE))
def test_fused_weights_keep_dtype_and_match(dtype, tmp_path, capsys):
    source = write_synthetic("tiny", tmp_path / "src", dtype=dtype)
    fused = tmp_path / "fused" / "model.onnx"
    assert main(["fuse", str(source), "-o", str(fused), "--groups", "2-4"]) == 0, capsys.readouterr().err
    weight = ir.load(fused).graph.initializers["ffnfusion.layers.2-4.gate_proj.weight"].const_value
    assert weight.dtype == {"float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}[dtype]
    result = fused_group_error(str(source), str(fused), [2, 3, 4], tokens=16)
    assert 0 < result["rel_err"] <= TOLERANCE[dtype]


def test_bfloat16_export_is_recognised_and_fused(tiny_llama, tmp_path):
    """A bfloat16 export (ORT's CPU provider cannot run it; the weights are checked in numpy)."""
    import copy

    from ffnfusion.exporters.onnx_export import ExportOptions, export_model
    from ffnfusion.passes.blocks import find_blocks
    from ffnfusion.passes.ffn_fusion import FFNFusionPass

    path = export_model(copy.deepcopy(tiny_llama), tmp_path / "bf16", ExportOptions(dtype="bfloat16", drop_attention=[2, 3, 4]))
    model = ir.load(path)
    assert find_blocks(model).ffn(3).dtype == ir.DataType.BFLOAT16
    FFNFusionPass([[2, 3, 4]])(model)
    fused = tmp_path / "fused.onnx"
    ir.save(model, fused, external_data="fused.onnx.data")
    assert fused_group_error(str(path), str(fused), [2, 3, 4], tokens=16)["rel_err"] <= TOLERANCE["bfloat16"]
