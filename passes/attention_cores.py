"""A block's attention core, and several cores as one with all their heads: ``match_core``,
``merge_cores``.

The *core* computes ``softmax(Q·Kᵀ·scale + mask)·V`` from a block's 4-D ``Q``, ``K``, ``V``
(``[batch, heads, tokens, head size]``): after the head reshapes, RoPE, the KV cache and the GQA
expansion, before the heads are joined for the output projection. Two encodings are read:

* ONNX's ``Attention`` op (the opset-23 export): the core is that one node, its inputs 0-2 ``Q``,
  ``K``, ``V`` (K and V with the KV heads: the op groups the query heads itself), input 3 the mask;
* decomposed (the opset-20 export of torch's SDPA): ``MatMul(Q', K'ᵀ)``, elementwise ops (the mask's
  Add, a softcap's Tanh), ``Softmax`` over the keys, NaN guards, ``MatMul(·, V)``; ``Q'`` and
  ``K'ᵀ`` are the scores MatMul's operands (the scale is applied to them before, per member).

Every op of a core acts on each head alone — batched MatMuls, elementwise ops on tensors that do not
vary by head, a softmax over the keys — so k cores with the same ops and the same other inputs are
one core on their ``Q``, ``K``, ``V`` concatenated along the head axis, whose output, split back
along that axis, is each core's output:

    core(Q₁ ⧺ … ⧺ Q_k, K₁ ⧺ … ⧺ K_k, V₁ ⧺ … ⧺ V_k) = core(Q₁, K₁, V₁) ⧺ … ⧺ core(Q_k, K_k, V_k)

(ONNX's ``Attention`` maps query head ``h`` to KV head ``h // (q heads / kv heads)``: the same ratio
in every member keeps member ``j``'s query heads on member ``j``'s KV heads.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from ffnfusion.passes.attention_branch import FUSED_ATTENTION_OPS
from ffnfusion.passes.block_map import AttentionBlock
from ffnfusion.passes.ffn_emission import Emitter

# Ops that act on each head alone when their other inputs do not vary by head (Softmax: over the keys).
HEADWISE_OPS = {"Add", "Sub", "Mul", "Div", "Where", "IsNaN", "IsInf", "Not", "And", "Or", "Equal", "Less",
                "Greater", "Cast", "Exp", "Neg", "Max", "Min", "Tanh", "Identity", "Softmax"}
HEAD_COUNT_ATTRIBUTES = ("q_num_heads", "kv_num_heads")  # 3-D inputs only; 4-D carry them in their shapes


@dataclasses.dataclass(frozen=True)
class AttentionCore:
    """One block's core: its nodes in graph order, its 4-D inputs and output, its head counts."""

    nodes: tuple[ir.Node, ...]
    q: ir.Value
    k: ir.Value  # K for the Attention op, K'ᵀ ([batch, heads, head size, keys]) for a decomposed core
    v: ir.Value
    output: ir.Value
    heads: int
    kv_heads: int


def match_core(block: AttentionBlock) -> AttentionCore | str:
    """The core of ``block``'s attention, or why it cannot be read as one."""
    ops = [n for n in block.nodes if n.op_type in FUSED_ATTENTION_OPS or n.op_type == "GroupQueryAttention"]
    if ops:
        return _attention_op(ops)
    return _decomposed(block)


