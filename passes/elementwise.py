"""Elementwise ONNX subgraphs evaluated with numpy: folded when their inputs are constants
(:mod:`.constant_folding`), recognised as an activation when they have one variable input.

Older exporters write activations out (opset < 20 has no ``Gelu`` op) and leave parameter
arithmetic in the graph; both are small chains of the ops in :data:`ELEMENTWISE`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

_erf = np.vectorize(math.erf)

ELEMENTWISE: dict[str, Callable[..., Any]] = {
    "Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "Div": np.divide, "Pow": np.power,
    "Tanh": np.tanh, "Sigmoid": lambda x: 1 / (1 + np.exp(-x)), "Sqrt": np.sqrt, "Neg": np.negative,
    "Exp": np.exp, "Reciprocal": np.reciprocal, "Cast": lambda x: x, "Identity": lambda x: x, "Erf": _erf,
}
# The activations an FFN may use, by the kind names the passes use (the fusion writes them back).
ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "silu": lambda x: x / (1 + np.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
}
_PROBE = np.linspace(-4.0, 4.0, 41)
_MAX_DECOMPOSED_NODES = 16


def constant_tensor(value: ir.Value) -> ir.TensorProtocol | None:
    """The constant behind ``value`` (an initializer or a ``Constant`` node), read without changing
    anything: onnx-ir's ``get_const_tensor`` names a ``Constant`` node's tensor after its output,
    which would make reading a model (:func:`~.blocks.find_blocks`) rewrite its bytes."""
    node = value.producer() if value.const_value is None else None
    if node is not None and node.op_type == "Constant" and node.domain == "" and len(node.attributes) == 1:
        attribute = next(iter(node.attributes.values()))
        if attribute.name == "value" and not attribute.is_ref():
            return attribute.as_tensor()
    return ir.convenience.get_const_tensor(value)


def _scalar(value: ir.Value | None) -> float | None:
    tensor = constant_tensor(value) if value is not None else None
    return float(tensor.numpy().reshape(())) if tensor is not None and tensor.size == 1 else None


def _is_constant(value: ir.Value) -> bool:
    return constant_tensor(value) is not None


def match_decomposed_activation(value: ir.Value) -> tuple[str, ir.Value, tuple[ir.Node, ...]] | None:
    """``value = act(g)`` written out in elementwise ops with scalar constants (GELU's tanh and erf
    forms from the legacy exporter, SiLU as ``x·Sigmoid(x)``, in any order): the subgraph is
    evaluated on probe values of ``g`` and compared with each activation — the math decides, not
    the shape of the chain. Returns ``(kind, g, nodes)``."""
    nodes: list[ir.Node] = []
    variables: set[ir.Value] = set()
    pending = [value]
    while pending:
        current = pending.pop()
        node = current.producer()
        if node is None or node.op_type not in ELEMENTWISE or node.domain not in ("", "ai.onnx") \
                or len(node.outputs) != 1 \
                or any(v is not None and _is_constant(v) and _scalar(v) is None for v in node.inputs):
            variables.add(current)  # a leaf: the activation's input
            continue
        if node in nodes:
            continue
        nodes.append(node)
        if len(nodes) > _MAX_DECOMPOSED_NODES:
            return None
        pending.extend(v for v in node.inputs if v is not None and not _is_constant(v))
    if len(variables) != 1 or not nodes or value in variables:
        return None
    (g,) = variables
    computed = {g: _PROBE}
    with np.errstate(all="ignore"):
        for node in reversed(_consumers_first(nodes)):
            args = [computed[v] if v in computed else _scalar(v) for v in node.inputs]
            computed[node.outputs[0]] = ELEMENTWISE[node.op_type](*args)
    result = computed.get(value)
    for kind, function in ACTIVATIONS.items():
        if result is not None and np.allclose(result, function(_PROBE), rtol=1e-5, atol=1e-6):
            return kind, g, tuple(nodes)
    return None


def _consumers_first(nodes: list[ir.Node]) -> list[ir.Node]:
    """``nodes`` ordered so each comes before the nodes it reads from (reversed: evaluation order)."""
    inside = set(nodes)
    order: list[ir.Node] = []
    placed: set[ir.Node] = set()

    def visit(node: ir.Node) -> None:
        if node in placed:
            return
        placed.add(node)
        for use in (u for out in node.outputs for u in out.uses()):
            if use.node in inside:
                visit(use.node)
        order.append(node)

    for node in nodes:
        visit(node)
    return order
