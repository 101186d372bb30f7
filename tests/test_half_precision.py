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
    source = write_synthetic("tiny", tmp_path / "src", dtype=dtype, log=lambda *_: None)
    fused = tmp_path / "fused" / "model.onnx"
    assert main(["fuse", str(source), "-o", str(fused), "--groups", "2-4"]) == 0, capsys.readouterr().err
    weight = ir.load(fused).graph.initializers["ffnfusion.layers.2-4.gate_proj.weight"].const_value
    assert weight.dtype == {"float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}[dtype]
    result = fused_group_error(str(source), str(fused), [2, 3, 4], tokens=16)
    assert 0 < result["rel_err"] <= TOLERANCE[dtype]
