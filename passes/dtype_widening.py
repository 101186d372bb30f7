"""``Float32WideningPass``: compute a bfloat16 (or float16) graph in float32.

ONNX Runtime's CPU provider has no bfloat16 kernels for most ops; running a bfloat16 model there
needs its arithmetic in float32. Every initializer, graph input/output and value of the narrow types
becomes float32, and so do the constants and casts that produce them (``Cast``/``CastLike`` targets,
``Constant`` and ``ConstantOfShape`` values). Widening is exact for the weights (every bfloat16 and
float16 number is a float32 number); results differ from a narrow computation only by the narrow
type's rounding of intermediate values, which float32 no longer does.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

NARROW = (ir.DataType.BFLOAT16, ir.DataType.FLOAT16)


class Float32WideningPass(ir.passes.InPlacePass):
    """Rewrite the narrow float types (default: bfloat16 and float16) of a graph to float32."""

    def __init__(self, narrow: tuple[ir.DataType, ...] = NARROW):
        super().__init__()
        self.narrow = narrow

    def _widen_tensor(self, tensor: ir.TensorProtocol) -> ir.TensorProtocol:
        if tensor.dtype not in self.narrow:
            return tensor
        return ir.tensor(np.asarray(tensor.numpy(), dtype=np.float32), name=tensor.name)

    def _widen_value(self, value: ir.Value) -> bool:
        if value.dtype in self.narrow:
            value.dtype = ir.DataType.FLOAT
            return True
        return False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for value in graph.initializers.values():
            if value.const_value is not None and value.const_value.dtype in self.narrow:
                value.const_value = self._widen_tensor(value.const_value)
                modified = True
            modified |= self._widen_value(value)
        for value in [*graph.inputs, *graph.outputs]:
            modified |= self._widen_value(value)
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
                to = node.attributes.get("to")
                if to is not None and ir.DataType(to.as_int()) in self.narrow:
                    node.attributes["to"] = ir.AttrInt64("to", ir.DataType.FLOAT)
                    modified = True
            for name in ("value",):  # Constant, ConstantOfShape
                attribute = node.attributes.get(name)
                if attribute is not None and attribute.type == ir.AttributeType.TENSOR:
                    tensor = attribute.as_tensor()
                    if tensor.dtype in self.narrow:
                        node.attributes[name] = ir.AttrTensor(name, self._widen_tensor(tensor))
                        modified = True
            for value in node.outputs:
                modified |= self._widen_value(value)
        return ir.passes.PassResult(model, modified)