def mergeable(cores: Sequence[AttentionCore]) -> str | None:
    """Why ``cores`` cannot run as one, if they cannot: the same ops on the same other inputs, one head
    size, one grouping of query heads over KV heads."""
    first = cores[0]
    for core in cores[1:]:
        if reason := _same_wiring(first, core):
            return reason
    ratios = {c.heads // c.kv_heads if c.kv_heads and c.heads % c.kv_heads == 0 else None for c in cores}
    if len(ratios) != 1 or None in ratios:
        return "the members group their query heads over their KV heads differently"
    sizes = {_dim(c.q, 3) for c in cores} | {_dim(c.v, 3) for c in cores}
    if len(sizes) != 1 or None in sizes:
        return "head sizes unknown, or different between members"
    return None


def merge_cores(graph: ir.Graph, prefix: str, cores: Sequence[AttentionCore]) -> list[ir.Node]:
    """One core on the members' Q, K, V concatenated along the head axis (the first member's ops, with
    its other inputs), its output split back; every member's output is replaced. Returns the nodes."""
    first = cores[0]
    emit = Emitter(graph, prefix, first.output.dtype or ir.DataType.FLOAT)
    mapping: dict[ir.Value, ir.Value] = {}
    for name in ("q", "k", "v"):
        members = [getattr(c, name) for c in cores]
        mapping[getattr(first, name)] = merged = emit.add("Concat", members, name, axis=1)
        merged.type, merged.shape = members[0].type, _heads_summed(members)
    for i, node in enumerate(first.nodes):
        attributes = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()
                      if a.name not in HEAD_COUNT_ATTRIBUTES]
        clone = ir.Node(node.domain, node.op_type, [mapping.get(v, v) if v is not None else None for v in node.inputs],
                        attributes=attributes, num_outputs=len(node.outputs), name=f"{prefix}/{node.op_type}_{i}")
        for old, new in zip(node.outputs, clone.outputs):
            new.name = f"{prefix}/{node.op_type}_{i}_output_{old.index()}"
            new.type = old.type
            mapping[old] = new
        emit.nodes.append(clone)
    output = mapping[first.output]
    output.shape = _heads_summed([c.output for c in cores])
    sizes = emit.constant(np.array([c.heads for c in cores], np.int64), "split_sizes")
    split = ir.Node("", "Split", [output, sizes], attributes=[ir.AttrInt64("axis", 1)], num_outputs=len(cores),
                    name=f"{prefix}/split")
    emit.nodes.append(split)
    for i, (core, piece) in enumerate(zip(cores, split.outputs)):
        piece.name = f"{prefix}/split_output_{i}"
        piece.type, piece.shape = core.output.type, core.output.shape
        ir.convenience.replace_all_uses_with(core.output, piece)
    return emit.nodes


# --- ONNX's Attention op ------------------------------------------------------------------------------

def _attention_op(ops: list[ir.Node]) -> AttentionCore | str:
    node = ops[0]
    if node.op_type == "GroupQueryAttention":  # ORT GenAI's graphs
        return ("GroupQueryAttention cores (each writes its own layer's KV buffer in place, which ORT GenAI "
                "shares between past and present; one op would copy the window's cache every step)")
    if len(ops) > 1 or node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
        return f"a {node.domain or 'ai.onnx'} {node.op_type} core, not ONNX's Attention"
    if len(node.inputs) > 4 and any(v is not None for v in node.inputs[4:]):
        return "an Attention op with its own past key/value inputs"
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return "the Attention op's present or QK outputs are read"
    q, k, v = node.inputs[:3]
    heads, kv_heads = _dim(q, 1), _dim(k, 1)
    if q is None or k is None or v is None or heads is None or kv_heads is None or _dim(v, 1) != kv_heads:
        return "Attention inputs not [batch, heads, tokens, head size] with static head counts"
    if not all(_headwise(m) for m in node.inputs[3:4] if m is not None):
        return "an attention mask that varies by head"
    return AttentionCore((node,), q, k, v, node.outputs[0], heads, kv_heads)


# --- decomposed: MatMul, Softmax, MatMul ----------------------------------------------------------------

