"""The token embedding a decoder's residual stream starts from: ``find_embedding_output(graph)``.

A Gather indexed by a graph input (``input_ids``) from a ``[vocab, hidden]`` table that is a
constant, the transpose of the output projection's weight (ORT GenAI's tied embeddings), or 4-bit
blocks (``GatherBlockQuantized``); the stream starts after a Gemma-style constant scaling, if any.
"""

from __future__ import annotations

import onnx_ir as ir

from ffnfusion.core.errors import BlockRecognitionError
from ffnfusion.passes import nbits, op_matchers


def find_embedding_gather(graph: ir.Graph) -> ir.Node:
    """The token embedding: a Gather from a 2-D weight table (:func:`embedding_table`) indexed by a
    graph input."""
    inputs = set(graph.inputs)
    for node in graph:
        if node.op_type not in ("Gather", "GatherBlockQuantized") or len(node.inputs) < 2:
            continue
        if embedding_table(node) is not None and op_matchers.skip_casts(node.inputs[1]) in inputs:
            return node
    raise BlockRecognitionError(
        "no token embedding found: expected a Gather from a 2-D weight table indexed by a graph "
        "input (input_ids); is this a decoder-only language model?"
    )


def find_embedding_output(graph: ir.Graph) -> ir.Value:
    """``x0``: the embedding Gather's output (after a Gemma-style constant scaling, if any)."""
    return _through_embedding_scale(find_embedding_gather(graph).outputs[0])


def embedding_table(gather: ir.Node) -> ir.TensorProtocol | None:
    """The ``[vocab, hidden]`` table a token Gather reads: a 2-D constant, the transpose of the
    output projection's ``[hidden, vocab]`` weight (ORT GenAI's tied embeddings), or 4-bit blocks
    (``GatherBlockQuantized``, dequantised when read)."""
    if gather.op_type == "GatherBlockQuantized":
        return nbits.dequantized_table(gather)
    if len(gather.inputs) != 2:
        return None
    table = gather.inputs[0]
    initializer = op_matchers.initializer_of(table)
    if initializer is not None and op_matchers.const_rank(initializer) == 2:
        return initializer.const_value
    transpose = op_matchers.producer(table, "Transpose")
    if transpose is not None and list(transpose.attributes.get_ints("perm", [1, 0])) == [1, 0]:
        weight = op_matchers.initializer_of(transpose.inputs[0])
        if weight is not None and op_matchers.const_rank(weight) == 2:
            return weight.const_value
    return None


def _through_embedding_scale(x: ir.Value) -> ir.Value:
    """Gemma-style models scale the embedding (``x · sqrt(hidden)``) before the first layer: the
    stream starts after such single-consumer constant scalings and casts."""
    while len(uses := list(x.uses())) == 1:
        node = uses[0].node
        if node.op_type == "Cast":
            x = node.outputs[0]
            continue
        if node.op_type not in ("Mul", "Div") or uses[0].idx != 0 and node.op_type == "Div":
            break
        other = node.inputs[1 - uses[0].idx]
        scale = op_matchers.const_array(other)
        if scale is None or scale.size != 1:
            break
        x = node.outputs[0]
    return x
