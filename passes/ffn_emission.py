"""What the FFN fusions emit with: new nodes under one name prefix, weights registered as
initializers, the shared unit-gain norm, folded biases, and the swap of a group's nodes for new ones.

Shared by :mod:`.ffn_fusion` (one wide FFN) and :mod:`.post_norm_fusion` (the grouped form of
post-normed members); neither decides anything here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from ffnfusion.passes import nbits
from ffnfusion.passes.block_map import FFNBlock
from ffnfusion.passes.norm_matchers import Norm
from ffnfusion.passes.op_matchers import attribute
from ffnfusion.passes.plan import InvalidPlanError
from ffnfusion.passes.streaming import FoldedColumns


class Emitter:
    """Appends nodes named ``{prefix}/{name}`` to :attr:`nodes`; constants become initializers
    named ``{prefix}.{name}``."""

    def __init__(self, graph: ir.Graph, prefix: str, dtype: ir.DataType):
        self.graph, self.prefix, self.dtype = graph, prefix, dtype
        self.nodes: list[ir.Node] = []

    def add(self, op_type: str, inputs: Sequence[ir.Value | None], name: str, **attributes) -> ir.Value:
        node = ir.node(op_type, inputs, attributes or None, name=f"{self.prefix}/{name}")
        node.outputs[0].name = f"{self.prefix}/{name}_output"
        self.nodes.append(node)
        return node.outputs[0]

    def constant(self, array: np.ndarray, name: str) -> ir.Value:
        return register(self.graph, ir.tensor(array, name=f"{self.prefix}.{name}"))

    def scalar(self, number: float, name: str) -> ir.Value:
        return self.constant(np.array(number, self.dtype.numpy()), name)

    def linear(self, value: ir.Value, weight: ir.Value, bias: ir.TensorProtocol | None, name: str) -> ir.Value:
        out = self.add("MatMul", [value, weight], name)
        return out if bias is None else self.add("Add", [out, register(self.graph, bias)], f"{name}_bias")

    def activate(self, value: ir.Value, activation: str) -> ir.Value:
        """The members' own activation (SiLU, exact or tanh GELU), checked equal across the group."""
        if activation == "silu":
            return self.add("Mul", [value, self.add("Sigmoid", [value], "sigmoid")], "silu")
        if self.graph.opset_imports.get("", 20) >= 20:
            return self.add("Gelu", [value], "gelu", approximate="tanh" if activation == "gelu_tanh" else "none")
        # no Gelu op before opset 20: the same formula written out, as the exporter wrote it
        add, scalar = self.add, self.scalar
        if activation == "gelu_tanh":  # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
            cubed = add("Mul", [add("Pow", [value, scalar(3.0, "three")], "cube"), scalar(0.044715, "k")], "k_cube")
            inner = add("Mul", [add("Add", [value, cubed], "inner_sum"), scalar(math.sqrt(2 / math.pi), "c")], "inner")
            bracket = add("Add", [add("Tanh", [inner], "tanh"), scalar(1.0, "one")], "bracket")
        else:  # 0.5·x·(1 + erf(x/√2))
            bracket = add("Add", [add("Erf", [add("Div", [value, scalar(math.sqrt(2), "sqrt2")], "scaled")], "erf"),
                                  scalar(1.0, "one")], "bracket")
        return add("Mul", [add("Mul", [value, scalar(0.5, "half")], "half_x"), bracket], "gelu")


