"""Hand-built attention cores (decomposed MatMul/Softmax and ONNX's Attention op): k of them as one
core with all their heads equals each alone (onnx's reference evaluator), and what keeps them apart."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx.reference import ReferenceEvaluator

from ffnfusion.passes.attention_cores import match_core, merge_cores, mergeable
from ffnfusion.passes.block_map import AttentionBlock

BATCH, TOKENS, SIZE = 2, 5, 4
HEADS = (3, 2)  # the two members' query heads
RNG = np.random.default_rng(0)


class Cores:
    """Two members' cores on their own Q/K/V inputs, one shared additive mask ``[batch, 1, q, k]``."""

    def __init__(self, opset: int = 20):
        self.inputs: list[ir.Value] = []
        self.graph = ir.Graph([], [], nodes=[], opset_imports={"": opset})
        self.mask = self.input("mask", [BATCH, 1, TOKENS, TOKENS])
        self.blocks: list[AttentionBlock] = []

    def input(self, name: str, shape: list[int] | None) -> ir.Value:
        value = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT),
                         shape=ir.Shape(shape) if shape is not None else None)
        self.graph.inputs.append(value)
        return value

    def op(self, op: str, inputs, nodes: list, **attributes) -> ir.Value:
        node = ir.node(op, inputs, attributes=attributes)
        self.graph.append(node)
        nodes.append(node)
        return node.outputs[0]

    def decomposed(self, j: int, heads: int, bias: ir.Value | None = None, softcap: float | None = None) -> None:
        """``MatMul(Q, Kᵀ) + mask (+ bias)``, an optional softcap, Softmax, its NaN guard, ``MatMul(·, V)``."""
        nodes: list[ir.Node] = []
        q = self.input(f"q{j}", [BATCH, heads, TOKENS, SIZE])
        kt = self.input(f"kt{j}", [BATCH, heads, SIZE, TOKENS])
        v = self.input(f"v{j}", [BATCH, heads, TOKENS, SIZE])
        scores = self.op("MatMul", [q, kt], nodes)
        if softcap is not None:
            cap = ir.Value(name=f"cap{j}", const_value=ir.tensor(np.array(softcap, np.float32), name=f"cap{j}"))
            self.graph.register_initializer(cap)
            scores = self.op("Mul", [self.op("Tanh", [self.op("Div", [scores, cap], nodes)], nodes), cap], nodes)
        scores = self.op("Add", [scores, self.mask], nodes)
        if bias is not None:
            scores = self.op("Add", [scores, bias], nodes)
        weights = self.op("Softmax", [scores], nodes, axis=-1)
        zero = ir.Value(name=f"zero{j}", const_value=ir.tensor(np.array(0, np.float32), name=f"zero{j}"))
        self.graph.register_initializer(zero)
        weights = self.op("Where", [self.op("IsNaN", [weights], nodes), zero, weights], nodes)
        self._close(j, self.op("MatMul", [weights, v], nodes), nodes)

    def attention_op(self, j: int, heads: int, kv_heads: int) -> None:
        nodes: list[ir.Node] = []
        q = self.input(f"q{j}", [BATCH, heads, TOKENS, SIZE])
        k = self.input(f"k{j}", [BATCH, kv_heads, TOKENS, SIZE])
        v = self.input(f"v{j}", [BATCH, kv_heads, TOKENS, SIZE])
        self._close(j, self.op("Attention", [q, k, v, self.mask], nodes, scale=0.5), nodes)

    def _close(self, j: int, out: ir.Value, nodes: list[ir.Node]) -> None:
        joined = self.op("Identity", [out], nodes)  # stands for the heads' join and o_proj
        joined.name = f"out{j}"
        self.graph.outputs.append(joined)
        self.blocks.append(AttentionBlock(self.graph.inputs[-1], joined, nodes[-1], tuple(nodes[:-1])))

    def feeds(self) -> dict[str, np.ndarray]:
        mask = np.triu(np.full((TOKENS, TOKENS), -np.inf, np.float32), 1)
        mask[0] = -np.inf  # a fully masked row: the NaN guard's case
        feeds = {"mask": np.broadcast_to(mask, (BATCH, 1, TOKENS, TOKENS)).copy()}
        for value in self.graph.inputs[1:]:
            feeds[value.name] = RNG.standard_normal([int(d) for d in value.shape]).astype(np.float32)
        return feeds

    def run(self, tmp_path, feeds: dict) -> list[np.ndarray]:
        path = tmp_path / f"cores{len(list(tmp_path.iterdir()))}.onnx"
        ir.save(ir.Model(self.graph, ir_version=10), path)
        return ReferenceEvaluator(str(path)).run(None, feeds)


def _merged_equals_apart(cores: Cores, tmp_path) -> None:
    feeds = cores.feeds()
    apart = cores.run(tmp_path, feeds)
    matched = [match_core(block) for block in cores.blocks]
    assert not any(isinstance(core, str) for core in matched), matched
    assert mergeable(matched) is None  # type: ignore[arg-type]
    cores.graph.extend(merge_cores(cores.graph, "merged", matched))  # type: ignore[arg-type]
    cores.graph.sort()
    merged_ops = [n.op_type for n in cores.graph if n.name and n.name.startswith("merged/")]
    assert merged_ops.count("Split") == 1 and merged_ops.count("Concat") == 3
    together = cores.run(tmp_path, feeds)
    for a, b in zip(apart, together):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the fully masked row, before its guard
def test_decomposed_cores_with_a_softcap_merge_exactly(tmp_path):
    cores = Cores()
    for j, heads in enumerate(HEADS):
        cores.decomposed(j, heads, softcap=5.0)
    _merged_equals_apart(cores, tmp_path)


def test_attention_ops_with_grouped_kv_heads_merge_exactly(tmp_path):
    """3 query heads over 1 KV head and 6 over 2: merged, 9 over 3, each group on its own KV head."""
    cores = Cores(opset=23)
    cores.attention_op(0, 3, 1)
    cores.attention_op(1, 6, 2)
    _merged_equals_apart(cores, tmp_path)


@pytest.mark.parametrize("case, reason", [
    ("head bias", "varies by head"),
    ("other mask", "different masks or constants"),
    ("other softcap", "different masks or constants"),
    ("gqa ratio", "group their query heads"),
    ("two softmaxes", "2 Softmax nodes"),
])
def test_what_keeps_cores_apart(case, reason):
    cores = Cores(opset=23 if case == "gqa ratio" else 20)
    if case == "gqa ratio":
        cores.attention_op(0, 3, 1)
        cores.attention_op(1, 4, 2)
    elif case == "head bias":  # ALiBi-like: one bias per head
        cores.decomposed(0, 2, bias=cores.input("alibi", [1, 2, TOKENS, TOKENS]))
    elif case == "two softmaxes":
        cores.decomposed(0, 2)
        first = cores.blocks.pop()
        cores.decomposed(1, 2)
        cores.blocks[-1] = AttentionBlock(first.input, first.output, first.residual_add,
                                          first.nodes + cores.blocks[-1].nodes)
    else:
        cores.decomposed(0, 2, softcap=5.0 if case == "other softcap" else None)
        if case == "other mask":
            cores.mask = cores.input("sliding", [BATCH, 1, TOKENS, TOKENS])
        cores.decomposed(1, 2, softcap=3.0 if case == "other softcap" else None)
    matched = [match_core(block) for block in cores.blocks]
    found = next((core for core in matched if isinstance(core, str)), None)
    found = found or mergeable(matched)  # type: ignore[arg-type]
    assert found is not None and reason in found, found
