"""How a decoder is cut into the pieces :class:`~ffnfusion.runtime.block_runner.BlockRunner` runs.

* :class:`ProtoSlicer`: a piece's nodes copied from the model's ``ModelProto`` (weights stay
  references into its data file), the fast path;
* :func:`shared_values`: what every block reads but that does not depend on the stream (causal mask,
  rotary cos/sin), computed once per batch and fed;
* :class:`HeadProjection`: a large output projection, fed to the head in vocabulary slices;
* :func:`weights_in_dir`: whether a piece can reference the model's data file rather than carry
  its weights.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

HEAD_SLICE_BYTES = 128 * 2**20  # of the output projection fed at a time


class HeadProjection:
    """The head's output projection ``logits = h·W (+ b)``, when big enough to feed in slices."""

    def __init__(self, linear_output: str, weight: ir.TensorProtocol, transposed: bool,
                 bias: ir.TensorProtocol | None):
        # The tensors of the model it was found in: external ones are read, a slice at a time, from
        # their data file; the head's weights are never rewritten, so any copy of the model has them.
        self.linear_output, self.weight, self.transposed, self.bias = linear_output, weight, transposed, bias

    @classmethod
    def find(cls, model: ir.Model) -> HeadProjection | None:
        """The last linear layer before ``logits``, through position-wise ops only (Cast, a softcap's
        Div/Tanh/Mul by constants): None when there is none or it is small."""
        from ffnfusion.passes import op_matchers

        value = next((v for v in model.graph.outputs if v.name == "logits"), None)
        while value is not None:
            linear = op_matchers.match_linear(value)
            if linear is not None:
                tensor = linear.weight.tensor
                if tensor.nbytes <= 2 * HEAD_SLICE_BYTES or linear.input is None:
                    return None
                return cls(value.name or "", tensor, linear.weight.transposed,
                           linear.bias.const_value if linear.bias is not None else None)
            node = value.producer()
            if node is None or node.op_type not in ("Cast", "Div", "Mul", "Tanh", "Identity"):
                return None
            value = next((v for v in node.inputs if v is not None and v.const_value is None), None)
        return None

    def feed_as_input(self, model: ir.Model) -> None:
        """Replace the projection by ``MatMul(h, head_weight) (+ head_bias)``, both graph inputs."""
        from ffnfusion.passes import op_matchers

        graph = model.graph
        output = next(v for node in graph for v in node.outputs if v.name == self.linear_output)
        linear = op_matchers.match_linear(output)
        assert linear is not None and linear.input is not None  # found by HeadProjection.find
        hidden, vocab = linear.weight.shape_in_out
        weight = ir.val("head_weight", linear.weight.tensor.dtype, [hidden, "vocab_slice"])
        graph.inputs.append(weight)
        product = ir.node("MatMul", [linear.input, weight], name="ffnfusion/head/sliced_projection")
        graph.append(product)
        result = product.outputs[0]
        if linear.bias is not None:
            bias_tensor = linear.bias.const_value
            assert bias_tensor is not None  # match_linear only takes constant biases
            bias = ir.val("head_bias", bias_tensor.dtype, ["vocab_slice"])
            graph.inputs.append(bias)
            add = ir.node("Add", [result, bias], name="ffnfusion/head/sliced_bias")
            graph.append(add)
            result = add.outputs[0]
        if output.is_graph_output():
            index, name = graph.outputs.index(output), output.name
            output.name = f"{name}/unsliced"  # removed with its node below
            graph.outputs[index] = result
            result.name = name
        ir.convenience.replace_all_uses_with(output, result)

    def slices(self) -> Iterator[dict[str, np.ndarray]]:
        """Feeds ``{head_weight[, head_bias]}`` for consecutive slices of the vocabulary, each read
        from the (memory-mapped) data file when it is made."""
        tensor = self.weight
        bias = self.bias.numpy() if self.bias is not None else None
        rows, cols = tensor.shape.numpy()
        vocab, hidden = (rows, cols) if self.transposed else (cols, rows)
        step = max(1, HEAD_SLICE_BYTES // (hidden * tensor.dtype.numpy().itemsize))
        for start in range(0, vocab, step):
            stop = min(vocab, start + step)
            fed = {"head_weight": _read_slice(tensor, start, stop, self.transposed)}
            if bias is not None:
                fed["head_bias"] = np.ascontiguousarray(bias[start:stop])
            yield fed


def _read_slice(tensor, start: int, stop: int, transposed: bool) -> np.ndarray:
    """``W[:, start:stop]`` as ``[hidden, stop - start]`` (``W[start:stop].T`` when stored transposed),
    read with plain reads from an external data file: memory-mapping it would leave the whole
    projection resident."""
    rows, cols = tensor.shape.numpy()
    dtype = tensor.dtype.numpy()
    if not isinstance(tensor, ir.ExternalTensor):
        array = tensor.numpy()
        return np.ascontiguousarray(array[start:stop].T if transposed else array[:, start:stop])
    base = tensor.offset or 0
    with open(tensor.path, "rb") as data:
        if transposed:  # rows start..stop are contiguous
            data.seek(base + start * cols * dtype.itemsize)
            return np.ascontiguousarray(np.fromfile(data, dtype, (stop - start) * cols).reshape(stop - start, cols).T)
        out = np.empty((rows, stop - start), dtype)
        for row in range(rows):  # one contiguous run of columns per row
            data.seek(base + (row * cols + start) * dtype.itemsize)
            out[row] = np.fromfile(data, dtype, stop - start)
        return out


class ProtoSlicer:
    """Pieces cut from the model's ``ModelProto`` directly: the nodes a piece needs are copied by
    protobuf (no onnx-ir round trip per piece), its weights stay references to the model's data file.
    ~10 ms a piece instead of ~150 ms for a re-load and rewrite, which matters when a streamed run
    builds every block's session on every pass."""

    def __init__(self, path: pathlib.Path, model: ir.Model):
        import onnx

        self.proto = onnx.load(str(path), load_external_data=False)
        graph = self.proto.graph
        self.producer = {name: i for i, node in enumerate(graph.node) for name in node.output if name}
        self.initializers = {init.name: init for init in graph.initializer}
        self.graph_inputs = {v.name: v for v in graph.input}
        self.types = {v.name: v for v in model.graph.inputs}
        self.types.update({v.name: v for node in model.graph for v in node.outputs if v.name})

    def piece(self, start: str | None, ends: list[str], fed: list[str]) -> bytes | None:
        import onnx
        from onnx import helper

        graph = self.proto.graph
        stop = set(fed) | ({start} if start else set())
        needed, stack, inputs, initializers = set(), list(ends), [], {}
        while stack:
            name = stack.pop()
            if name in stop or name in self.graph_inputs:
                if name not in inputs:
                    inputs.append(name)
                continue
            if name in self.initializers:
                initializers[name] = self.initializers[name]
                continue
            index = self.producer.get(name)
            if index is None or index in needed:
                continue
            needed.add(index)
            node = graph.node[index]
            stack.extend(n for n in node.input if n)
            for attribute in node.attribute:  # names read inside If/Loop bodies
                for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                    stack.extend(_outer_names(sub))
        nodes = []
        for index in sorted(needed):  # graph order: topological
            node = onnx.NodeProto()
            node.CopyFrom(graph.node[index])
            if start:
                node.input[:] = ["stream_in" if n == start else n for n in node.input]
            nodes.append(node)
        value_infos = []
        for name in inputs:
            value = self.types.get(name)
            if value is None or value.dtype is None:
                return None  # no type recorded for a piece input: the onnx-ir path infers it
            dims = None if value.shape is None else [d if isinstance(d, int) else str(d) for d in value.shape]
            value_infos.append(helper.make_tensor_value_info("stream_in" if name == start else name,
                                                             int(value.dtype), dims))
        end_types = [self.types[name].dtype if name in self.types else None for name in ends]
        if any(dtype is None for dtype in end_types):
            return None
        outputs = [helper.make_tensor_value_info(name, int(dtype), None) for name, dtype in zip(ends, end_types)
                   if dtype is not None]
        piece = helper.make_graph(nodes, f"piece_{ends[0]}", value_infos, outputs, list(initializers.values()))
        model = helper.make_model(piece, opset_imports=self.proto.opset_import, ir_version=self.proto.ir_version)
        model.functions.extend(self.proto.functions)
        return model.SerializeToString()


def _outer_names(graph) -> list[str]:
    """Names a subgraph reads from its enclosing scope (inputs of its nodes it does not produce)."""
    produced = {n for node in graph.node for n in node.output} | {v.name for v in graph.input} \
        | {init.name for init in graph.initializer}
    return [n for node in graph.node for n in node.input if n and n not in produced]


def shared_values(graph: ir.Graph, embedding: ir.Value) -> list[str]:
    """Values every block reads that do not depend on the residual stream: computed from the graph
    inputs alone (the causal mask, rotary cos/sin), they would otherwise be recomputed in every
    block's piece. Constants (initializers, Constant nodes and what folds from them) are left out."""
    on_stream: set[ir.Value] = set()
    variable: set[ir.Value] = set(graph.inputs)
    for node in graph:  # graph order is topological
        inputs = [v for v in node.inputs if v is not None]
        if node.outputs and node.outputs[0] is embedding or any(v in on_stream for v in inputs):
            on_stream.update(node.outputs)
        elif any(v in variable for v in inputs):
            variable.update(node.outputs)
    shared: dict[str | None, None] = {}  # an ordered set of names
    for node in graph:
        for value in node.inputs:
            if value is not None and value in variable and value not in on_stream and value.producer() is not None \
                    and any(v in on_stream for v in node.outputs) and value is not embedding \
                    and value.dtype is not None:  # fed values need a declared type
                shared[value.name] = None
    return [name for name in shared if name]


def weights_in_dir(model: ir.Model, base_dir: pathlib.Path) -> bool:
    """Whether every initializer is external data in ``base_dir`` or a small constant: then a piece
    serialises to a few KB and ORT reads its weights from the model's own file. Big in-memory tensors
    (computed or widened) must not go inline (the 2 GB protobuf limit)."""
    root = base_dir.resolve()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            if pathlib.Path(tensor.base_dir).resolve() != root:
                return False
        elif tensor is not None and tensor.nbytes >= 2**20:
            return False
    return True
