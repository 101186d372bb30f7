"""Structural matchers for the pieces of a pre-norm FFN branch: norms, activations, linear layers.

Each matcher starts from a value and walks *producers* backwards, so it recognises the math rather
than one exporter's node names. What the exporters we know emit:

* RMSNorm ``n(x) = x / sqrt(mean(x²) + eps) * s`` as
  - dynamo opset 18-22: ``Mul(s, Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2)), eps)))))``;
  - legacy TorchScript: the same with ``Div(1, Sqrt(..))`` and Casts to/from float32;
  - opset 23: one ``RMSNormalization(x, s)``; ORT contrib: ``SimplifiedLayerNormalization(x, s)``.
* LayerNorm ``n(x) = unit(x)·s + β`` as one ``LayerNormalization(x, s, β)``.
* SiLU as ``Mul(g, Sigmoid(g))`` or a ``Silu``/``Swish`` op; GELU (exact or tanh) as a ``Gelu`` op.
* Linear layers as ``MatMul(a, W[in, out])``, ``MatMul(a, Transpose(W[out, in]))`` or
  ``Gemm(a, W, transB=1)``.

A matcher returns a small dataclass, or ``None`` when the structure does not fit; callers turn a
``None`` into a message that says what was expected.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from ffnfusion.core.errors import InvalidPlanError
from ffnfusion.passes import elementwise, nbits

RMS_OP_TYPES = {"RMSNormalization", "SimplifiedLayerNormalization"}
NORM_OP_TYPES = RMS_OP_TYPES | {"LayerNormalization"}
SILU_OP_TYPES = {"Silu", "Swish"}


@dataclasses.dataclass(frozen=True)
class Weight:
    """A constant weight and how the graph applies it."""

    value: ir.Value
    transposed: bool  # stored [out, in] (Transpose or Gemm transB=1) rather than [in, out]

    @property
    def name(self) -> str:
        return self.value.name or "<unnamed>"

    @property
    def tensor(self) -> ir.TensorProtocol:
        tensor = self.value.const_value
        assert tensor is not None, f"weight {self.name} has no constant value"  # matchers only make constant ones
        return tensor

    @property
    def shape_in_out(self) -> tuple[int, int]:
        rows, cols = self.tensor.shape.numpy()
        return (cols, rows) if self.transposed else (rows, cols)

    def numpy_in_out(self) -> np.ndarray:
        """The weight as ``[in, out]`` (a view of the memory-mapped tensor when possible)."""
        array = self.tensor.numpy()
        return array.T if self.transposed else array

    def set_in_out(self, array: np.ndarray) -> None:
        """New values, given as ``[in, out]``, stored in the weight's own dtype and layout under its
        name (the one place a pass or a refit writes a weight's values)."""
        shape = self.shape_in_out
        if tuple(array.shape) != shape:
            raise InvalidPlanError(f"new values of shape {tuple(array.shape)} do not fit {self.name} {shape} ([in, out])")
        stored = np.ascontiguousarray(array.T if self.transposed else array).astype(self.tensor.dtype.numpy())
        self.value.const_value = ir.tensor(stored, name=self.value.name)


@dataclasses.dataclass(frozen=True)
class Linear:
    input: ir.Value
    weight: Weight
    nodes: tuple[ir.Node, ...]
    bias: ir.Value | None = None  # 1-D initializer added to the product


@dataclasses.dataclass(frozen=True)
class Norm:
    """An RMSNorm or LayerNorm applied to the residual stream value ``x``."""

    # "rms_decomposed" | "RMSNormalization" | "SimplifiedLayerNormalization" | "LayerNormalization"
    # | "layernorm_decomposed" (exports below opset 17)
    kind: str
    epsilon: float
    gain: ir.Value | None  # 1-D initializer ``s``; None when the norm has no gain
    # (LayerNorm only) 1-D initializer ``β``: n(x) = unit(x)·s + β
    output: ir.Value  # n(x), what the FFN's gate/up MatMuls read
    # The unit-gain value x/rms(x) the gain multiplies (decomposed kind only): a fused group
    # keeps the first member's nodes up to here and drops the gain Mul.
    unit_output: ir.Value | None
    nodes: tuple[ir.Node, ...]
    gain_node: ir.Node | None = None
    bias: ir.Value | None = None
    bias_node: ir.Node | None = None  # decomposed LayerNorm: the Add of β

    @property
    def centered(self) -> bool:
        """A LayerNorm (the mean is subtracted first), not an RMSNorm."""
        return self.kind in ("LayerNormalization", "layernorm_decomposed")


def const_rank(value: ir.Value | None) -> int | None:
    """The rank of a constant value's tensor (None when ``value`` is not constant)."""
    tensor = value.const_value if value is not None else None
    return tensor.shape.rank() if tensor is not None else None


def initializer_of(value: ir.Value | None) -> ir.Value | None:
    """The initializer behind ``value``, following Identity nodes (the TorchScript exporter
    deduplicates equal initializers through them); None if ``value`` is not constant."""
    while value is not None and value.const_value is None:
        node = producer(value, "Identity")
        value = node.inputs[0] if node is not None else None
    return value


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind an initializer or a ``Constant`` node, else None."""
    if value is None:
        return None
    tensor = elementwise.constant_tensor(value)
    return None if tensor is None else tensor.numpy()


def float32_epsilon(value: float) -> float:
    """Epsilons live in float32 tensors/attributes: print 1e-06, not 9.999999974752427e-07."""
    return float(str(np.float32(value)))


def const_scalar(value: ir.Value | None) -> float | None:
    array = const_array(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def producer(value: ir.Value | None, op_types: set[str] | str | None = None) -> ir.Node | None:
    """The node producing ``value``, if its op type is among ``op_types``."""
    node = value.producer() if value is not None else None
    if node is None:
        return None
    if op_types is not None:
        wanted = {op_types} if isinstance(op_types, str) else op_types
        if node.op_type not in wanted:
            return None
    return node


def skip_casts(value: ir.Value | None, seen: list[ir.Node] | None = None) -> ir.Value | None:
    """Walk back through Cast/Identity nodes (exporters insert them around norms)."""
    while (node := producer(value, {"Cast", "Identity"})) is not None:
        if seen is not None:
            seen.append(node)
        value = node.inputs[0]
    return value


def reaches(value: ir.Value | None, target: ir.Value, seen: list[ir.Node] | None = None) -> bool:
    """Whether ``value`` is ``target`` or a chain of Casts/Identities of it."""
    casts: list[ir.Node] = []
    while value is not target:
        node = producer(value, {"Cast", "Identity"})  # None for value None too
        if node is None:
            return False
        casts.append(node)
        value = node.inputs[0]
    if seen is not None:
        seen.extend(casts)
    return True


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _is_last_axis_reduction(node: ir.Node) -> bool:
    if _attr(node, "keepdims", 1) != 1:
        return False
    axes = _attr(node, "axes")
    if axes is None and len(node.inputs) > 1:
        axes = const_array(node.inputs[1])
        axes = None if axes is None else axes.reshape(-1).tolist()
    if axes is None or len(axes) != 1:
        return False
    data = node.inputs[0]
    rank = data.shape.rank() if data is not None and data.shape is not None else None
    return axes[0] == -1 or (rank is not None and axes[0] == rank - 1)


def match_linear(value: ir.Value | None) -> Linear | None:
    """``value = a @ W (+ b)`` with W, b constant: MatMul (optionally via Transpose), then an
    optional bias Add, or Gemm (transB=1, optional bias C). None for an absent (optional) input."""
    if value is None:
        return None
    add = producer(value, "Add")
    if add is not None:
        for product, bias in (add.inputs, reversed(add.inputs)):
            bias_init = initializer_of(bias)
            if const_rank(bias_init) != 1:
                continue
            linear = _match_unbiased_linear(product)
            if linear is not None and product is not None and len(product.uses()) == 1:
                return dataclasses.replace(linear, nodes=(*linear.nodes, add), bias=bias_init)
        return None
    split = _match_split_linear(value)
    return split if split is not None else _match_unbiased_linear(value)


def _match_split_linear(value: ir.Value) -> Linear | None:
    """``value`` = one output of ``Split(a @ W (+ b), axis=-1)``: the linear layer of its columns
    (ORT GenAI's ``fuse_mlp_gate_up`` computes gate and up as one MatMul, then splits)."""
    split = producer(value, "Split")
    if split is None or split.inputs[0] is None or _attr(split, "axis", 0) not in (-1, 2):
        return None
    cached = split.meta.get("ffnfusion.split_linears")
    if cached is None:
        whole = match_linear(split.inputs[0])
        if whole is None:
            return None
        width = whole.weight.shape_in_out[1]
        given = const_array(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
        sizes = [int(n) for n in given] if given is not None else [width // len(split.outputs)] * len(split.outputs)
        if sum(sizes) != width:
            return None
        start = 0
        cached = {}
        for output, size in zip(split.outputs, sizes):
            cached[output] = Linear(whole.input, _column_slice(whole.weight, start, start + size),
                                    (split, *whole.nodes), _bias_slice(whole.bias, start, start + size))
            start += size
        split.meta["ffnfusion.split_linears"] = cached
    return cached.get(value)


def _column_slice(weight: Weight, start: int, stop: int) -> Weight:
    """Columns ``start:stop`` of ``weight`` as ``[in, out]`` (read when needed)."""
    rows = weight.shape_in_out[0]
    tensor = weight.tensor
    name = f"{weight.name}[:, {start}:{stop}]"
    lazy = ir.LazyTensor(lambda: ir.tensor(np.ascontiguousarray(weight.numpy_in_out()[:, start:stop])),
                         dtype=tensor.dtype, shape=ir.Shape([rows, stop - start]), cache=True, name=name)
    value = ir.Value(name=name, const_value=lazy)
    value.meta.update(weight.value.meta)  # e.g. that it was dequantised from 4-bit blocks
    return Weight(value, transposed=False)


def _bias_slice(bias: ir.Value | None, start: int, stop: int) -> ir.Value | None:
    if bias is None or bias.const_value is None:
        return None
    tensor = bias.const_value
    name = f"{bias.name}[{start}:{stop}]"
    return ir.Value(name=name, const_value=ir.LazyTensor(lambda: ir.tensor(tensor.numpy()[start:stop]), dtype=tensor.dtype,
                                                         shape=ir.Shape([stop - start]), cache=True, name=name))


def _match_unbiased_linear(value: ir.Value | None) -> Linear | None:
    node = producer(value, {"MatMul", "Gemm", "MatMulNBits"})
    if node is None or node.inputs[0] is None:
        return None
    a = node.inputs[0]
    if node.op_type == "MatMulNBits":  # 4-bit blocks: the weight as a lazily dequantised [K, N] tensor
        weight = nbits.dequantized_weight(node)
        has_bias = len(node.inputs) > 5 and node.inputs[5] is not None
        return None if weight is None or has_bias else Linear(a, Weight(weight, transposed=False), (node,))
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
            return None
        weight = initializer_of(node.inputs[1])
        bias = initializer_of(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if weight is None or (len(node.inputs) > 2 and node.inputs[2] is not None and bias is None):
            return None
        return Linear(a, Weight(weight, bool(_attr(node, "transB", 0))), (node,), bias)
    b = node.inputs[1]
    weight = initializer_of(b)
    if weight is not None and const_rank(weight) == 2:
        return Linear(a, Weight(weight, transposed=False), (node,))
    transpose = producer(b, "Transpose")
    if transpose is None or b is None:
        return None
    weight = initializer_of(transpose.inputs[0])
    if weight is not None and const_rank(weight) == 2:
        if list(_attr(transpose, "perm", [1, 0])) == [1, 0] and len(b.uses()) == 1:
            return Linear(a, Weight(weight, transposed=True), (node, transpose))
    return None


# Activation kinds and the ONNX op ffnfusion emits for each in a fused block.
GELU_KINDS = {"none": "gelu", "tanh": "gelu_tanh"}


def match_activation(value: ir.Value | None) -> tuple[str, ir.Value, tuple[ir.Node, ...]] | None:
    """``value = act(g)`` for SiLU (``g·sigmoid(g)``, ``Silu``/``Swish``) or GELU (``Gelu`` op, exact
    or tanh): returns ``(kind, g, nodes)`` with kind ``silu`` | ``gelu`` | ``gelu_tanh``."""
    if value is None:
        return None
    silu = match_silu(value)
    if silu is not None:
        return "silu", *silu
    node = producer(value, "Gelu")
    if node is not None and node.domain in ("", "ai.onnx"):
        kind = GELU_KINDS.get(_attr(node, "approximate", "none"))
        if kind is not None and node.inputs[0] is not None:
            return kind, node.inputs[0], (node,)
    return elementwise.match_decomposed_activation(value)


def match_silu(value: ir.Value) -> tuple[ir.Value, tuple[ir.Node, ...]] | None:
    """``value = silu(g)``: returns ``(g, nodes)``."""
    node = producer(value)
    if node is None:
        return None
    if node.op_type in SILU_OP_TYPES and _attr(node, "alpha", 1.0) == 1.0 and node.inputs[0] is not None:
        return node.inputs[0], (node,)
    if node.op_type != "Mul":
        return None
    for gate, other in (node.inputs, reversed(node.inputs)):
        sigmoid = producer(other, "Sigmoid")
        if sigmoid is not None and gate is not None and sigmoid.inputs[0] is gate:
            return gate, (node, sigmoid)
    return None


def match_norm(output: ir.Value, x: ir.Value) -> Norm | None:
    """``output = RMSNorm(x)`` in any of the encodings listed in the module docstring, or
    ``LayerNormalization(x, s, β)``."""
    node = producer(output)
    if node is None:
        return None
    if node.op_type in NORM_OP_TYPES and node.outputs[0] is output:
        casts: list[ir.Node] = []
        if not reaches(node.inputs[0], x, casts) or _attr(node, "axis", -1) != -1:
            return None
        gain = initializer_of(node.inputs[1]) if len(node.inputs) > 1 else None
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        bias = initializer_of(node.inputs[2]) if has_bias else None
        if gain is None or (has_bias and bias is None):
            return None
        return Norm(node.op_type, float32_epsilon(_attr(node, "epsilon", 1e-5)), gain, output, None,
                    (node, *casts), bias=bias)
    layernorm = _match_decomposed_layernorm(output, x)
    if layernorm is not None:
        return layernorm
    # Optional gain: Mul(s, y) with s a 1-D constant.
    if node.op_type == "Mul":
        for gain_input, unit in (node.inputs, reversed(node.inputs)):
            gain = initializer_of(gain_input)
            if const_rank(gain) == 1 and unit is not None:
                core = _match_rms_core(unit, x)
                if core is not None:
                    epsilon, nodes = core
                    return Norm("rms_decomposed", epsilon, gain, output, unit, (*nodes, node), node)
    core = _match_rms_core(output, x)
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


def _match_rms_core(value: ir.Value, x: ir.Value) -> tuple[float, tuple[ir.Node, ...]] | None:
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
