"""ONNX Runtime's block-quantized weights (``com.microsoft`` ``MatMulNBits``), read and written.

``MatMulNBits(A, B, scales[, zero_points])`` computes ``A @ W`` with ``W [K, N]`` stored column by
column in blocks of ``block_size`` rows: ``B [N, K/block, block·bits/8]`` packs the codes (4 bits:
two per byte, the even element in the low nibble), ``W[k, n] = (q − z) · scale[n, k // block]`` with
``z`` from ``zero_points`` or ``2^(bits−1)`` (symmetric). ORT GenAI's builder writes int4, block 32,
symmetric.

Recognition reads such a node as a linear layer whose weight is :class:`DequantizedTensor` (lazy:
dequantised only when read), so the FFN matchers, the fusion and the runners see ``W`` as if it were
stored in float. Folding norm gains into 4-bit codes is not exact, so a fused group is requantised:
:class:`RequantizeFusedPass` writes the float MatMuls the fusion made as ``MatMulNBits`` again, with
the members' bits, block size and accuracy level (the added error is measured, not assumed:
``tests/test_genai_builder.py``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from ffnfusion.passes.elementwise import constant_tensor

MICROSOFT = "com.microsoft"
FUSED_PREFIX = "ffnfusion.layers."  # names of the nodes the fusion writes
DEQUANTIZED_META = "ffnfusion.nbits"  # on a dequantised weight value: the NBitsFormat it came from


@dataclasses.dataclass(frozen=True)
class NBitsFormat:
    """How one ``MatMulNBits`` stores its weight."""

    k: int
    n: int
    bits: int
    block_size: int
    accuracy_level: int

    @classmethod
    def of(cls, node: ir.Node) -> NBitsFormat:
        a = node.attributes
        return cls(a["K"].value, a["N"].value, a["bits"].value, a["block_size"].value,
                   a["accuracy_level"].value if "accuracy_level" in a else 0)

    @property
    def blocks(self) -> int:
        return -(-self.k // self.block_size)


def dequantize(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, form: NBitsFormat) -> np.ndarray:
    """``W [K, N]`` float32 from ``B``, ``scales`` and optional packed ``zero_points``."""
    if form.bits != 4:
        raise ValueError(f"MatMulNBits with {form.bits} bits: only 4 is read")
    packed = packed.reshape(form.n, form.blocks, -1)
    codes = np.empty((form.n, form.blocks, packed.shape[-1] * 2), np.float32)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    codes = codes[..., :form.block_size]
    if zero_points is None:
        zero = np.float32(8)
    elif zero_points.dtype == np.uint8:  # packed like the codes, one nibble per block
        nibbles = np.empty((form.n, zero_points.reshape(form.n, -1).shape[1] * 2), np.float32)
        nibbles[:, 0::2] = zero_points.reshape(form.n, -1) & 0x0F
        nibbles[:, 1::2] = zero_points.reshape(form.n, -1) >> 4
        zero = nibbles[:, :form.blocks, None]
    else:
        zero = zero_points.reshape(form.n, form.blocks, 1).astype(np.float32)
    weight = (codes - zero) * scales.reshape(form.n, form.blocks, 1).astype(np.float32)
    return np.ascontiguousarray(weight.reshape(form.n, -1)[:, :form.k].T)


def quantize_symmetric(weight: np.ndarray, form: NBitsFormat) -> tuple[np.ndarray, np.ndarray]:
    """``(B, scales)`` for ``W [K, N]``, symmetric 4-bit as ORT's quantizer does it: per block the
    value of largest magnitude maps to code 0 (−8 × scale), codes ``round(w / scale) + 8`` in [0, 15]."""
    k, n = weight.shape
    padded = np.zeros((form.blocks * form.block_size, n), np.float32)
    padded[:k] = weight
    blocks = padded.T.reshape(n, form.blocks, form.block_size)
    index = np.abs(blocks).argmax(-1)[..., None]
    scales = (np.take_along_axis(blocks, index, -1) / -8.0)[..., 0]
    safe = np.where(scales == 0, 1.0, scales)[..., None]
    codes = np.clip(np.rint(blocks / safe) + 8, 0, 15).astype(np.uint8)
    codes = np.where(scales[..., None] == 0, np.uint8(8), codes)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.astype(np.uint8), scales.astype(np.float32)


def dequantized_weight(node: ir.Node) -> ir.Value | None:
    """A value standing for the ``[K, N]`` float weight of a 4-bit ``MatMulNBits`` node (made once per
    node; its tensor is dequantised when read), or None for other nodes and forms."""
    if node.op_type != "MatMulNBits" or node.domain != MICROSOFT or len(node.inputs) < 3:
        return None
    cached = node.meta.get("ffnfusion.dequantized")
    if cached is not None:
        return cached
    form = NBitsFormat.of(node)
    packed = node.inputs[1].const_value if node.inputs[1] is not None else None
    scales = node.inputs[2].const_value if node.inputs[2] is not None else None
    zero_input = node.inputs[3] if len(node.inputs) > 3 else None
    zero_points = zero_input.const_value if zero_input is not None else None
    if form.bits != 4 or packed is None or scales is None or (zero_input is not None and zero_points is None) or \
            (len(node.inputs) > 4 and node.inputs[4] is not None):  # g_idx: act-order, not read
        return None
    dtype = scales.dtype

    def compute() -> ir.TensorProtocol:
        array = dequantize(packed.numpy(), scales.numpy(), None if zero_points is None else zero_points.numpy(), form)
        return ir.tensor(array.astype(dtype.numpy()))

    name = f"{packed.name or node.name}.dequantized"
    value = ir.Value(name=name, const_value=ir.LazyTensor(compute, dtype=dtype, shape=ir.Shape([form.k, form.n]),
                                                         cache=True, name=name))
    value.meta[DEQUANTIZED_META] = form
    node.meta["ffnfusion.dequantized"] = value
    return value


def _constant_through_reshape(value: ir.Value | None) -> np.ndarray | None:
    """A constant, or a constant reshaped by a constant shape (ORT GenAI shares the head's 4-bit codes
    with the embedding through a Reshape)."""
    if value is None:
        return None
    tensor = constant_tensor(value)
    if tensor is not None:
        return tensor.numpy()
    node = value.producer()
    if node is None or node.op_type != "Reshape" or len(node.inputs) < 2:
        return None
    data, shape = (constant_tensor(v) if v is not None else None for v in node.inputs[:2])
    if data is None or shape is None:
        return None
    return data.numpy().reshape(shape.numpy())


def dequantized_table(node: ir.Node) -> ir.TensorProtocol | None:
    """The ``[vocab, hidden]`` table of a 4-bit ``GatherBlockQuantized`` embedding (lazy), or None."""
    if node.op_type != "GatherBlockQuantized" or node.domain != MICROSOFT or len(node.inputs) < 3:
        return None
    cached = node.meta.get("ffnfusion.dequantized")
    if cached is not None:
        return cached
    a = node.attributes
    bits, block = a["bits"].value if "bits" in a else 4, a["block_size"].value if "block_size" in a else 128
    gather_axis = a["gather_axis"].value if "gather_axis" in a else 0
    quantize_axis = a["quantize_axis"].value if "quantize_axis" in a else 1
    scales = node.inputs[2].const_value if node.inputs[2] is not None else None
    has_zero_points = len(node.inputs) > 3 and node.inputs[3] is not None
    data_value = node.inputs[0]
    shape = data_value.shape if data_value is not None else None
    if bits != 4 or gather_axis != 0 or quantize_axis not in (1, -1) or scales is None or has_zero_points \
            or data_value is None or shape is None or len(shape) != 2:
        return None
    rows, packed_cols = shape[0], shape[1]
    if not isinstance(rows, int) or not isinstance(packed_cols, int):
        return None

    def compute() -> ir.TensorProtocol:
        packed = _constant_through_reshape(data_value)
        assert packed is not None
        codes = np.empty((rows, packed_cols * 2), np.float32)
        codes[:, 0::2] = packed & 0x0F
        codes[:, 1::2] = packed >> 4
        table = (codes - 8) * np.repeat(scales.numpy().astype(np.float32), block, axis=1)[:, :packed_cols * 2]
        return ir.tensor(table.astype(scales.dtype.numpy()))

    producer = data_value.producer()
    if producer is not None and producer.op_type != "Reshape":  # codes computed some other way: not read
        return None
    table = ir.LazyTensor(compute, dtype=scales.dtype, shape=ir.Shape([rows, packed_cols * 2]), cache=True,
                          name=f"{node.name}.dequantized")
    node.meta["ffnfusion.dequantized"] = table
    return table


def nbits_format_of(model: ir.Model) -> NBitsFormat | None:
    """The 4-bit format of the model's first ``MatMulNBits`` (ORT GenAI writes one for all)."""
    for node in model.graph:
        if node.op_type == "MatMulNBits" and node.domain == MICROSOFT:
            return NBitsFormat.of(node)
    return None


