"""Hand-built graphs for each encoding the matchers claim to read, and near-misses they must refuse."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from ffnfusion.passes import norm_matchers, op_matchers

HIDDEN, WIDTH = 4, 6


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _graph() -> tuple[ir.Graph, ir.Value]:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", "seq", HIDDEN]))
    return ir.Graph([x], [], nodes=[], opset_imports={"": 20}), x


def _node(graph: ir.Graph, op: str, inputs, name: str, **attributes) -> ir.Value:
    node = ir.node(op, inputs, attributes=attributes, name=name)
    graph.append(node)
    return node.outputs[0]


W_IN_OUT = np.arange(HIDDEN * WIDTH, dtype=np.float32).reshape(HIDDEN, WIDTH)


def test_matmul_with_weight_in_out():
    graph, x = _graph()
    y = _node(graph, "MatMul", [x, _initializer(graph, "w", W_IN_OUT)], "mm")
    linear = op_matchers.match_linear(y)
    assert linear is not None and linear.input is x and not linear.weight.transposed
    np.testing.assert_array_equal(linear.weight.numpy_in_out(), W_IN_OUT)


def test_matmul_of_a_transposed_weight():
    graph, x = _graph()
    w = _initializer(graph, "w_out_in", np.ascontiguousarray(W_IN_OUT.T))
    y = _node(graph, "MatMul", [x, _node(graph, "Transpose", [w], "t", perm=[1, 0])], "mm")
    linear = op_matchers.match_linear(y)
    assert linear is not None and linear.weight.transposed and len(linear.nodes) == 2
    assert linear.weight.shape_in_out == (HIDDEN, WIDTH)
    np.testing.assert_array_equal(linear.weight.numpy_in_out(), W_IN_OUT)


@pytest.mark.parametrize("transposed", [False, True])
def test_set_in_out_keeps_name_dtype_and_layout(transposed):
    from ffnfusion.core.errors import InvalidPlanError

    graph, x = _graph()
    stored = np.ascontiguousarray(W_IN_OUT.T if transposed else W_IN_OUT).astype(np.float16)
    w = _initializer(graph, "w", stored)
    y = _node(graph, "MatMul", [x, _node(graph, "Transpose", [w], "t", perm=[1, 0]) if transposed else w], "mm")
    weight = op_matchers.match_linear(y).weight
    weight.set_in_out(W_IN_OUT * 2)
    tensor = w.const_value
    assert tensor.name == "w" and tensor.dtype == ir.DataType.FLOAT16 and tensor.shape.numpy() == stored.shape
    np.testing.assert_array_equal(weight.numpy_in_out(), (W_IN_OUT * 2).astype(np.float16))
    with pytest.raises(InvalidPlanError, match=r"shape \(6, 4\) do not fit w \(4, 6\)"):
        weight.set_in_out(W_IN_OUT.T)


def test_transpose_with_another_perm_is_not_a_weight_layout():
    graph, x = _graph()
    w = _initializer(graph, "w", np.ascontiguousarray(W_IN_OUT.T))
    y = _node(graph, "MatMul", [x, _node(graph, "Transpose", [w], "t", perm=[0, 1])], "mm")
    assert op_matchers.match_linear(y) is None


def test_gemm_trans_b_with_bias():
    graph, x = _graph()
    w = _initializer(graph, "w_out_in", np.ascontiguousarray(W_IN_OUT.T))
    b = _initializer(graph, "b", np.ones(WIDTH, np.float32))
    linear = op_matchers.match_linear(_node(graph, "Gemm", [x, w, b], "gemm", transB=1))
    assert linear is not None and linear.weight.transposed and linear.bias is b
    np.testing.assert_array_equal(linear.weight.numpy_in_out(), W_IN_OUT)


@pytest.mark.parametrize("attributes", [{"transA": 1}, {"alpha": 2.0}, {"beta": 0.5}])
def test_gemm_that_is_not_a_plain_linear_layer_is_refused(attributes):
    graph, x = _graph()
    w = _initializer(graph, "w", W_IN_OUT)
    assert op_matchers.match_linear(_node(graph, "Gemm", [x, w], "gemm", **attributes)) is None


def test_matmul_by_an_activation_is_not_a_linear_layer():
    graph, x = _graph()
    assert op_matchers.match_linear(_node(graph, "MatMul", [x, x], "mm")) is None


def _rms_core(graph: ir.Graph, x: ir.Value, reciprocal: str, eps: float = 1e-5) -> ir.Value:
    square = _node(graph, "Pow", [x, _initializer(graph, "two", np.array(2.0, np.float32))], "pow")
    mean = _node(graph, "ReduceMean", [square, _initializer(graph, "axes", np.array([-1], np.int64))], "mean")
    root = _node(graph, "Sqrt", [_node(graph, "Add", [mean, _initializer(graph, "eps", np.array(eps, np.float32))],
                                        "add_eps")], "sqrt")
    if reciprocal == "Reciprocal":
        inverse = _node(graph, "Reciprocal", [root], "recip")
    else:  # the legacy TorchScript exporter: Div(1, Sqrt(.))
        inverse = _node(graph, "Div", [_initializer(graph, "one", np.array(1.0, np.float32)), root], "div")
    return _node(graph, "Mul", [x, inverse], "unit")


@pytest.mark.parametrize("reciprocal", ["Reciprocal", "Div"])
def test_decomposed_rms_norm(reciprocal):
    graph, x = _graph()
    gain = _initializer(graph, "gain", np.full(HIDDEN, 1.5, np.float32))
    output = _node(graph, "Mul", [gain, _rms_core(graph, x, reciprocal, eps=1e-6)], "scale")
    norm = norm_matchers.match_norm(output, x)
    assert norm is not None and norm.kind == "rms_decomposed" and norm.gain is gain
    assert norm.epsilon == pytest.approx(1e-6)


def test_norm_of_another_value_is_refused():
    graph, x = _graph()
    other = _node(graph, "Relu", [x], "relu")
    output = _node(graph, "Mul", [_initializer(graph, "gain", np.ones(HIDDEN, np.float32)),
                                  _rms_core(graph, other, "Reciprocal")], "scale")
    assert norm_matchers.match_norm(output, x) is None


@pytest.mark.parametrize("op", ["RMSNormalization", "LayerNormalization"])
def test_one_op_norms(op):
    graph, x = _graph()
    gain = _initializer(graph, "gain", np.ones(HIDDEN, np.float32))
    inputs = [x, gain] + ([_initializer(graph, "beta", np.zeros(HIDDEN, np.float32))] if op == "LayerNormalization" else [])
    norm = norm_matchers.match_norm(_node(graph, op, inputs, "norm", epsilon=1e-5, axis=-1), x)
    assert norm is not None and norm.kind == op and norm.epsilon == pytest.approx(1e-5)


@pytest.mark.parametrize(("build", "kind"), [
    (lambda g, x: _node(g, "Mul", [x, _node(g, "Sigmoid", [x], "sig")], "silu"), "silu"),
    (lambda g, x: _node(g, "Gelu", [x], "gelu", approximate="tanh"), "gelu_tanh"),
    (lambda g, x: _node(g, "Gelu", [x], "gelu"), "gelu"),
])
def test_activations(build, kind):
    graph, x = _graph()
    matched = op_matchers.match_activation(build(graph, x))
    assert matched is not None and matched[0] == kind and matched[1] is x


def test_product_with_the_sigmoid_of_another_value_is_not_silu():
    graph, x = _graph()
    other = _node(graph, "Relu", [x], "relu")
    assert op_matchers.match_activation(_node(graph, "Mul", [x, _node(graph, "Sigmoid", [other], "sig")], "m")) is None


def _gelu_tanh_chain(graph: ir.Graph, g: ir.Value, k: float = 0.044715) -> ir.Value:
    """0.5·g·(1 + tanh(√(2/π)·(g + k·g³))) written out, constants as Constant nodes, in torch's order."""
    def const(number, name):
        node = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(number, np.float32))}, name=name)
        graph.append(node)
        return node.outputs[0]

    cube = _node(graph, "Pow", [g, const(3.0, "three")], "pow")
    inner = _node(graph, "Add", [g, _node(graph, "Mul", [const(k, "k"), cube], "k_cube")], "inner")
    tanh = _node(graph, "Tanh", [_node(graph, "Mul", [const(float(np.sqrt(2 / np.pi)), "c"), inner], "scaled")], "tanh")
    half = _node(graph, "Mul", [g, _node(graph, "Add", [const(1.0, "one"), tanh], "bracket")], "x_bracket")
    return _node(graph, "Mul", [const(0.5, "half"), half], "gelu")


