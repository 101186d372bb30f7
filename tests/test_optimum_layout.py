"""A directory laid out like an optimum export (legacy TorchScript exporter with a KV cache, config.json
beside model.onnx): drop attention with --keep-kv-io, fuse, keep the layout, generate."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx_ir as ir
import torch

from ffnfusion.cli import main
from ffnfusion.exporters import llama_surgery
from ffnfusion.exporters.onnx_export import ExportOptions, export_model
from ffnfusion.runtime.generate import greedy_tokens
from ffnfusion.runtime.onnxruntime import create_session


def test_optimum_style_directory_round_trip(tiny_llama, tmp_path, capsys):
    source = tmp_path / "optimum"
    export_model(copy.deepcopy(tiny_llama), source, ExportOptions(opset=18, dynamo=False, kv_cache=True))
    tiny_llama.config.to_json_file(source / "config.json")
    tiny_llama.generation_config.to_json_file(source / "generation_config.json")

    dropped, fused = tmp_path / "dropped", tmp_path / "fused"
    assert main(["drop-attention", str(source), "-o", str(dropped), "--layers", "2-4", "--keep-kv-io"]) == 0
    assert main(["fuse", str(dropped), "-o", str(fused), "--groups", "2-4"]) == 0
    capsys.readouterr()
    for directory in (dropped, fused):
        assert {"model.onnx", "config.json", "generation_config.json", "ffnfusion.json"} <= {
            p.name for p in directory.iterdir()}
    model = ir.load(fused / "model.onnx")
    names = [v.name for v in model.graph.inputs] + [v.name for v in model.graph.outputs]
    for layer in range(8):  # one KV pair per layer survives, removed layers pass through
        assert f"past_key_values.{layer}.key" in names and f"present.{layer}.value" in names
    meta = json.loads((fused / "ffnfusion.json").read_text())
    assert meta["dropped_attention"] == [2, 3, 4] and meta["fused_groups"] == [[2, 3, 4]]

    prompt = np.random.default_rng(13).integers(0, 128, 6)
    ours = list(greedy_tokens(create_session(fused / "model.onnx"), prompt, 12))
    reference = copy.deepcopy(tiny_llama)
    llama_surgery.drop_attention(reference, [2, 3, 4])
    llama_surgery.parallelize_groups(reference, [[2, 3, 4]])
    reference.generation_config.pad_token_id = 0
    with torch.no_grad():
        expected = reference.generate(torch.from_numpy(prompt)[None], max_new_tokens=12, min_new_tokens=12,
                                      do_sample=False)[0, 6:].tolist()
    assert ours == expected
