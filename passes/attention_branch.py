"""The weights of a Llama-style attention branch, found by structure: ``match_attention(block)``.

``y = x + o(attn(q(n(x)), k(n(x)), v(n(x))))`` — the exporter's names are never read (the dynamo
exporter's optimizer renames initializers ``val_N``). The roles come from the data flow:

* ``o`` is the linear layer that produces the branch output;
* ``q``, ``k``, ``v`` are the linear layers reading the norm's output;
* with a fused attention op (``Attention``, ``MultiHeadAttention``), its inputs 0/1/2 are Q/K/V;
  otherwise the scores ``MatMul(Q, Kᵀ)`` feeds the Softmax (its left operand comes from ``q``, its
  right from ``k``) and ``v`` is the projection the Softmax does not depend on.

Rotary embeddings, head reshapes and KV-cache concatenations sit between the projections and the
attention product; they carry no weights and are not looked at. A *norm* there (Qwen3's and Gemma 3's
QK-norm: q and k normalised per head before RoPE) is looked for and refused: q/k/v/o alone would
describe another function.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from ffnfusion.passes import norm_matchers, op_matchers
from ffnfusion.passes.block_map import AttentionBlock

FUSED_ATTENTION_OPS = {"Attention", "MultiHeadAttention"}
# Ops that start a norm (decomposed RMSNorm's ReduceMean, or a norm op): found downstream of q or k,
# they are a QK-norm.
NORM_OPS = {"ReduceMean", "RMSNormalization", "SimplifiedLayerNormalization", "LayerNormalization",
            "SkipSimplifiedLayerNormalization"}


@dataclasses.dataclass(frozen=True)
class AttentionWeights:
    """The constant weights of one attention branch; projections as :class:`op_matchers.Weight`."""

    norm: norm_matchers.Norm
    q: op_matchers.Weight
    k: op_matchers.Weight
    v: op_matchers.Weight
    o: op_matchers.Weight
    # the values the q, k and v projections produce (bias included), in that order
    outputs: tuple[ir.Value, ir.Value, ir.Value] | None = None
    # their 1-D bias initializers (``match_attention(..., biases=True)`` only; None where unbiased)
    biases: tuple[ir.Value | None, ir.Value | None, ir.Value | None] = (None, None, None)

    def widths(self) -> tuple[int, int]:
        """``(q width, k/v width)``: heads·head_dim and kv_heads·head_dim."""
        return self.q.shape_in_out[1], self.k.shape_in_out[1]


def _upstream(value: ir.Value | None, inside: set[ir.Node]) -> set[ir.Node]:
    """The nodes of ``inside`` that ``value`` depends on."""
    seen: set[ir.Node] = set()
    stack = [value]
    while stack:
        current = stack.pop()
        node = current.producer() if current is not None else None
        if node is None or node in seen or node not in inside:
            continue
        seen.add(node)
        stack.extend(node.inputs)
    return seen


def match_attention(block: AttentionBlock, biases: bool = False) -> AttentionWeights | str:
    """The branch's norm and q/k/v/o weights, or why they could not be told apart. ``biases``: accept
    q/k/v biases (Qwen2's) and return them; otherwise they are refused (a checkpoint without bias
    tensors could not carry them)."""
    inside = set(block.nodes)
    branch_output = next(v for v in block.residual_add.inputs if v is not block.input)
    o = op_matchers.match_linear(op_matchers.skip_casts(branch_output))
    if o is None:
        return "the branch output is not a linear layer with a constant weight (o_proj)"
    if o.bias is not None:
        return "attention projections with biases are not supported"
    projections: dict[ir.Value, list[op_matchers.Linear]] = {}
    produced: dict[int, ir.Value] = {}  # id(linear) -> the value it was matched at
    for node in block.nodes:
        if node.op_type not in ("MatMul", "Gemm") or node in o.nodes:
            continue
        output = node.outputs[0]
        linear = op_matchers.match_linear(output)
        consumers = [use.node for use in node.outputs[0].uses()]
        if len(consumers) == 1 and consumers[0].op_type == "Add" and consumers[0] in inside:
            # a bias Add after the product belongs to the projection (never silently dropped)
            biased = op_matchers.match_linear(consumers[0].outputs[0])
            if biased is not None:
                linear, output = biased, consumers[0].outputs[0]
        if linear is not None and linear.input is not None:
            projections.setdefault(linear.input, []).append(linear)
            produced[id(linear)] = output
    candidates = [(source, found) for source, found in projections.items() if len(found) == 3]
    if len(candidates) != 1:
        sizes = sorted(len(found) for found in projections.values())
        return (f"expected three projections (q, k, v) reading the normed input, found groups of {sizes}"
                " (a fused qkv projection is not supported)")
    normed, linears = candidates[0]
    if not biases and any(linear.bias is not None for linear in linears):
        return "attention projections with biases are not supported"
    norm = norm_matchers.match_norm(normed, block.input)
    if norm is None:
        return "the q/k/v projections do not read a norm of the residual stream"
    owner = {node: linear for linear in linears for node in linear.nodes}

    def projection_of(value: ir.Value | None) -> op_matchers.Linear | None:
        found = {owner[n] for n in _upstream(value, inside) if n in owner}
        return found.pop() if len(found) == 1 else None

    fused = next((n for n in block.nodes if n.op_type in FUSED_ATTENTION_OPS), None)
    if fused is not None:
        q, k, v = (projection_of(fused.inputs[i] if len(fused.inputs) > i else None) for i in range(3))
    else:
        softmax = next((n for n in block.nodes if n.op_type == "Softmax"), None)
        if softmax is None:
            return "no Softmax and no fused attention op in the attention branch"
        before = _upstream(softmax.inputs[0], inside)
        v = next((linear for linear in linears if not set(linear.nodes) & before), None)
        q = k = None
        for node in before:
            if node.op_type == "MatMul" and node.inputs[0] is not None and node.inputs[1] is not None:
                left, right = projection_of(node.inputs[0]), projection_of(node.inputs[1])
                if left is not None and right is not None and left is not right:
                    q, k = left, right
                    break
    if q is None or k is None or v is None or len({id(q), id(k), id(v)}) != 3:
        return "could not tell the q, k and v projections apart from the data flow"
    projected = set(q.nodes) | set(k.nodes)
    if any(node.op_type in NORM_OPS and _upstream(node.inputs[0], inside) & projected for node in block.nodes):
        return "q and k are normalised after their projections (QK-norm), which q/k/v/o weights cannot describe"
    return AttentionWeights(norm, q.weight, k.weight, v.weight, o.weight,
                            (produced[id(q)], produced[id(k)], produced[id(v)]), (q.bias, k.bias, v.bias))
