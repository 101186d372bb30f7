"""Small constant arithmetic is folded; anything reading a graph input, or large, is left alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ffnfusion.passes.constant_folding import MAX_ELEMENTS, FoldSmallConstantsPass


def test_gemma_style_gain_is_folded_and_big_or_variable_math_is_not():
    x = ir.val("x", ir.DataType.FLOAT, ["n", 4])
    w = ir.Value(name="w", const_value=ir.tensor(np.arange(4, dtype=np.float32), name="w"))
    big = ir.Value(name="big", const_value=ir.tensor(np.ones(MAX_ELEMENTS + 1, np.float32), name="big"))
    one = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(1.0, np.float32))})
    gain = ir.node("Add", [one.outputs[0], w], name="one_plus_w")
    scaled = ir.node("Mul", [x, gain.outputs[0]], name="scaled")
    doubled = ir.node("Add", [big, big], name="doubled")
    graph = ir.Graph([x], [scaled.outputs[0], doubled.outputs[0]], nodes=[one, gain, scaled, doubled],
                     opset_imports={"": 17})
    graph.register_initializer(w)
    graph.register_initializer(big)
    assert FoldSmallConstantsPass()(ir.Model(graph, ir_version=10)).modified
    assert [n.name for n in graph if n.op_type != "Constant"] == ["scaled", "doubled"]
    folded = graph.node("scaled").inputs[1]
    np.testing.assert_array_equal(folded.const_value.numpy(), [1, 2, 3, 4])
    assert folded.const_value.dtype == ir.DataType.FLOAT