def _decomposed(block: AttentionBlock) -> AttentionCore | str:
    inside = set(block.nodes)
    softmaxes = [n for n in block.nodes if n.op_type == "Softmax"]
    if len(softmaxes) != 1:
        return f"{len(softmaxes)} Softmax nodes in the attention branch, not one core"
    softmax = softmaxes[0]
    if softmax.attributes.get_int("axis", -1) not in (-1, 3):
        return "a softmax over another axis than the keys"
    scores = _matmuls(softmax.inputs[0], inside, up=True)
    weighted = _matmuls(softmax.outputs[0], inside, up=False)
    if len(scores) != 1 or len(weighted) != 1:
        return "no single MatMul(Q, Kᵀ) before the softmax and MatMul(·, V) after it"
    [first], [last] = scores, weighted
    region = (_downstream(first, inside) & _upstream(last.inputs[0], inside, first)) | {first, last}
    if bad := sorted({n.op_type for n in region - {first, last}} - HEADWISE_OPS):
        return f"{', '.join(bad)} inside the attention core"
    for node in region - {last}:
        if any(o.is_graph_output() or any(u.node not in region for u in o.uses()) for o in node.outputs):
            return f"{node.op_type} {node.name!r} inside the core is read outside it"
    q, kt, v = first.inputs[0], first.inputs[1], last.inputs[1]
    produced = {o for n in region for o in n.outputs}
    external = {i for n in region for i in n.inputs if i is not None and i not in produced} - {q, kt, v}
    if not all(_headwise(value) for value in external):
        return "a mask or bias inside the core that varies by head"
    heads, kv_heads = _traced_heads(q), _traced_heads(kt)
    if q is None or kt is None or v is None or heads is None or heads != kv_heads or _dim(v, 1) != heads:
        return "Q, K and V not [batch, heads, ...] with the same static head count"
    return AttentionCore(tuple(_in_order(region)), q, kt, v, last.outputs[0], heads, kv_heads)


def _matmuls(value: ir.Value | None, inside: set[ir.Node], up: bool) -> set[ir.Node]:
    """MatMuls of two computed operands reached from ``value`` through head-wise ops, upward (the
    scores) or downward (the weighted values, where ``value``'s path is the left operand)."""
    found: set[ir.Node] = set()
    stack, seen = [value], set()
    while stack:
        current = stack.pop()
        if current is None or current in seen:
            continue
        seen.add(current)
        nodes = [current.producer()] if up else [u.node for u in current.uses()]
        for node in nodes:
            if node is None or node not in inside:
                continue
            if node.op_type == "MatMul" and all(i is not None and i.const_value is None for i in node.inputs):
                if up or node.inputs[0] is current:
                    found.add(node)
            elif node.op_type in HEADWISE_OPS:
                stack += list(node.inputs) if up else list(node.outputs)
    return found


def _downstream(node: ir.Node, inside: set[ir.Node]) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    stack = [node]
    while stack:
        for output in stack.pop().outputs:
            for use in output.uses():
                if use.node in inside and use.node not in seen:
                    seen.add(use.node)
                    stack.append(use.node)
    return seen


def _upstream(value: ir.Value | None, inside: set[ir.Node], stop: ir.Node) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    stack = [value]
    while stack:
        current = stack.pop()
        node = current.producer() if current is not None else None
        if node is None or node in seen or node not in inside or node is stop:
            continue
        seen.add(node)
        stack += list(node.inputs)
    return seen


def _in_order(region: set[ir.Node]) -> list[ir.Node]:
    """The region's nodes in graph order (topological; the same order in every layer an exporter wrote)."""
    graph = next(iter(region)).graph
    assert graph is not None
    return [node for node in graph if node in region]


# --- shapes and wiring ---------------------------------------------------------------------------------

def _dim(value: ir.Value | None, axis: int) -> int | None:
    shape = value.shape if value is not None else None
    if shape is None or shape.rank() != 4:
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) else None


def _traced_heads(value: ir.Value | None) -> int | None:
    """Axis 1 of ``value``, read through scalar scalings and Transposes that keep axes 0 and 1 (the
    exporter leaves K'ᵀ without a shape)."""
    while value is not None:
        if (heads := _dim(value, 1)) is not None:
            return heads
        node = value.producer()
        if node is None:
            return None
        if node.op_type in ("Mul", "Div") and any(_is_scalar(i) for i in node.inputs):
            value = next((i for i in node.inputs if not _is_scalar(i)), None)
        elif node.op_type == "Transpose" and tuple(node.attributes.get_ints("perm", ()))[:2] == (0, 1):
            value = node.inputs[0]
        elif node.op_type == "Reshape" and (source := _leading_dims_source(node.inputs[1])) is not None:
            value = source  # torch's Kᵀ: to 3-D, Transpose, back to [K's first two dims, ...]
        else:
            return None
    return None


