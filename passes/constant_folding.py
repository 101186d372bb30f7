"""Fold small elementwise computations on constants into initializers: ``FoldSmallConstantsPass``.

The legacy TorchScript exporter leaves parameter arithmetic in the graph, e.g. Gemma's norm gain
``1 + w`` as ``Add(Constant(1), w)``: the math is constant, but the matchers want the gain as a tensor.
Only elementwise ops (and Cast) on constants whose result has at most ``MAX_ELEMENTS`` elements are
folded, so weight matrices are never materialised; the result keeps the dtype ONNX would give it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ffnfusion.passes.elementwise import ELEMENTWISE, constant_tensor

MAX_ELEMENTS = 1 << 16


class FoldSmallConstantsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for node in list(graph):
            if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1 or node.op_type not in ELEMENTWISE:
                continue
            output = node.outputs[0]
            if output.is_graph_output() or not node.inputs:
                continue
            found = [constant_tensor(v) for v in node.inputs if v is not None]
            tensors = [t for t in found if t is not None and t.size <= MAX_ELEMENTS]  # sizes before any read
            if len(tensors) != len(node.inputs):
                continue
            arrays = [t.numpy() for t in tensors]
            with np.errstate(all="ignore"):
                if node.op_type == "Cast":
                    result = arrays[0].astype(ir.DataType(node.attributes["to"].value).numpy())
                else:
                    result = np.asarray(ELEMENTWISE[node.op_type](*arrays)).astype(arrays[0].dtype)
            if result.size > MAX_ELEMENTS:
                continue
            name = output.name or f"folded_{count}"
            folded = ir.Value(name=name, shape=ir.Shape(result.shape), type=ir.TensorType(ir.DataType.from_numpy(result.dtype)),
                              const_value=ir.tensor(result, name=name))
            output.name = None
            graph.register_initializer(folded)
            ir.convenience.replace_all_uses_with(output, folded)
            graph.remove(node, safe=True)
            count += 1
        return ir.passes.PassResult(model, modified=bool(count))
