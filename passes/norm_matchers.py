"""Structural matchers for norms of the residual stream: ``match_norm(output, x) -> Norm | None``.

RMSNorm ``n(x) = x / sqrt(mean(x²) + eps) * s`` as the dynamo exporter writes it at opset 18-22
(``Mul(s, Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2)), eps)))))``), the legacy TorchScript
form (``Div(1, Sqrt(..))`` and Casts to and from float32), one ``RMSNormalization`` (opset 23) or
``SimplifiedLayerNormalization`` (ORT contrib); LayerNorm ``unit(x)·s + β`` as one
``LayerNormalization`` or decomposed (exports below opset 17). Walks producers backwards like the
other matchers (:mod:`.op_matchers`).
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from ffnfusion.passes.op_matchers import (
    attribute,
    const_array,
    const_rank,
    const_scalar,
    float32_epsilon,
    initializer_of,
    producer,
    reaches,
    skip_casts,
)

RMS_OP_TYPES = {"RMSNormalization", "SimplifiedLayerNormalization"}
NORM_OP_TYPES = RMS_OP_TYPES | {"LayerNormalization"}


@dataclasses.dataclass(frozen=True)
class Norm:
    """An RMSNorm or LayerNorm applied to the residual stream value ``x``."""

    # "rms_decomposed" | "RMSNormalization" | "SimplifiedLayerNormalization" | "LayerNormalization"
    # | "layernorm_decomposed" (exports below opset 17)
    kind: str
    epsilon: float
    # 1-D initializer ``s`` (a grouped post-norm, see post_norm_fusion: the members' gains stacked
    # [k, 1, H]); None when the norm has no gain
    gain: ir.Value | None
    output: ir.Value  # n(x), what the FFN's gate/up MatMuls read
    # The unit-gain value x/rms(x) the gain multiplies (decomposed kind only): a fused group
    # keeps the first member's nodes up to here and drops the gain Mul.
    unit_output: ir.Value | None
    nodes: tuple[ir.Node, ...]
    gain_node: ir.Node | None = None
    bias: ir.Value | None = None  # (LayerNorm only) 1-D initializer ``β``: n(x) = unit(x)·s + β
    bias_node: ir.Node | None = None  # decomposed LayerNorm: the Add of β
    # Casts *after* the gain (Gemma computes its norm in float32, gain included, then casts to the
    # weights' dtype); ``output`` is the last one's output. A fused group casts its unit norm the same.
    output_casts: tuple[ir.Node, ...] = ()

    @property
    def centered(self) -> bool:
        """A LayerNorm (the mean is subtracted first), not an RMSNorm."""
        return self.kind in ("LayerNormalization", "layernorm_decomposed")


def match_norm(output: ir.Value, x: ir.Value) -> Norm | None:
    """``output = RMSNorm(x)`` in any of the encodings listed in the module docstring, or
    ``LayerNormalization(x, s, β)``; either one possibly cast after its gain."""
    norm = _match_uncast_norm(output, x)
    if norm is not None or producer(output, "Cast") is None:
        return norm
    casts: list[ir.Node] = []
    inner = skip_casts(output, casts)
    norm = _match_uncast_norm(inner, x) if inner is not None else None
    if norm is None:
        return None
    return dataclasses.replace(norm, output=output, nodes=(*norm.nodes, *casts), output_casts=tuple(casts))


def _match_uncast_norm(output: ir.Value, x: ir.Value) -> Norm | None:
    node = producer(output)
    if node is None:
        return None
    if node.op_type in NORM_OP_TYPES and node.outputs[0] is output:
        casts: list[ir.Node] = []
        if not reaches(node.inputs[0], x, casts) or attribute(node, "axis", -1) != -1:
            return None
        gain = initializer_of(node.inputs[1]) if len(node.inputs) > 1 else None
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        bias = initializer_of(node.inputs[2]) if has_bias else None
        if gain is None or (has_bias and bias is None):
            return None
        return Norm(node.op_type, float32_epsilon(attribute(node, "epsilon", 1e-5)), gain, output, None,
                    (node, *casts), bias=bias)
    layernorm = _match_decomposed_layernorm(output, x)
    if layernorm is not None:
        return layernorm
    # Optional gain: Mul(s, y) with s a 1-D constant.
    if node.op_type == "Mul":
        for gain_input, unit in (node.inputs, reversed(node.inputs)):
            gain = initializer_of(gain_input)
            if const_rank(gain) == 1 and unit is not None:
                core = match_rms_core(unit, x)
                if core is not None:
                    epsilon, nodes = core
                    return Norm("rms_decomposed", epsilon, gain, output, unit, (*nodes, node), node)
    core = match_rms_core(output, x)
    if core is not None:
        return Norm("rms_decomposed", core[0], None, output, output, core[1])
    return None


def _with_vector(value: ir.Value, op_type: str) -> tuple[ir.Value | None, ir.Node | None, ir.Value]:
    """``value = op(other, v)`` with ``v`` a 1-D constant: ``(v, node, other)``; else ``(None, None, value)``."""
    node = producer(value, op_type)
    if node is not None:
        for other, constant in (node.inputs, reversed(node.inputs)):
            if const_rank(initializer_of(constant)) == 1 and other is not None:
                return initializer_of(constant), node, other
    return None, None, value


def _match_decomposed_layernorm(output: ir.Value, x: ir.Value) -> Norm | None:
    """``output = (c / sqrt(mean(c²) + eps))·s + β`` with ``c = x − mean(x)`` (gain and bias
    optional), as the legacy exporter writes LayerNorm below opset 17."""
    bias, bias_node, value = _with_vector(output, "Add")
    gain, gain_node, value = _with_vector(value, "Mul")
    casts: list[ir.Node] = []
    div = producer(skip_casts(value, casts), "Div")
    if div is None:
        return None
    centered, sub = div.inputs[0], producer(div.inputs[0], "Sub")
    mean = producer(sub.inputs[1], "ReduceMean") if sub is not None else None
    if sub is None or mean is None or mean.inputs[0] is not sub.inputs[0] or not _is_last_axis_reduction(mean) \
            or not reaches(sub.inputs[0], x, casts):
        return None
    sqrt = producer(div.inputs[1], "Sqrt")
    add = producer(sqrt.inputs[0], "Add") if sqrt is not None else None
    if add is None:
        return None
    for variance_value, eps_value in (add.inputs, reversed(add.inputs)):
        epsilon, variance = const_scalar(eps_value), producer(variance_value, "ReduceMean")
        if epsilon is None or variance is None or not _is_last_axis_reduction(variance):
            continue
        square = producer(variance.inputs[0], {"Pow", "Mul"})
        if square is None:
            return None
        squared_is_centered = square.inputs[0] is centered and (
            const_scalar(square.inputs[1]) == 2.0 if square.op_type == "Pow" else square.inputs[1] is centered)
        if not squared_is_centered:
            return None
        assert sqrt is not None  # add was found through it
        nodes: tuple[ir.Node, ...] = (*casts, sub, mean, square, variance, add, sqrt, div,
                                      *(n for n in (gain_node, bias_node) if n is not None))
        return Norm("layernorm_decomposed", float32_epsilon(epsilon), gain, output, div.outputs[0], nodes,
                    gain_node, bias, bias_node)
    return None


def match_rms_core(value: ir.Value, x: ir.Value) -> tuple[float, tuple[ir.Node, ...]] | None:
    """``value = x / sqrt(mean(x², -1) + eps)`` (through Casts): returns ``(eps, nodes)``."""
    nodes: list[ir.Node] = []
    scaled = producer(skip_casts(value, nodes), {"Mul", "Div"})
    if scaled is None:
        return None
    nodes.append(scaled)
    sqrt = None
    for data, scale in (scaled.inputs, reversed(scaled.inputs)):
        if not reaches(data, x, nodes):
            continue
        if scaled.op_type == "Div":
            if data is scaled.inputs[0]:
                sqrt = producer(scale, "Sqrt")
            break
        inverse = producer(scale, {"Reciprocal", "Div"})
        if inverse is None:
            continue
        if inverse.op_type == "Div" and const_scalar(inverse.inputs[0]) != 1.0:
            continue
        nodes.append(inverse)
        sqrt = producer(inverse.inputs[-1], "Sqrt")
        break
    if sqrt is None:
        return None
    add = producer(sqrt.inputs[0], "Add")
    if add is None:
        return None
    nodes += [sqrt, add]
    for mean_value, eps_value in (add.inputs, reversed(add.inputs)):
        epsilon = const_scalar(eps_value)
        mean = producer(mean_value, "ReduceMean")
        if epsilon is None or mean is None or not _is_last_axis_reduction(mean):
            continue
        square = producer(mean.inputs[0], {"Pow", "Mul"})
        if square is None:
            return None
        base = square.inputs[0]
        if square.op_type == "Pow" and const_scalar(square.inputs[1]) != 2.0:
            return None
        if square.op_type == "Mul" and square.inputs[1] is not base:
            return None
        if not reaches(base, x, nodes):
            return None
        return float32_epsilon(epsilon), tuple(dict.fromkeys((*nodes, mean, square)))  # a shared Cast counts once
    return None


def _is_last_axis_reduction(node: ir.Node) -> bool:
    if attribute(node, "keepdims", 1) != 1:
        return False
    axes = attribute(node, "axes")
    if axes is None and len(node.inputs) > 1:
        axes = const_array(node.inputs[1])
        axes = None if axes is None else axes.reshape(-1).tolist()
    if axes is None or len(axes) != 1:
        return False
    data = node.inputs[0]
    rank = data.shape.rank() if data is not None and data.shape is not None else None
    return axes[0] == -1 or (rank is not None and axes[0] == rank - 1)
