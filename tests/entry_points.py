"""The same fusion through every entry point a user has: the pass on an ``onnx_ir.Model``,
``fuse_ffn`` on an ``onnx.ModelProto``, Olive's ``FuseFFN`` surgeon and ``ffnfusion fuse`` (the file
pipeline). Each result as the bytes of its ``ModelProto``, weights inline, so models compare whole."""

from __future__ import annotations

import pathlib

import onnx

from ffnfusion.api import fuse_ffn
from ffnfusion.cli import main
from ffnfusion.core.model_io import load_model, model_file, save_model
from ffnfusion.passes.ffn_fusion import FFNFusionPass


def model_bytes(path: pathlib.Path) -> bytes:
    return proto_bytes(onnx.load(str(path)))


def proto_bytes(proto: onnx.ModelProto) -> bytes:
    """The model's bytes with its weights inline; a weight read back from an external data file
    says ``data_location: DEFAULT`` where one never written out says nothing: the same tensor."""
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.DEFAULT:
            tensor.ClearField("data_location")
    return proto.SerializeToString(deterministic=True)


def fused_by_every_entry_point(path, groups: str, out: pathlib.Path) -> dict[str, bytes]:
    path = model_file(path)
    results = {}
    model = load_model(path)
    FFNFusionPass(groups, "gpu")(model)
    results["FFNFusionPass"] = model_bytes(save_model(model, out / "pass" / "model.onnx", input_path=path))
    proto = fuse_ffn(onnx.load(str(path)), groups, target="gpu")
    results["fuse_ffn(ModelProto)"] = proto_bytes(proto)
    try:
        from ffnfusion.olive import FuseFFN
    except ImportError:  # olive-ai is a test dependency; without it the other three still compare
        pass
    else:
        olive = FuseFFN(groups=groups).call_ir(load_model(path))
        results["Olive FuseFFN"] = model_bytes(save_model(olive, out / "olive" / "model.onnx", input_path=path))
    assert main(["fuse", str(path), "--groups", groups, "--target", "gpu", "--no-validate", "-o", str(out / "cli")]) == 0
    results["ffnfusion fuse"] = model_bytes(out / "cli" / "model.onnx")
    return results
