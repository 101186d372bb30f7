"""Find the decoder blocks of a decoder-only ONNX graph: ``find_blocks(model) -> BlockMap`` (the
types: :mod:`.block_map`).

A pre-norm decoder is a *residual stream*: the token embedding ``x0`` followed by residual Adds
``x_{k+1} = x_k + branch_k(x_k)``. We walk that chain from the embedding Gather and classify each
branch (the nodes that depend on ``x_k`` and feed the Add):

* attention: contains a Softmax or an attention op;
* FFN (:func:`~.ffn_branch.match_ffn`): gated ``down(act(gate(n(x))) ⊙ up(n(x)))`` or plain
  ``down(act(up(n(x))))``, ``n`` an RMSNorm or LayerNorm, projections optionally biased or 4-bit
  (``MatMulNBits``), and nothing else; a fused group (ffnfusion's own) is one wide FFN;
* parallel: ``attn(n1(x)) + ffn(n2(x))`` in one branch (GPT-J / Phi-2 style);
* unknown: anything else, reported with what did not match.

Decoder-layer indices come from the order along the stream: a layer is an optional attention branch
followed by an FFN branch; the metadata ffnfusion writes (fused spans, layers emptied or left with
attention only) keeps the original ``model.layers.N`` numbering after a rewrite. Names are never
consulted, so every exporter's encoding works. The walk reads the canonical form
(:mod:`~ffnfusion.passes.canonical`) and never changes the model it is given.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx_ir as ir

from ffnfusion.core.errors import BlockRecognitionError
from ffnfusion.passes import op_matchers
from ffnfusion.passes.block_map import (
    ATTENTION_ONLY_METADATA,
    EMPTY_LAYERS_METADATA,
    FFN_REMOVED,
    NO_FFN_BRANCH,
    PARALLEL_WINDOWS_METADATA,
    AttentionBlock,
    BlockMap,
    DecoderLayer,
    FFNBlock,
    WindowBlock,
    fused_spans_of,
    layer_groups_in_metadata,
    layers_in_metadata,
)
from ffnfusion.passes.canonical import canonical_view
from ffnfusion.passes.embedding import find_embedding_output
from ffnfusion.passes.ffn_branch import match_ffn

ATTENTION_OP_TYPES = {
    "Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
    "PagedAttention", "SparseAttention", "DecoderMaskedMultiHeadAttention",
}


def _branch_nodes(branch_output: ir.Value, stream_value: ir.Value, stops: set[ir.Value]) -> list[ir.Node] | None:
    """Nodes that depend on ``stream_value`` and feed ``branch_output``; None if it does not depend."""
    ancestors: dict[ir.Node, None] = {}
    pending = [branch_output]
    seen_values: set[ir.Value] = set()
    while pending:
        value = pending.pop()
        if value in seen_values or value in stops or value is stream_value:
            continue
        seen_values.add(value)
        node = value.producer()
        if node is None or node in ancestors:
            continue
        ancestors[node] = None
        pending.extend(v for v in node.inputs if v is not None)
    # Which ancestors depend on the stream value: memoised post-order DFS over the ancestor set.
    depends: dict[ir.Value, bool] = {stream_value: True}
    for root in ancestors:
        stack = [(root, False)]
        while stack:
            node, inputs_done = stack.pop()
            if node.outputs[0] in depends:
                continue
            inputs = [v for v in node.inputs if v is not None and v not in depends]
            producers = [v.producer() for v in inputs]
            if not inputs_done and any(p in ancestors for p in producers):
                stack.append((node, True))
                stack.extend((p, False) for p in producers if p in ancestors)
                continue
            result = any(depends.get(v, False) for v in node.inputs if v is not None)
            for out in node.outputs:
                depends[out] = result
    branch = [node for node in ancestors if depends.get(node.outputs[0], False)]
    return branch if depends.get(branch_output, False) else None


def _stream_aliases(x: ir.Value) -> list[ir.Value]:
    """``x`` and no-op Casts/Identities of it (the TorchScript exporter reuses the norm's
    float32 Cast of ``x`` as the residual)."""
    aliases = [x]
    for value in aliases:  # grows while iterating: chains of casts (e.g. after a branch was removed)
        for use in list(value.uses()):
            node = use.node
            # Without type information (legacy exports) a Cast that feeds a residual Add can only
            # be a no-op: a real cast would change the stream's dtype.
            to = node.attributes.get("to")
            if node.op_type == "Identity" or (
                node.op_type == "Cast" and (x.dtype is None or (to is not None and to.value == x.dtype))
            ):
                if node.outputs[0] not in aliases:
                    aliases.append(node.outputs[0])
    return aliases


def _next_residual_add(x: ir.Value, stops: set[ir.Value]) -> tuple[ir.Value, ir.Node, ir.Value, list[ir.Node]] | None:
    """The Add consuming ``x`` (or a no-op cast of it) whose other operand is computed from it."""
    for alias in _stream_aliases(x):
        found = _residual_add_on(alias, stops)
        if found is not None:
            return (alias, *found)
    return None


def _residual_add_on(x: ir.Value, stops: set[ir.Value]) -> tuple[ir.Node, ir.Value, list[ir.Node]] | None:
    """The residual Add on ``x``; of several (a block-parallel window adds ``x`` to each member's
    attention output inside its branch), the outermost: the one whose branch is the largest."""
    found = []
    for use in list(x.uses()):
        node = use.node
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        other = node.inputs[1 - use.idx]
        if other is x or other is None:
            continue
        branch = _branch_nodes(other, x, stops)
        if branch:
            found.append((node, other, branch))
    return max(found, key=lambda candidate: len(candidate[2]), default=None)


def _classify(branch: list[ir.Node], branch_output: ir.Value, x: ir.Value, add: ir.Node):
    """Returns ``("attention", None)``, ``("ffn", parts)`` or ``("unknown", reason)``."""
    ops = {node.op_type for node in branch}
    if ops & ATTENTION_OP_TYPES:
        parallel = _parallel_parts(branch, branch_output, x)
        return ("parallel", parallel) if parallel is not None else ("attention", None)
    parts = match_ffn(branch_output, x)
    if isinstance(parts, str):
        return "unknown", parts
    matched = set(parts["nodes"])
    extra = [node for node in branch if node not in matched]
    if extra:
        kinds = ", ".join(sorted({node.op_type for node in extra}))
        return "unknown", f"gated FFN with extra nodes ({kinds}) that ffnfusion cannot fold"
    parts["nodes"] = (*parts["nodes"], add)
    return "ffn", parts


def _parallel_parts(branch: list[ir.Node], branch_output: ir.Value, x: ir.Value) -> dict | None:
    """``branch_output = attn(n1(x)) + ffn(n2(x))``: the FFN's parts plus ``inner_add`` (that sum),
    ``ffn_output`` and ``attention_nodes``; None when the branch is attention alone."""
    inner = op_matchers.producer(op_matchers.skip_casts(branch_output), "Add")
    if inner is None or len(inner.inputs) != 2:
        return None
    inside = set(branch)
    for ffn_value in (inner.inputs[1], inner.inputs[0]):
        parts = match_ffn(ffn_value, x)
        if isinstance(parts, str) or not set(parts["nodes"]) <= inside:
            continue
        ffn_nodes = set(parts["nodes"]) | set(parts["norm"].nodes)
        attention_nodes = [n for n in branch if n not in ffn_nodes and n is not inner]
        if {n.op_type for n in attention_nodes} & ATTENTION_OP_TYPES:
            return {"ffn": parts, "inner_add": inner, "ffn_output": ffn_value, "attention_nodes": tuple(attention_nodes)}
    return None


def iter_residual_branches(graph: ir.Graph) -> Iterator[tuple[ir.Value, ir.Node, ir.Value, list[ir.Node]]]:
    """Yield ``(x, residual_add, branch_output, branch_nodes)`` along the stream."""
    x = find_embedding_output(graph)
    stops = {x}
    while (found := _next_residual_add(x, stops)) is not None:
        x, add, branch_output, branch = found
        yield x, add, branch_output, branch
        x = add.outputs[0]
        stops.add(x)


def find_blocks(model: ir.Model) -> BlockMap:
    """Walk the residual stream of ``model`` and return its :class:`BlockMap`; ``model`` is not
    changed. The walk needs the canonical form (:mod:`~ffnfusion.passes.canonical`: Skip norms split,
    small constant arithmetic folded): inside a rewrite (``with rewriting(model)``) the model is in
    it and the map points into ``model``; otherwise a graph that is not canonical is walked as a
    canonical clone, whose values the map then holds (reading and planning need nothing else)."""
    model = canonical_view(model)
    graph = model.graph
    fused_spans = fused_spans_of(model)
    empty_layers = set(layers_in_metadata(model, EMPTY_LAYERS_METADATA))
    attention_only = set(layers_in_metadata(model, ATTENTION_ONLY_METADATA))
    windows = {window[0]: window[-1] for window in layer_groups_in_metadata(model, PARALLEL_WINDOWS_METADATA)}
    layers: list[DecoderLayer] = []
    pending_attention: AttentionBlock | None = None
    count = 0
    index = 0  # original decoder-layer index of the next stream position
    for x, add, branch_output, branch in iter_residual_branches(graph):
        count += 1
        upcoming = next(i for i in range(index, index + len(empty_layers) + 1) if i not in empty_layers)
        if pending_attention is None and upcoming in windows:
            index = upcoming
            layers.append(DecoderLayer(index, True, None, last=windows[index],
                                       window=WindowBlock(x, add.outputs[0], add, tuple(branch))))
            index = windows[index] + 1
            continue
        kind, detail = _classify(branch, branch_output, x, add)
        if kind == "parallel":
            if pending_attention:
                layers.append(DecoderLayer(index, True, None, NO_FFN_BRANCH, attention_block=pending_attention))
                index, pending_attention = index + 1, None
            while index in empty_layers:
                index += 1
            parts = detail["ffn"]
            attention = AttentionBlock(x, detail["inner_add"].outputs[0], detail["inner_add"], detail["attention_nodes"],
                                       bypass=detail["ffn_output"])
            both = FFNBlock(layer=index, input=x, output=add.outputs[0], residual_add=add,
                            **{**parts, "nodes": (*parts["nodes"], detail["inner_add"], add)})
            layers.append(DecoderLayer(index, True, both, attention_block=attention, parallel=True))
            index += 1
            continue
        if kind == "attention":
            if pending_attention:  # two attention branches in a row: a layer without FFN
                why = FFN_REMOVED if index in attention_only else NO_FFN_BRANCH
                layers.append(DecoderLayer(index, True, None, why, attention_block=pending_attention))
                index += 1
            while index in empty_layers:
                index += 1
            pending_attention = AttentionBlock(x, add.outputs[0], add, tuple(branch))
            continue
        if pending_attention is not None and index in attention_only:
            layers.append(DecoderLayer(index, True, None, FFN_REMOVED, attention_block=pending_attention))
            index, pending_attention = index + 1, None
        if pending_attention is None:
            while index in empty_layers:
                index += 1
        last = fused_spans.get(index) if kind == "ffn" else None
        ffn = FFNBlock(layer=index, input=x, output=add.outputs[0], residual_add=add, **detail) \
            if kind == "ffn" else None
        layers.append(DecoderLayer(index, pending_attention is not None, ffn,
                                   None if ffn else detail, last=last, attention_block=pending_attention))
        index = (index if last is None else last) + 1
        pending_attention = None
    if pending_attention:
        layers.append(DecoderLayer(index, True, None, NO_FFN_BRANCH, attention_block=pending_attention))
    if not layers:
        raise BlockRecognitionError(
            f"found {count} residual branches after the embedding; expected a chain of "
            "Add(x, branch(x)) nodes (pre-norm decoder layers)"
        )
    if not any(layer.ffn for layer in layers):
        reasons = sorted({layer.unknown for layer in layers if layer.unknown})
        raise BlockRecognitionError(
            f"found {len(layers)} decoder layers but no gated FFN: {'; '.join(reasons) or 'none'}"
        )
    return BlockMap(tuple(layers))
