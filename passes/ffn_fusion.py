"""Fuse groups of consecutive attention-free FFN layers into one wide FFN.

For a group of layers ``1..k`` reading the residual stream ``x``, the parallel form

    y = x + Σ_j down_j( silu(n_j(x)·G_j) ⊙ (n_j(x)·U_j) ),    n_j(x) = x / rms(x) · s_j

equals one FFN of width ``Σ_j width_j`` on the unit-gain norm ``u = x / rms(x)``:

    y = x + ( silu(u·G*) ⊙ (u·U*) ) · D*,
    G* = [diag(s_1)·G_1 | … | diag(s_k)·G_k],  U* = [diag(s_1)·U_1 | …],  D* = [D_1; …; D_k]

exactly, because every member sees the same ``rms(x)`` (same epsilon). Gains are folded in
float32 and cast back to the weights' dtype. The same holds for GeGLU, for plain two-matrix MLPs
``down(act(n(x)·U + b_u)) + b_d`` (biases: ``b_u*`` concatenates, ``b_d*`` sums) and for LayerNorm
``n(x) = unit(x)·s + β``, whose bias folds into the first projection's: ``b_u* = [β_j·U_j + b_u_j]``. Replacing the *sequential* run by this parallel form
is the approximation FFN Fusion makes; this pass performs the rewrite, analysis decides where.

``target="cpu"`` appends zero columns to ``G*``/``U*`` and zero rows to ``D*`` (still exact: a zero
down row ignores its column) so that the width is an odd multiple of 16 (see :func:`cpu_padding`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from ffnfusion.core.errors import InvalidArgumentError
from ffnfusion.passes import nbits
from ffnfusion.passes.blocks import FUSED_GROUPS_METADATA, FFNBlock, find_blocks, fused_spans_of
from ffnfusion.passes.canonical import RewritePass
from ffnfusion.passes.layer_ranges import format_ranges
from ffnfusion.passes.plan import FusionPlan, InvalidPlanError
from ffnfusion.passes.streaming import FoldedColumns, StackedRows

# What the emitted layout is tuned for: "gpu" (TensorRT, CUDA; the default) keeps the width, a sum
# of the members' tensor-core friendly widths; "cpu" (ONNX Runtime's MLAS kernels) pads it.
TARGETS = ("gpu", "cpu")


def cpu_padding(width: int) -> int:
    """Zero columns that make ``width`` an odd multiple of 16.

    MLAS packs the down projection's input a few rows at a time; with a row stride that is a multiple
    of 4 KiB (8 × 1536 float32 columns: 48 KiB) those rows share cache sets. Measured on ORT CPU,
    2 threads, B8×S128, 8 fused 576×1536 FFNs: width 12288 5% slower than the unfused layers, width
    12304 4% faster. The 16 extra columns cost 0.13% more FLOPs.
    """
    return (16 - width % 32) % 32


class FFNFusionPass(RewritePass):
    """Rewrite each group of a :class:`FusionPlan` into one wide FFN with one residual Add."""

    def __init__(self, plan: FusionPlan | Sequence[Sequence[int]] | str, target: str = "gpu"):
        super().__init__()
        if target not in TARGETS:
            raise InvalidArgumentError(f"target must be one of {', '.join(TARGETS)}, not {target!r}")
        self.plan = FusionPlan.coerce(plan)
        self.target = target

    def rewrite(self, model: ir.Model) -> ir.passes.PassResult:
        groups = self.plan.resolve(find_blocks(model))
        for group, members in groups:
            check_fusable(format_ranges(group), members)
        replaced: dict[ir.Value, ir.Value] = {}  # adjacent groups: one's output is the next's input
        for group, members in groups:
            pad = cpu_padding(sum(m.width for m in members)) if self.target == "cpu" else 0
            replaced[members[-1].output] = fuse_group(model.graph, format_ranges(group), members, replaced, pad)
        RemoveUnusedNodesPass()(model)  # dead gains, weights and their Identity/Constant feeders
        spans = fused_spans_of(model)
        for group in self.plan.groups:  # a group that takes in earlier fused FFNs replaces them
            spans = {a: b for a, b in spans.items() if not group[0] <= a <= group[-1]}
            spans[group[0]] = group[-1]
        model.metadata_props[FUSED_GROUPS_METADATA] = ",".join(f"{a}-{b}" for a, b in sorted(spans.items()))
        return ir.passes.PassResult(model, modified=True)


def fuse_ffn_groups(model: ir.Model, groups: FusionPlan | Sequence[Sequence[int]], target: str = "gpu") -> ir.Model:
    """Plain-function form of :class:`FFNFusionPass` (rewrites ``model`` in place and returns it)."""
    return FFNFusionPass(groups, target)(model).model


def check_fusable(label: str, members: Sequence[FFNBlock]) -> None:
    """Members must share hidden size, dtype, activation and norm kind/epsilon."""
    first = members[0]
    for member in members:
        if member.post_norm is not None:
            raise InvalidPlanError(
                f"group {label}: layer {member.layer}'s FFN normalises its output (a post-norm, as in Gemma 2/3's sandwich layers): the group is "
                "not one wide FFN (each member normalises its own output), and ffnfusion does not write that "
                "grouped form yet")
    for member in members[1:]:
        for what, mine, theirs in (
            ("norm epsilon", member.norm.epsilon, first.norm.epsilon),
            ("norm kind", member.norm.kind, first.norm.kind),
            ("FFN kind", member.kind, first.kind),
            ("activation", member.activation, first.activation),
            ("hidden size", member.hidden, first.hidden),
            ("weight dtype", member.dtype, first.dtype),
        ):
            if mine != theirs:
                raise InvalidPlanError(
                    f"group {label}: layer {member.layer} has {what} {mine}, layer {first.layer} has "
                    f"{theirs}; a fused group needs one {what}"
                )
    for before in members[:-1]:
        if before.output.is_graph_output():
            raise InvalidPlanError(
                f"group {label}: the hidden state after layer {before.layer} is a graph output; "
                "fusing would remove it"
            )


def _intermediate_nodes(before: FFNBlock, after: FFNBlock) -> list[ir.Node]:
    """No-op Casts between one member's output and the next member's input (legacy exports)."""
    nodes: list[ir.Node] = []
    value: ir.Value | None = after.input
    while value is not before.output:
        node = value.producer() if value is not None else None
        assert node is not None, "match_ffn only links members through Casts"
        nodes.append(node)
        value = node.inputs[0]
    return nodes


def fuse_group(graph: ir.Graph, label: str, members: Sequence[FFNBlock],
               replaced: dict[ir.Value, ir.Value] | None = None, pad: int = 0) -> ir.Value:
    """Replace ``members`` by one wide FFN (plus ``pad`` zero columns); returns the new residual
    output. ``replaced`` maps stream values removed by earlier groups to their replacements.
    """
    first, last = members[0], members[-1]
    stream_input = (replaced or {}).get(first.input, first.input)
    prefix = f"ffnfusion.layers.{label}"
    dtype = first.dtype

    doomed: dict[ir.Node, None] = {}
    for member in members:
        doomed.update(dict.fromkeys(member.nodes))
    for before, after in zip(members, members[1:]):
        doomed.update(dict.fromkeys(_intermediate_nodes(before, after)))
    for before in members[:-1]:
        outside = [use.node for use in before.output.uses() if use.node not in doomed]
        if outside:
            raise InvalidPlanError(
                f"group {label}: the hidden state after layer {before.layer} is also read by "
                f"{outside[0].op_type} node {outside[0].name!r}; fusing would change it"
            )

    new_nodes: list[ir.Node] = []
    gains = [_gain_float32(m) for m in members]
    shared = _shared_gain(members, gains)
    unit_norm = _unit_gain_norm(first, prefix, new_nodes, graph, doomed, shared)
    if shared is not None:  # what is folded is each member's gain relative to the one the norm applies
        gains = [gain / shared for gain in gains]
    # Weights are computed when saved, a block of rows at a time (models larger than RAM).
    up = _register(graph, FoldedColumns([m.up for m in members], gains, dtype, f"{prefix}.up_proj.weight", pad))
    down = _register(graph, StackedRows([m.down for m in members], dtype, f"{prefix}.down_proj.weight", pad))
    gate = None
    if first.kind == "gated":
        gate_weights = [m.gate for m in members if m.gate is not None]  # check_fusable: all gated alike
        gate = _register(graph, FoldedColumns(gate_weights, gains, dtype, f"{prefix}.gate_proj.weight", pad))

    def add(op_type, inputs, name, **attributes):
        node = ir.node(op_type, inputs, attributes or None, name=f"{prefix}/{name}")
        node.outputs[0].name = f"{prefix}/{name}_output"
        new_nodes.append(node)
        return node.outputs[0]

    def linear(value, weight, bias, name):
        out = add("MatMul", [value, weight], name)
        return out if bias is None else add("Add", [out, _register(graph, bias)], f"{name}_bias")

    def scalar(number: float, name: str) -> ir.Value:
        return _register(graph, ir.tensor(np.array(number, dtype.numpy()), name=f"{prefix}.{name}"))

    def activate(value):
        if first.activation == "silu":
            return add("Mul", [value, add("Sigmoid", [value], "sigmoid")], "silu")
        # the members' own GELU (exact or tanh), checked equal across the group
        if graph.opset_imports.get("", 20) >= 20:
            return add("Gelu", [value], "gelu", approximate="tanh" if first.activation == "gelu_tanh" else "none")
        # no Gelu op before opset 20: the same formula written out, as the exporter wrote it
        if first.activation == "gelu_tanh":  # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
            cubed = add("Mul", [add("Pow", [value, scalar(3.0, "three")], "cube"), scalar(0.044715, "k")], "k_cube")
            inner = add("Mul", [add("Add", [value, cubed], "inner_sum"), scalar(math.sqrt(2 / math.pi), "c")], "inner")
            bracket = add("Add", [add("Tanh", [inner], "tanh"), scalar(1.0, "one")], "bracket")
        else:  # 0.5·x·(1 + erf(x/√2))
            bracket = add("Add", [add("Erf", [add("Div", [value, scalar(math.sqrt(2), "sqrt2")], "scaled")], "erf"),
                                  scalar(1.0, "one")], "bracket")
        return add("Mul", [add("Mul", [value, scalar(0.5, "half")], "half_x"), bracket], "gelu")

    up_out = linear(unit_norm, up, folded_bias(members, "up", dtype, f"{prefix}.up_proj.bias", pad), "up_proj")
    if gate is not None:
        gate_out = linear(unit_norm, gate, folded_bias(members, "gate", dtype, f"{prefix}.gate_proj.bias", pad), "gate_proj")
        hidden = add("Mul", [activate(gate_out), up_out], "gated")
    else:
        hidden = activate(up_out)
    down_out = linear(hidden, down, summed_down_bias(members, dtype, f"{prefix}.down_proj.bias"), "down_proj")
    residual = add("Add", [stream_input, down_out], "residual_add")
    residual.type, residual.shape = last.output.type, last.output.shape

    graph.insert_before(last.residual_add, new_nodes)
    old_output = last.output
    output_name = old_output.name if old_output.is_graph_output() else None
    ir.convenience.replace_all_uses_with(old_output, residual, replace_graph_outputs=True)
    graph.remove(list(doomed), safe=True)
    if output_name is not None:
        old_output.name = None
        residual.name = output_name
    return residual


def _shared_gain(members: Sequence[FFNBlock], gains: list[np.ndarray]) -> np.ndarray | None:
    """For members whose weights are block-quantized (:mod:`.nbits`): a gain the fused norm applies
    itself, the members' mean, so that only each member's gain *relative* to it is folded into weights
    that are requantised. Norm gains have outlier channels common to all layers; folded whole they
    would set the scale of every quantization block they fall in. None for float weights (all folded)."""
    if not any(m.up.value.meta.get(nbits.DEQUANTIZED_META) for m in members):
        return None
    mean = np.mean(gains, axis=0)
    return np.where(np.abs(mean) > 1e-6, mean, 1.0).astype(np.float32)


def _unit_gain_norm(first: FFNBlock, prefix: str, new_nodes: list[ir.Node], graph: ir.Graph,
                    doomed: dict[ir.Node, None], shared: np.ndarray | None = None) -> ir.Value:
    """``x / rms(x)`` (times ``shared`` when given): reuse the first member's decomposed norm up to
    its gain Mul, or emit the norm op again with a ones (or ``shared``) gain."""
    norm = first.norm
    if norm.unit_output is not None:  # decomposed: keep the nodes up to the unit-gain value
        for node in norm.nodes:
            if node is not norm.gain_node and node is not norm.bias_node:
                doomed.pop(node, None)
        if shared is None:
            return norm.unit_output
        dtype = first.dtype.numpy()
        gain = _register(graph, ir.tensor(shared.astype(dtype), name=f"{prefix}.norm.shared_weight"))
        node = ir.node("Mul", [norm.unit_output, gain], name=f"{prefix}/norm_shared_gain")
        node.outputs[0].name = f"{prefix}/norm_output"
        new_nodes.append(node)
        return node.outputs[0]
    op_node = norm.nodes[0]
    for node in norm.nodes[1:]:  # the Casts feeding the norm op stay
        doomed.pop(node, None)
    assert norm.gain is not None  # a norm without a gain takes the unit-norm path above
    gain_tensor = norm.gain.const_value
    assert gain_tensor is not None
    weights = np.ones(tuple(gain_tensor.shape.numpy()), np.float32) if shared is None else shared
    ones = _register(graph, ir.tensor(weights.astype(gain_tensor.dtype.numpy()), name=f"{prefix}.norm.unit_weight"))
    node = ir.Node(op_node.domain, op_node.op_type, [op_node.inputs[0], ones],
                   attributes=list(op_node.attributes.values()), name=f"{prefix}/norm",
                   num_outputs=1)
    node.outputs[0].name = f"{prefix}/norm_output"
    new_nodes.append(node)
    return node.outputs[0]


def folded_bias(members: Sequence[FFNBlock], which: str, dtype: ir.DataType, name: str,
                pad: int = 0) -> ir.TensorProtocol | None:
    """``[β_1·W_1 + b_1 | … | β_k·W_k + b_k | 0]`` for the gate or up projection (float32, cast
    once): each member's LayerNorm bias ``β_j`` goes through its own weight; None when nothing is
    biased."""
    if all(m.norm.bias is None and getattr(m, f"{which}_bias") is None for m in members):
        return None
    parts = []
    for member in members:
        weight = getattr(member, which)
        part = np.zeros(weight.shape_in_out[1], np.float32)
        if member.norm.bias is not None:
            part += _const(member.norm.bias) @ weight.numpy_in_out().astype(np.float32)
        if (bias := getattr(member, f"{which}_bias")) is not None:
            part += _const(bias)
        parts.append(part)
    parts.append(np.zeros(pad, np.float32))
    return ir.tensor(np.concatenate(parts).astype(dtype.numpy()), name=name)


def summed_down_bias(members: Sequence[FFNBlock], dtype: ir.DataType, name: str) -> ir.TensorProtocol | None:
    """``b_1 + … + b_k``: the members' down biases all add to the same residual."""
    biases = [_const(m.down_bias) for m in members if m.down_bias is not None]
    return ir.tensor(np.sum(biases, axis=0).astype(dtype.numpy()), name=name) if biases else None


def _gain_float32(member: FFNBlock) -> np.ndarray:
    if member.norm.gain is None:
        return np.ones(member.hidden, np.float32)
    return _const(member.norm.gain)


def _const(value: ir.Value) -> np.ndarray:
    """A matched constant (gain, bias) as float32; the matchers only return values that have one."""
    assert value.const_value is not None, f"{value.name} has no constant value"
    return value.const_value.numpy().astype(np.float32)


def _register(graph: ir.Graph, tensor: ir.TensorProtocol) -> ir.Value:
    value = ir.Value(name=tensor.name, shape=ir.Shape(tensor.shape.numpy()), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value