def test_decomposed_activations_are_recognised_by_their_math():
    graph, x = _graph()
    g = _node(graph, "MatMul", [x, _initializer(graph, "w", W_IN_OUT)], "gate")
    found = op_matchers.match_activation(_gelu_tanh_chain(graph, g))
    assert found is not None and found[0] == "gelu_tanh" and found[1] is g and len(found[2]) == 8
    erf = _node(graph, "Erf", [_node(graph, "Div", [g, _initializer(graph, "s2", np.array(np.sqrt(2), np.float32))], "d")], "erf")
    exact = _node(graph, "Mul", [_node(graph, "Mul", [g, _initializer(graph, "h", np.array(0.5, np.float32))], "hx"),
                                 _node(graph, "Add", [erf, _initializer(graph, "o", np.array(1.0, np.float32))], "b")], "ge")
    assert op_matchers.match_activation(exact)[0] == "gelu"


def test_a_near_miss_of_gelu_is_not_an_activation():
    graph, x = _graph()
    g = _node(graph, "MatMul", [x, _initializer(graph, "w", W_IN_OUT)], "gate")
    assert op_matchers.match_activation(_gelu_tanh_chain(graph, g, k=0.05)) is None  # not GELU's constant
    y = _node(graph, "MatMul", [x, _initializer(graph, "w2", W_IN_OUT)], "other")
    assert op_matchers.match_activation(_node(graph, "Mul", [g, y], "product")) is None  # two inputs


