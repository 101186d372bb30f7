"""Skip norms split into Add + norm and restored: the structure both ways, on hand-built graphs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from ffnfusion.core.errors import BlockRecognitionError
from ffnfusion.passes.skip_norms import SPLIT_PREFIX, RestoreSkipNormsPass, SplitSkipNormsPass, has_skip_norms

HIDDEN = 4


def _graph(op="SkipSimplifiedLayerNormalization", bias=False, read_mean=False):
    """``(normed, total) = SkipNorm(x, skip, γ)``; ``total`` feeds a next Add, ``normed`` is an output."""
    x = ir.val("x", ir.DataType.FLOAT, ["b", "s", HIDDEN])
    skip = ir.val("skip", ir.DataType.FLOAT, ["b", "s", HIDDEN])
    gamma = ir.Value(name="gamma", const_value=ir.tensor(np.full(HIDDEN, 2.0, np.float32), name="gamma"))
    inputs = [x, skip, gamma]
    if op == "SkipLayerNormalization":
        inputs.append(ir.Value(name="beta", const_value=ir.tensor(np.ones(HIDDEN, np.float32), name="beta")))
    if bias:
        inputs.append(ir.Value(name="bias", const_value=ir.tensor(np.ones(HIDDEN, np.float32), name="bias")))
    norm = ir.node(op, inputs, attributes={"epsilon": 1e-6}, domain="com.microsoft", num_outputs=4, name="norm")
    norm.outputs[0].name, norm.outputs[3].name = "normed", "total"
    after = ir.node("Add", [norm.outputs[3], skip], name="next")
    outputs = [norm.outputs[0], after.outputs[0], *([norm.outputs[1]] if read_mean else [])]
    graph = ir.Graph([x, skip], outputs, nodes=[norm, after], opset_imports={"": 22, "com.microsoft": 1})
    for value in inputs[2:]:
        graph.register_initializer(value)
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("op", ["SkipSimplifiedLayerNormalization", "SkipLayerNormalization"])
@pytest.mark.parametrize("bias", [False, True])
def test_split_makes_the_residual_add_explicit_and_restore_undoes_it(op, bias):
    model = _graph(op, bias)
    assert has_skip_norms(model) and SplitSkipNormsPass()(model).modified
    ops = [(n.op_type, n.name) for n in model.graph]
    plain = op.removeprefix("Skip")
    assert ops[:len(ops) - 1] == [("Add", f"{SPLIT_PREFIX}norm/add"), *([("Add", f"{SPLIT_PREFIX}norm/bias")] if bias else []),
                                  (plain, f"{SPLIT_PREFIX}norm")]
    add = model.graph.node(0)
    assert [v.name for v in add.inputs] == ["x", "skip"] and not has_skip_norms(model)
    assert model.graph.outputs[0].name == "normed" and model.graph.outputs[0].producer().op_type == plain
    assert model.graph.node(len(ops) - 1).inputs[0].producer().op_type == "Add"  # the next Add reads the sum
    assert model.graph.outputs[0].producer().attributes["epsilon"].value == pytest.approx(1e-6)

    assert RestoreSkipNormsPass()(model).modified
    restored = list(model.graph)
    assert [n.op_type for n in restored] == [op, "Add"]
    assert [v.name if v is not None else None for v in restored[0].inputs] == \
        ["x", "skip", "gamma", *(["beta"] if op == "SkipLayerNormalization" else []), *(["bias"] if bias else [])]
    assert restored[1].inputs[0] is restored[0].outputs[3] and model.graph.outputs[0] is restored[0].outputs[0]


def test_restore_leaves_a_norm_whose_add_is_gone_plain():
    model = _graph()
    SplitSkipNormsPass()(model)
    add = model.graph.node(0)
    ir.convenience.replace_all_uses_with(add.outputs[0], add.inputs[0])  # as when attention is dropped
    model.graph.remove(add, safe=True)
    assert not RestoreSkipNormsPass()(model).modified
    assert [n.op_type for n in model.graph] == ["SimplifiedLayerNormalization", "Add"]


def test_a_skip_norm_whose_statistics_are_read_is_refused():
    with pytest.raises(BlockRecognitionError, match="output 1 of SkipSimplifiedLayerNormalization is read"):
        SplitSkipNormsPass()(_graph(read_mean=True))