def register(graph: ir.Graph, tensor: ir.TensorProtocol) -> ir.Value:
    """``tensor`` as a new initializer of ``graph``."""
    value = ir.Value(name=tensor.name, shape=ir.Shape(tensor.shape.numpy()), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
    graph.register_initializer(value)
    return value


def group_nodes(label: str, members: Sequence[FFNBlock]) -> dict[ir.Node, None]:
    """Every node the group's rewrite removes (members' branches and the Casts between them), in
    order; refuses a group whose intermediate hidden state is read outside it."""
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
    return doomed


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


def replace_group(graph: ir.Graph, last: FFNBlock, residual: ir.Value, new_nodes: list[ir.Node],
                  doomed: dict[ir.Node, None]) -> None:
    """Insert ``new_nodes`` before the last member's residual Add, route the last member's output
    readers (and a graph output, under its name) to ``residual``, remove ``doomed``."""
    residual.type, residual.shape = last.output.type, last.output.shape
    graph.insert_before(last.residual_add, new_nodes)
    old_output = last.output
    output_name = old_output.name if old_output.is_graph_output() else None
    ir.convenience.replace_all_uses_with(old_output, residual, replace_graph_outputs=True)
    graph.remove(list(doomed), safe=True)
    if output_name is not None:
        old_output.name = None
        residual.name = output_name


def wide_hidden(emit: Emitter, members: Sequence[FFNBlock], unit_norm: ir.Value, gains: list[np.ndarray],
                pad: int = 0) -> ir.Value:
    """The members' hidden activations side by side, ``act(u·G*) ⊙ (u·U*)`` (or ``act(u·U*)``), each
    member's gain folded into its own columns; ``pad`` zero columns at the end."""
    first, prefix, dtype = members[0], emit.prefix, emit.dtype
    # Weights are computed when saved, a block of rows at a time (models larger than RAM).
    up = register(emit.graph, FoldedColumns([m.up for m in members], gains, dtype, f"{prefix}.up_proj.weight", pad))
    up_out = emit.linear(unit_norm, up, folded_bias(members, "up", dtype, f"{prefix}.up_proj.bias", pad), "up_proj")
    if first.kind != "gated":
        return emit.activate(up_out, first.activation)
    gate_weights = [m.gate for m in members if m.gate is not None]  # check_fusable: all gated alike
    gate = register(emit.graph, FoldedColumns(gate_weights, gains, dtype, f"{prefix}.gate_proj.weight", pad))
    gate_out = emit.linear(unit_norm, gate, folded_bias(members, "gate", dtype, f"{prefix}.gate_proj.bias", pad),
                           "gate_proj")
    return emit.add("Mul", [emit.activate(gate_out, first.activation), up_out], "gated")


def shared_gain(members: Sequence[FFNBlock], gains: list[np.ndarray]) -> np.ndarray | None:
    """For members whose weights are block-quantized (:mod:`.nbits`): a gain the fused norm applies
    itself, the members' mean, so that only each member's gain *relative* to it is folded into weights
    that are requantised. Norm gains have outlier channels common to all layers; folded whole they
    would set the scale of every quantization block they fall in. None for float weights (all folded)."""
    if not any(m.up.value.meta.get(nbits.DEQUANTIZED_META) for m in members):
        return None
    mean = np.mean(gains, axis=0)
    return np.where(np.abs(mean) > 1e-6, mean, 1.0).astype(np.float32)


def unit_gain_norm(first: FFNBlock, emitter: Emitter, doomed: dict[ir.Node, None],
                   shared: np.ndarray | None = None) -> ir.Value:
    """``x / rms(x)`` (times ``shared`` when given): reuse the first member's decomposed norm up to
    its gain Mul, or emit the norm op again with a ones (or ``shared``) gain."""
    return unit_norm(first.norm, first.dtype, emitter, doomed, shared)


def unit_norm(norm: Norm, weights_dtype: ir.DataType, emitter: Emitter, doomed: dict[ir.Node, None],
              shared: np.ndarray | None = None) -> ir.Value:
    """:func:`unit_gain_norm` of any matched norm (an FFN's or an attention branch's)."""
    unit = _unit_gain_norm(norm, emitter, doomed, shared, weights_dtype)
    if norm.output_casts:  # computed in float32 up to the gain: cast as the members did
        unit = emitter.add("Cast", [unit], "norm_cast", to=attribute(norm.output_casts[0], "to"))
    return unit


def _unit_gain_norm(norm: Norm, emitter: Emitter, doomed: dict[ir.Node, None], shared: np.ndarray | None,
                    weights_dtype: ir.DataType) -> ir.Value:
    kept = [node for node in norm.nodes if node not in norm.output_casts]
    if norm.unit_output is not None:  # decomposed: keep the nodes up to the unit-gain value
        for node in kept:
            if node is not norm.gain_node and node is not norm.bias_node:
                doomed.pop(node, None)
        if shared is None:
            return norm.unit_output
        # in the dtype the gain multiplies in (float32 where the norm casts after its gain)
        dtype = norm.gain.const_value.dtype if norm.gain is not None and norm.gain.const_value is not None else weights_dtype
        gain = emitter.constant(shared.astype(dtype.numpy()), "norm.shared_weight")
        return emitter.add("Mul", [norm.unit_output, gain], "norm_shared_gain")
    op_node = kept[0]
    for node in kept[1:]:  # the Casts feeding the norm op stay
        doomed.pop(node, None)
    assert norm.gain is not None  # a norm without a gain takes the unit-norm path above
    gain_tensor = norm.gain.const_value
    assert gain_tensor is not None
    weights = np.ones(tuple(gain_tensor.shape.numpy()), np.float32) if shared is None else shared
    ones = emitter.constant(weights.astype(gain_tensor.dtype.numpy()), "norm.unit_weight")
    node = ir.Node(op_node.domain, op_node.op_type, [op_node.inputs[0], ones],
                   attributes=list(op_node.attributes.values()), name=f"{emitter.prefix}/norm", num_outputs=1)
    node.outputs[0].name = f"{emitter.prefix}/norm_output"
    emitter.nodes.append(node)
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
            part += const_float32(member.norm.bias) @ weight.numpy_in_out().astype(np.float32)
        if (bias := getattr(member, f"{which}_bias")) is not None:
            part += const_float32(bias)
        parts.append(part)
    parts.append(np.zeros(pad, np.float32))
    return ir.tensor(np.concatenate(parts).astype(dtype.numpy()), name=name)


def pre_norm_gain(member: FFNBlock) -> np.ndarray:
    """The member's input-norm gain as float32 (ones when the norm has none)."""
    if member.norm.gain is None:
        return np.ones(member.hidden, np.float32)
    return const_float32(member.norm.gain)


def const_float32(value: ir.Value) -> np.ndarray:
    """A matched constant (gain, bias) as float32; the matchers only return values that have one."""
    assert value.const_value is not None, f"{value.name} has no constant value"
    return value.const_value.numpy().astype(np.float32)
