"""Static TensorRT compatibility check: every node's op is in TensorRT's ONNX parser support table
(``tensorrt_onnx_ops.json``, with the TensorRT version it describes), opset and IR version are in
range, and no ``com.microsoft`` (ONNX Runtime contrib) op is left. Runs without TensorRT."""

from __future__ import annotations

import dataclasses
import json
import pathlib

from ffnfusion.model_io import load_model

TABLE = pathlib.Path(__file__).with_name("tensorrt_onnx_ops.json")
IR_VERSIONS = range(3, 11)  # what TensorRT 10's bundled protobuf reader accepts


@dataclasses.dataclass
class CheckResult:
    tensorrt: str
    problems: list[str]
    nodes: int

    @property
    def ok(self) -> bool:
        return not self.problems


def check_tensorrt(model_path: str | pathlib.Path) -> CheckResult:
    table = json.loads(TABLE.read_text())
    supported = set(table["supported"])
    low, high = table["opset"]
    model = load_model(model_path)
    problems = []
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None or not low <= opset <= high:
        problems.append(f"default-domain opset {opset} is outside TensorRT {table['tensorrt']}'s range {low}-{high}")
    if model.ir_version not in IR_VERSIONS:
        problems.append(f"IR version {model.ir_version} is outside {IR_VERSIONS.start}-{IR_VERSIONS.stop - 1}")
    count = 0
    for node in model.graph:
        count += 1
        label = f"node {node.name or '<unnamed>'} ({node.domain + '::' if node.domain else ''}{node.op_type})"
        if node.domain == "com.microsoft":
            problems.append(f"{label}: ONNX Runtime contrib op; TensorRT's parser does not read com.microsoft")
        elif node.domain not in ("", "ai.onnx"):
            problems.append(f"{label}: custom domain {node.domain!r} needs a TensorRT plugin")
        elif node.op_type not in supported:
            why = "listed as unsupported" if node.op_type in table["unsupported"] else "not in the support table"
            problems.append(f"{label}: {why} for TensorRT {table['tensorrt']}")
    return CheckResult(table["tensorrt"], problems, count)