def _leading_dims_source(shape: ir.Value | None) -> ir.Value | None:
    """``Y`` when ``shape`` is ``Concat(Shape(Y)[0:2], ...)``: a Reshape target that keeps ``Y``'s
    batch and head axes."""
    concat = shape.producer() if shape is not None else None
    if concat is None or concat.op_type != "Concat" or not concat.inputs:
        return None
    head = concat.inputs[0].producer() if concat.inputs[0] is not None else None
    if head is not None and head.op_type == "Slice" and len(head.inputs) in (3, 4):
        starts, ends = (_constant(v) for v in head.inputs[1:3])
        axes = _constant(head.inputs[3]) if len(head.inputs) == 4 else [0]
        source = head.inputs[0].producer() if head.inputs[0] is not None else None
        if source is None or source.op_type != "Shape" or source.attributes.get_int("start", 0) != 0 \
                or source.attributes.get_int("end") is not None or source.inputs[0] is None:
            return None
        rank = source.inputs[0].shape.rank() if source.inputs[0].shape is not None else None
        if rank is None or axes != [0] or starts is None or ends is None:
            return None
        # Slice's clamping: negative indices count from the end; torch writes [INT64_MIN, -2) for [0:2) of 4
        start, end = (min(max(i + rank if i < 0 else i, 0), rank) for i in (starts[0], ends[0]))
        if (start, end) == (0, 2):
            return source.inputs[0]
    if head is not None and head.op_type == "Shape" and head.attributes.get_int("start", 0) == 0 \
            and head.attributes.get_int("end") == 2:
        return head.inputs[0]
    return None


def _constant(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(x) for x in value.const_value.numpy().reshape(-1)]


def _is_scalar(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.const_value.size == 1


def _headwise(value: ir.Value) -> bool:
    """Does ``value`` broadcast over the head axis of ``[batch, heads, queries, keys]`` (size 1 there)?"""
    shape = value.const_value.shape if value.const_value is not None else value.shape
    if shape is None:
        return False
    dims = list(shape)
    return len(dims) <= 2 or dims[-3] == 1


def _same_wiring(first: AttentionCore, other: AttentionCore) -> str | None:
    if [(n.domain, n.op_type) for n in first.nodes] != [(n.domain, n.op_type) for n in other.nodes]:
        return "the members' attention cores are different ops"
    roles = {first.q: "q", first.k: "k", first.v: "v", other.q: "q", other.k: "k", other.v: "v"}
    positions = {o: ("node", i, o.index()) for core in (first, other) for i, n in enumerate(core.nodes) for o in n.outputs}
    for mine, theirs in zip(first.nodes, other.nodes):
        if _attributes(mine) != _attributes(theirs):
            return f"the members' {mine.op_type} attributes differ"
        for a, b in zip(mine.inputs, theirs.inputs, strict=True):
            if a is b:
                continue
            if a is None or b is None:
                return f"the members' {mine.op_type} inputs differ"
            if a in roles or a in positions:
                if roles.get(a, positions.get(a)) != roles.get(b, positions.get(b)):
                    return f"the members' {mine.op_type} inputs differ"
            elif not _equal_constants(a, b):
                return "the members' cores read different masks or constants (e.g. sliding and global layers)"
    return None


def _attributes(node: ir.Node) -> dict:
    return {name: a.value for name, a in node.attributes.items() if name not in HEAD_COUNT_ATTRIBUTES}


def _equal_constants(a: ir.Value, b: ir.Value) -> bool:
    if a.const_value is None or b.const_value is None:
        return False
    x, y = a.const_value.numpy(), b.const_value.numpy()
    return x.dtype == y.dtype and x.shape == y.shape and bool(np.array_equal(x, y, equal_nan=x.dtype.kind == "f"))


def _heads_summed(values: Sequence[ir.Value]) -> ir.Shape | None:
    heads = [_dim(v, 1) for v in values]
    shape = values[0].shape
    if shape is None or None in heads:
        return None
    dims = list(shape.dims)
    dims[1] = sum(h for h in heads if h is not None)
    return ir.Shape(dims)
