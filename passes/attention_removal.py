"""Remove the attention residual branch of chosen decoder layers: ``x + attn(n(x))`` becomes ``x``.

This is Puzzle/DeciLM's ``attention: no_op`` as a graph rewrite. The branch's nodes disappear, the
residual passes straight through, and in KV-cache models the layer's ``past_key_values.N.*`` inputs
and ``present.N.*`` outputs go too (a graph output computed from the removed branch has nothing
left to compute it from). Inputs still read elsewhere (e.g. a past tensor whose shape sizes the
attention mask) are kept and reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from ffnfusion.passes.block_map import AttentionBlock, BlockMap
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.canonical import RewritePass
from ffnfusion.passes.plan import InvalidPlanError


@dataclasses.dataclass
class AttentionRemovalResult(ir.passes.PassResult):
    """The pass's result: the model, plus which KV-cache inputs and outputs went with the branches."""

    layers: list[int] = dataclasses.field(default_factory=list)
    removed_inputs: list[str] = dataclasses.field(default_factory=list)
    removed_outputs: list[str] = dataclasses.field(default_factory=list)
    kept_inputs: list[str] = dataclasses.field(default_factory=list)  # still read by other nodes


class AttentionRemovalPass(RewritePass):
    """Drop the attention branches of ``layers`` (0-based ``model.layers.N`` indices)."""

    def __init__(self, layers: Iterable[int], keep_kv_io: bool = False):
        super().__init__()
        self.layers = sorted(set(layers))
        # Runtimes that expect one KV pair per layer (optimum, ORT GenAI) get pass-through
        # present.N.* = Identity(past_key_values.N.*) for the removed layers.
        self.keep_kv_io = keep_kv_io

    def rewrite(self, model: ir.Model) -> ir.passes.PassResult:
        block_map = find_blocks(model)
        branches = [_attention_branch(block_map, index) for index in self.layers]
        graph = model.graph
        inputs_before = list(graph.inputs)
        for block in branches:  # the residual passes straight through
            ir.convenience.replace_all_uses_with(block.output, block.passes_through)
        doomed: set[ir.Value] = set()
        for index, block in zip(self.layers, branches):
            for value in _graph_outputs_fed_by(block.nodes, graph):
                if _cache_layer(value.name) != index:
                    raise InvalidPlanError(
                        f"graph output {value.name!r} is computed from layer {index}'s attention and is "
                        f"not its KV cache (present.{index}.*); cannot remove that attention"
                    )
                doomed.add(value)
        outputs = list(graph.outputs)
        removed_outputs = [_name(v) for v in outputs if v in doomed]
        graph.outputs.clear()
        graph.outputs.extend(v for v in outputs if v not in doomed)
        RemoveUnusedNodesPass()(model)
        if self.keep_kv_io:
            _pass_through_caches(graph, outputs, doomed)
            removed_outputs = []
        else:
            _redirect_shape_reads(graph, self.layers)
        # Drop KV-cache inputs nothing reads any more; other inputs keep the model's signature.
        removed_inputs = []
        for value in [v for v in graph.inputs if not v.uses() and _cache_layer(v.name) is not None]:
            graph.inputs.remove(value)
            removed_inputs.append(_name(value))
        kept_inputs = [_name(v) for v in inputs_before
                       if v in graph.inputs and _cache_layer(v.name) in self.layers]
        return AttentionRemovalResult(model, bool(self.layers), self.layers, removed_inputs, removed_outputs,
                                      kept_inputs)


def remove_attention(model: ir.Model, layers: Iterable[int], keep_kv_io: bool = False) -> AttentionRemovalResult:
    """Plain-function form of :class:`AttentionRemovalPass`; rewrites ``model`` in place."""
    result = AttentionRemovalPass(layers, keep_kv_io)(model)
    assert isinstance(result, AttentionRemovalResult)
    return result


def _name(value: ir.Value) -> str:
    return value.name or "<unnamed>"


def _attention_branch(block_map: BlockMap, index: int) -> AttentionBlock:
    layer = block_map.layer(index)
    if layer.attention_block is None:
        raise InvalidPlanError(f"layer {index} has no attention to remove")
    return layer.attention_block


def _graph_outputs_fed_by(nodes, graph: ir.Graph) -> set[ir.Value]:
    """Graph outputs computed from ``nodes`` (forward closure), e.g. ``present.N.key``.

    Call after the residual Add's output was rewired, so the closure stops at that Add.
    """
    outputs = set(graph.outputs)
    found: set[ir.Value] = set()
    seen: set[ir.Node] = set()
    pending = list(nodes)
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        for value in node.outputs:
            if value in outputs:
                found.add(value)
            pending.extend(use.node for use in value.uses())
    return found


def _pass_through_caches(graph: ir.Graph, outputs: list[ir.Value], doomed: set[ir.Value]) -> None:
    """Put back each removed ``present.N.*`` output, in its place, as Identity(past_key_values.N.*)."""
    inputs = {v.name: v for v in graph.inputs}
    rebuilt = []
    for value in outputs:
        if value not in doomed:
            rebuilt.append(value)
            continue
        name = _name(value)
        past = inputs.get("past_key_values" + name[len("present"):])
        if past is None:
            raise InvalidPlanError(f"--keep-kv-io: no input past_key_values{name[len('present'):]} for {name}")
        node = ir.node("Identity", [past], name=f"ffnfusion/{name}/pass_through")
        value.name = None  # the removed value gives its name to the pass-through
        node.outputs[0].name = name
        node.outputs[0].type, node.outputs[0].shape = past.type, past.shape
        graph.append(node)
        rebuilt.append(node.outputs[0])
    graph.outputs.clear()
    graph.outputs.extend(rebuilt)


def _redirect_shape_reads(graph: ir.Graph, removed_layers: list[int]) -> None:
    """Exporters size the attention mask from one layer's past tensor (``Shape(past.0.key)``).
    Every layer's cache has the same shape in these models, so such shape-only reads of a removed
    layer's input are pointed at a remaining layer's input of the same kind."""
    cache_inputs = {_name(v): v for v in graph.inputs if _cache_layer(v.name) is not None}
    for name, value in cache_inputs.items():
        if _cache_layer(name) not in removed_layers or not value.uses():
            continue
        if any(use.node.op_type not in ("Shape", "Size") for use in value.uses()):
            continue
        kind = name.rsplit(".", 1)[-1]
        substitute = next((v for n, v in cache_inputs.items() if n.endswith("." + kind)
                           and _cache_layer(n) not in removed_layers), None)
        if substitute is not None:
            ir.convenience.replace_all_uses_with(value, substitute)


def _cache_layer(name: str | None) -> int | None:
    """``past_key_values.12.key`` / ``present.12.value`` -> 12; None for other names."""
    parts = (name or "").split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("past_key_values", "present") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None