class RequantizeFusedPass(ir.passes.InPlacePass):
    """Write the float ``MatMul``s the fusion made (``ffnfusion.layers.…``) as 4-bit ``MatMulNBits`` in the
    format the model's other layers use; nothing else changes. A no-op for float models."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        form = nbits_format_of(model)
        if form is None:
            return ir.passes.PassResult(model, modified=False)
        graph = model.graph
        count = 0
        for node in list(graph):
            if node.op_type != "MatMul" or not (node.name or "").startswith(FUSED_PREFIX):
                continue
            weight = node.inputs[1]
            if weight is None or weight.const_value is None or weight.const_value.shape.rank() != 2:
                continue
            array = weight.const_value.numpy().astype(np.float32)
            k, n = array.shape
            fused_form = dataclasses.replace(form, k=k, n=n)
            packed, scales = quantize_symmetric(array, fused_form)
            prefix = weight.name or node.name
            values = []
            for suffix, data in (("Q4", packed), ("scales", scales.astype(weight.const_value.dtype.numpy()))):
                value = ir.Value(name=f"{prefix}_{suffix}", const_value=ir.tensor(data, name=f"{prefix}_{suffix}"))
                graph.register_initializer(value)
                values.append(value)
            quantized = ir.node("MatMulNBits", [node.inputs[0], *values], domain=MICROSOFT, name=node.name,
                                attributes={"K": k, "N": n, "bits": fused_form.bits, "block_size": fused_form.block_size,
                                            "accuracy_level": fused_form.accuracy_level})
            graph.insert_before(node, quantized)
            quantized.outputs[0].shape, quantized.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
            ir.convenience.replace_all_uses_with(node.outputs[0], quantized.outputs[0], replace_graph_outputs=True)
            name = node.outputs[0].name
            graph.remove(node, safe=True)
            quantized.outputs[0].name = name
            if weight.name is not None and weight.name in graph.initializers and not weight.uses():
                del graph.initializers[weight.name]
            count += 1
        return ir.passes.PassResult(model, modified=bool(count))
