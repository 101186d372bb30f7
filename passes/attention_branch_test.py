"""Hand-built attention branches: q/k/v/o told apart by data flow, and the shapes that are refused."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ffnfusion.passes.attention_branch import match_attention
from ffnfusion.passes.block_map import AttentionBlock

HIDDEN = 4
RNG = np.random.default_rng(0)
WEIGHTS = {name: RNG.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) for name in "qkvo"}


class Builder:
    def __init__(self):
        self.x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", "seq", HIDDEN]))
        self.graph = ir.Graph([self.x], [], nodes=[], opset_imports={"": 23})
        self.nodes: list[ir.Node] = []

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(value)
        return value

    def op(self, op: str, inputs, **attributes) -> ir.Value:
        node = ir.node(op, inputs, attributes=attributes, num_outputs=attributes.pop("num_outputs", 1))
        self.graph.append(node)
        self.nodes.append(node)
        return node.outputs[0]

    def normed(self) -> ir.Value:
        return self.op("RMSNormalization", [self.x, self.const("gain", np.ones(HIDDEN, np.float32))], axis=-1)

    def project(self, source: ir.Value, name: str, bias: bool = False) -> ir.Value:
        out = self.op("MatMul", [source, self.const(name, WEIGHTS[name])])
        return self.op("Add", [out, self.const(name + "_b", np.zeros(HIDDEN, np.float32))]) if bias else out

    def block(self, attended: ir.Value) -> AttentionBlock:
        o = self.project(attended, "o")
        add = ir.node("Add", [self.x, o])
        self.graph.append(add)
        return AttentionBlock(self.x, add.outputs[0], add, tuple(self.nodes))


def _softmax_branch(bias: bool = False, qk_norm: bool = False) -> AttentionBlock:
    b = Builder()
    n = b.normed()
    v = b.project(n, "v", bias)  # created first: order must not matter
    k = b.project(n, "k")
    q = b.project(n, "q")
    if qk_norm:  # Qwen3 / Gemma 3: an RMSNorm on q and on k before the scores
        q = b.op("RMSNormalization", [q, b.const("q_norm", np.ones(HIDDEN, np.float32))], axis=-1)
        k = b.op("RMSNormalization", [k, b.const("k_norm", np.ones(HIDDEN, np.float32))], axis=-1)
    scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 2, 1])])
    return b.block(b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v]))


def _roles(match) -> dict[str, str]:
    return {role: getattr(match, role).name for role in "qkvo"}


def test_softmax_attention_roles_come_from_the_data_flow():
    match = match_attention(_softmax_branch())
    assert not isinstance(match, str), match
    assert _roles(match) == {"q": "q", "k": "k", "v": "v", "o": "o"}
    assert match.widths() == (HIDDEN, HIDDEN) and match.norm.kind == "RMSNormalization"


def test_fused_attention_op_reads_q_k_v_by_input_position():
    b = Builder()
    n = b.normed()
    k, v, q = b.project(n, "k"), b.project(n, "v"), b.project(n, "q")
    match = match_attention(b.block(b.op("Attention", [q, k, v])))
    assert not isinstance(match, str), match
    assert _roles(match) == {"q": "q", "k": "k", "v": "v", "o": "o"}


def test_a_fused_qkv_projection_is_refused_with_the_reason():
    b = Builder()
    n = b.normed()
    qkv = b.op("MatMul", [n, b.const("qkv", np.ones((HIDDEN, 3 * HIDDEN), np.float32))])
    split = ir.node("Split", [qkv], attributes={"axis": -1, "num_outputs": 3}, num_outputs=3)
    b.graph.append(split)
    b.nodes.append(split)
    q, k, v = split.outputs
    scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 2, 1])])
    match = match_attention(b.block(b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])))
    assert isinstance(match, str) and "fused qkv" in match


def test_biased_projections_are_refused():
    assert match_attention(_softmax_branch(bias=True)) == "attention projections with biases are not supported"


def test_qk_norm_is_refused_with_the_reason():
    match = match_attention(_softmax_branch(qk_norm=True))
    assert isinstance(match, str) and "QK-norm" in match