def test_decomposed_layernorm_with_gain_and_bias():
    graph, x = _graph()
    axes = _initializer(graph, "axes", np.array([-1], np.int64))
    mean = _node(graph, "ReduceMean", [x, axes], "mean")
    centered = _node(graph, "Sub", [x, mean], "centered")
    square = _node(graph, "Pow", [centered, _initializer(graph, "two", np.array(2.0, np.float32))], "square")
    variance = _node(graph, "ReduceMean", [square, axes], "variance")
    std = _node(graph, "Sqrt", [_node(graph, "Add", [variance, _initializer(graph, "eps", np.array(1e-5, np.float32))], "veps")], "std")
    unit = _node(graph, "Div", [centered, std], "unit")
    out = _node(graph, "Add", [_node(graph, "Mul", [unit, _initializer(graph, "s", np.ones(HIDDEN, np.float32))], "gain"),
                               _initializer(graph, "b", np.zeros(HIDDEN, np.float32))], "bias")
    norm = norm_matchers.match_norm(out, x)
    assert norm is not None and norm.kind == "layernorm_decomposed" and norm.centered
    assert norm.unit_output is unit and norm.gain.name == "s" and norm.bias.name == "b" and norm.epsilon == 1e-5
    # an RMS-style core (no centring) is not a LayerNorm; the RMS matcher takes it
    rms = _node(graph, "Div", [x, std], "rms_like")
    assert norm_matchers.match_norm(rms, x) is None or norm_matchers.match_norm(rms, x).kind != "layernorm_decomposed"


def test_split_of_one_matmul_reads_as_two_linear_layers():
    graph, x = _graph()
    both = np.arange(HIDDEN * 2 * WIDTH, dtype=np.float32).reshape(HIDDEN, 2 * WIDTH)
    product = _node(graph, "MatMul", [x, _initializer(graph, "gate_up", both)], "gate_up")
    split = ir.node("Split", [product], attributes={"axis": -1, "num_outputs": 2}, num_outputs=2, name="split")
    graph.append(split)
    gate, up = (op_matchers.match_linear(v) for v in split.outputs)
    assert gate is not None and up is not None and gate.input is up.input is x
    np.testing.assert_array_equal(gate.weight.numpy_in_out(), both[:, :WIDTH])
    np.testing.assert_array_equal(up.weight.numpy_in_out(), both[:, WIDTH:])
    assert gate.weight.shape_in_out == (HIDDEN, WIDTH) and split in gate.nodes
