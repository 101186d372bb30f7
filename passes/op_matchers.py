"""Structural matchers for the pieces of a pre-norm FFN branch: activations, linear layers, and
the value helpers every matcher walks with (norms: :mod:`.norm_matchers`).

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


def attribute(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


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
    if split is None or split.inputs[0] is None or attribute(split, "axis", 0) not in (-1, 2):
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
        if attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0 or attribute(node, "beta", 1.0) != 1.0:
            return None
        weight = initializer_of(node.inputs[1])
        bias = initializer_of(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if weight is None or (len(node.inputs) > 2 and node.inputs[2] is not None and bias is None):
            return None
        return Linear(a, Weight(weight, bool(attribute(node, "transB", 0))), (node,), bias)
    b = node.inputs[1]
    weight = initializer_of(b)
    if weight is not None and const_rank(weight) == 2:
        return Linear(a, Weight(weight, transposed=False), (node,))
    transpose = producer(b, "Transpose")
    if transpose is None or b is None:
        return None
    weight = initializer_of(transpose.inputs[0])
    if weight is not None and const_rank(weight) == 2:
        if list(attribute(transpose, "perm", [1, 0])) == [1, 0] and len(b.uses()) == 1:
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
        kind = GELU_KINDS.get(attribute(node, "approximate", "none"))
        if kind is not None and node.inputs[0] is not None:
            return kind, node.inputs[0], (node,)
    return elementwise.match_decomposed_activation(value)


def match_silu(value: ir.Value) -> tuple[ir.Value, tuple[ir.Node, ...]] | None:
    """``value = silu(g)``: returns ``(g, nodes)``."""
    node = producer(value)
    if node is None:
        return None
    if node.op_type in SILU_OP_TYPES and attribute(node, "alpha", 1.0) == 1.0 and node.inputs[0] is not None:
        return node.inputs[0], (node,)
    if node.op_type != "Mul":
        return None
    for gate, other in (node.inputs, reversed(node.inputs)):
        sigmoid = producer(other, "Sigmoid")
        if sigmoid is not None and gate is not None and sigmoid.inputs[0] is gate:
            return gate, (node, sigmoid)
    return None
