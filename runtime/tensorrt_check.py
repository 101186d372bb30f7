"""Static TensorRT compatibility check, no TensorRT needed.

Against TensorRT's ONNX parser support table (``tensorrt_onnx_ops.json``, with the TensorRT version it
describes): every node's op in the main graph, in ``If``/``Loop``/``Scan`` bodies and in model-local
functions; the default-domain opset range; no ``com.microsoft`` (ONNX Runtime contrib) ops; and the
documented restrictions that matter for LLM graphs:

* ``Attention``: no ``past_key``/``past_value``/``nonpad_kv_seqlen`` inputs, no ``present_*``/``qk``
  outputs, 4-D Q/K/V;
* ``RotaryEmbedding``: ``position_ids`` of type INT64;
* ``ReduceMean`` (opset 18+): ``axes`` a build-time constant; ``CumSum``: ``axis`` a constant;
* ``ScatterND``/``ScatterElements``: ``reduction`` none.

The IR version is reported, not judged: onnx-tensorrt only logs it, and opset 23/24 models carry IR 11/12.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import onnx_ir as ir

from ffnfusion.core.model_io import load_model

TABLE = pathlib.Path(__file__).with_name("tensorrt_onnx_ops.json")


@dataclasses.dataclass
class CheckResult:
    tensorrt: str
    problems: list[str]
    nodes: int
    ir_version: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def _is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return True  # an omitted optional input
    if value.const_value is not None or value.is_initializer():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def _restriction(node: ir.Node, opset: int) -> str | None:
    """What TensorRT's parser documents as unsupported about this node, if anything."""
    op, inputs, outputs = node.op_type, list(node.inputs), list(node.outputs)
    if op == "Attention":
        if any(v is not None for v in inputs[4:]):
            return "Attention with past_key/past_value/nonpad_kv_seqlen inputs is not supported"
        if any(v is not None and v.name and v.uses() or (v is not None and v.is_graph_output()) for v in outputs[1:]):
            return "Attention with present_key/present_value/qk outputs is not supported"
        for value in inputs[:3]:
            if value is not None and value.shape is not None and len(value.shape) != 4:
                return f"Attention needs 4-D Q/K/V, {value.name} is {len(value.shape)}-D"
    elif op == "RotaryEmbedding":
        position_ids = inputs[3] if len(inputs) > 3 else None
        if position_ids is not None and position_ids.dtype is not None and position_ids.dtype != ir.DataType.INT64:
            return f"RotaryEmbedding needs INT64 position_ids, {position_ids.name} is {position_ids.dtype.name}"
    elif op == "ReduceMean" and opset >= 18 and len(inputs) > 1 and not _is_constant(inputs[1]):
        return "ReduceMean axes must be a build-time constant (initializer or Constant)"
    elif op == "CumSum" and len(inputs) > 1 and not _is_constant(inputs[1]):
        return "CumSum axis must be a build-time constant"
    elif op in ("ScatterND", "ScatterElements"):
        reduction = node.attributes.get("reduction")
        if reduction is not None and reduction.as_string() != "none":
            return f"{op} reduction {reduction.as_string()!r} is not supported (only 'none')"
    return None


def _all_nodes(model: ir.Model):
    """``(where, node)`` for every node: the main graph and its subgraphs, then model-local functions."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        graph = node.graph
        yield ("" if graph is model.graph else f"in subgraph {graph.name if graph is not None else '?'}: "), node
    for function in model.functions.values():
        for node in ir.traversal.RecursiveGraphIterator(function):
            yield f"in function {function.domain}::{function.name}: ", node


def check_tensorrt(model_path: str | pathlib.Path) -> CheckResult:
    table = json.loads(TABLE.read_text())
    supported = set(table["supported"])
    low, high = table["opset"]
    model = load_model(model_path)
    problems = []
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None or not low <= opset <= high:
        problems.append(f"default-domain opset {opset} is outside TensorRT {table['tensorrt']}'s range {low}-{high}")
    functions = {(f.domain, f.name) for f in model.functions.values()}
    count = 0
    for where, node in _all_nodes(model):
        count += 1
        label = f"{where}node {node.name or '<unnamed>'} ({node.domain + '::' if node.domain else ''}{node.op_type})"
        if (node.domain, node.op_type) in functions:
            continue  # a call of a model-local function: its body is checked node by node
        if node.domain == "com.microsoft":
            problems.append(f"{label}: ONNX Runtime contrib op; TensorRT's parser does not read com.microsoft")
        elif node.domain not in ("", "ai.onnx"):
            problems.append(f"{label}: custom domain {node.domain!r} needs a TensorRT plugin")
        elif node.op_type not in supported:
            why = "listed as unsupported" if node.op_type in table["unsupported"] else "not in the support table"
            problems.append(f"{label}: {why} for TensorRT {table['tensorrt']}")
        elif (restriction := _restriction(node, opset or 0)) is not None:
            problems.append(f"{label}: {restriction}")
    return CheckResult(table["tensorrt"], problems, count, model.ir_version)
