"""4-bit blocks: the packing read as ORT documents it, quantise/dequantise round trips within half a
step (one step at the clipped top), and the fusion's float MatMuls written back as MatMulNBits."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ffnfusion.passes.nbits import NBitsFormat, RequantizeFusedPass, dequantize, dequantized_weight, quantize_symmetric

FORM = NBitsFormat(k=40, n=3, bits=4, block_size=32, accuracy_level=4)  # K not a multiple of the block


def test_packing_low_nibble_first_and_default_zero_point():
    codes = np.arange(64, dtype=np.uint8) % 16  # block 0 of column 0: 0, 1, ..., 15, 0, 1, ...
    packed = np.zeros((3, 2, 16), np.uint8)
    packed[0, 0] = codes[0:32:2] | (codes[1:32:2] << 4)
    scales = np.ones((3, 2), np.float32)
    weight = dequantize(packed, scales, None, FORM)
    assert weight.shape == (40, 3)
    np.testing.assert_array_equal(weight[:32, 0], codes[:32].astype(np.float32) - 8)
    np.testing.assert_array_equal(weight[:, 1], -8.0)  # all-zero codes: −8 × scale


def test_quantize_then_dequantize_is_within_half_a_step_but_for_the_clipped_top():
    weight = np.random.default_rng(0).standard_normal((40, 3)).astype(np.float32)
    packed, scales = quantize_symmetric(weight, FORM)
    assert packed.shape == (3, 2, 16) and packed.dtype == np.uint8 and scales.shape == (3, 2)
    back = dequantize(packed, scales, None, FORM)
    step = np.abs(scales).repeat(32, axis=1)[:, :40].T
    error = np.abs(back - weight)
    # codes run −8..+7: a value near +8 steps (when the block's largest magnitude is negative) is clipped
    assert np.all(error <= step + 1e-6) and np.mean(error <= step / 2 + 1e-6) > 0.95
    largest = np.abs(weight[:32]).argmax(0)  # the largest magnitude of a block is exact (code 0)
    np.testing.assert_allclose(back[largest, range(3)], weight[largest, range(3)], rtol=1e-6)


def test_fused_matmul_is_written_as_matmul_nbits_and_read_back():
    x = ir.val("x", ir.DataType.FLOAT, ["n", 40])
    weight = np.random.default_rng(1).standard_normal((40, 3)).astype(np.float32)
    packed, scales = quantize_symmetric(weight, FORM)
    b = ir.Value(name="b", const_value=ir.tensor(packed, name="b"))
    s = ir.Value(name="s", const_value=ir.tensor(scales, name="s"))
    original = ir.node("MatMulNBits", [x, b, s], domain="com.microsoft", name="orig",
                       attributes={"K": 40, "N": 3, "bits": 4, "block_size": 32, "accuracy_level": 4})
    w = ir.Value(name="w", const_value=ir.tensor(weight, name="w"))
    fused = ir.node("MatMul", [x, w], name="ffnfusion.layers.1-2/up_proj")
    graph = ir.Graph([x], [original.outputs[0], fused.outputs[0]], nodes=[original, fused],
                     opset_imports={"": 20, "com.microsoft": 1})
    for value in (b, s, w):
        graph.register_initializer(value)
    model = ir.Model(graph, ir_version=10)
    read = dequantized_weight(original)
    assert read is not None and read is dequantized_weight(original)  # one value per node
    np.testing.assert_array_equal(read.const_value.numpy(), dequantize(packed, scales, None, FORM))

    assert RequantizeFusedPass()(model).modified
    written = graph.node("ffnfusion.layers.1-2/up_proj")
    assert written.op_type == "MatMulNBits" and written.attributes["N"].value == 3
    assert "w" not in graph.initializers and graph.node("orig").inputs[1] is b  # the others untouched
    np.testing.assert_array_equal(written.inputs[1].const_value.numpy(), packed)  # same codes for the same W
