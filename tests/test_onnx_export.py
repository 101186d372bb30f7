"""Export: signature, attention-free layers, KV cache, dtype, metadata."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from conftest import TINY_CONFIG, make_tiny_llama, prefill_then_decode, rel_err

from ffnfusion.core.errors import FFNFusionError
from ffnfusion.exporters import llama_surgery
from ffnfusion.exporters.onnx_export import ExportOptions, export_model
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.ffn_fusion import FFNFusionPass
from ffnfusion.runtime.onnxruntime import create_session, run_logits

HEAD_DIM = TINY_CONFIG["hidden_size"] // TINY_CONFIG["num_attention_heads"]


def test_signature_and_metadata(tiny_dynamo20):
    model = onnx.load(str(tiny_dynamo20), load_external_data=False)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert model.ir_version <= 10 and model.opset_import[0].version == 20
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in dims), "batch and sequence axes must be dynamic"
    meta = json.loads((tiny_dynamo20.parent / "ffnfusion.json").read_text())
    assert meta["dropped_attention"] == [2, 3, 4, 5, 6] and meta["opset"] == 20
    assert meta["config"]["hidden_size"] == 96


def test_attention_free_layers_have_no_attention_nodes(tiny_dynamo20):
    """Per layer, an attention-free layer contributes exactly one residual branch (its FFN)."""
    block_map = find_blocks(ir.load(tiny_dynamo20))
    softmaxes = sum(node.op_type == "Softmax" for node in ir.load(tiny_dynamo20).graph)
    assert softmaxes == sum(layer.attention for layer in block_map.layers) == 3


def test_kv_cache_prefill_then_decode_matches_full_forward(tmp_path):
    """Layer 0 dropped on purpose: transformers asks layer 0 for the cache length by default."""
    dropped = [0, 1, 2, 5]
    model = make_tiny_llama()
    reference = copy.deepcopy(model)
    llama_surgery.drop_attention(reference, dropped)
    path = export_model(model, tmp_path, ExportOptions(drop_attention=dropped, kv_cache=True))
    session = create_session(path)
    past_names = [i.name for i in session.get_inputs()][3:]
    assert past_names == [f"past_key_values.{i}.{k}" for i in (3, 4, 6, 7) for k in ("key", "value")]
    assert [o.name for o in session.get_outputs()][1:] == [n.replace("past_key_values", "present") for n in past_names]

    ids = np.random.default_rng(0).integers(0, 128, (2, 9))
    kv_heads = TINY_CONFIG["num_key_value_heads"]
    prefill, decode = prefill_then_decode(session, ids, 6)
    with torch.no_grad():
        full = reference(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert rel_err(prefill[0], full[:, :6]) <= 1e-5
    assert rel_err(decode[0], full[:, 6:]) <= 1e-5
    assert decode[1].shape == (2, kv_heads, 9, HEAD_DIM)


def test_float16_export_fuses_and_keeps_dtype(tmp_path, tiny_llama):
    path = export_model(copy.deepcopy(tiny_llama), tmp_path / "fp16",
                        ExportOptions(drop_attention=[2, 3, 4], dtype="float16"))
    model = ir.load(path)
    FFNFusionPass([[2, 3, 4]])(model)
    gate = model.graph.initializers["ffnfusion.layers.2-4.gate_proj.weight"]
    assert gate.const_value.dtype == ir.DataType.FLOAT16
    fused_path = tmp_path / "fused.onnx"
    ir.save(model, fused_path)
    ids = np.random.default_rng(2).integers(0, 128, (1, 8))
    fused = run_logits(create_session(fused_path), ids)
    assert fused.dtype == np.float16
    reference = copy.deepcopy(tiny_llama)
    llama_surgery.drop_attention(reference, [2, 3, 4])
    llama_surgery.parallelize_groups(reference, [[2, 3, 4]])
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert rel_err(fused.astype(np.float32), expected) <= 5e-3  # fp16 round-off, 30-odd ops deep


def test_bad_opset_and_layers_are_refused(tmp_path, tiny_llama):
    with pytest.raises(FFNFusionError, match="opset 17 not supported: use 18-23"):
        export_model(copy.deepcopy(tiny_llama), tmp_path, ExportOptions(opset=17))
    with pytest.raises(FFNFusionError, match="layer 8 out of range: the model has 8 layers"):
        export_model(copy.deepcopy(tiny_llama), tmp_path, ExportOptions(drop_attention=[8]))


def test_export_check_compares_an_export_with_its_source(tmp_path, capsys):
    """``python -m ffnfusion.benchmarks.export_check``: an export from a Hugging Face folder against
    that folder's model in transformers; an export that is not plain is refused."""
    from conftest import make_tiny_llama, save_tiny_tokenizer

    from ffnfusion.benchmarks.export_check import main as export_check
    from ffnfusion.cli import main

    source = tmp_path / "hf"
    make_tiny_llama(3).save_pretrained(source)
    save_tiny_tokenizer(source)
    (tmp_path / "text.txt").write_text(" ".join(f"t{i % 128}" for i in range(0, 4000, 7)))
    assert main(["export", str(source), "-o", str(tmp_path / "onnx")]) == 0
    assert export_check([str(tmp_path / "onnx"), "--text", str(tmp_path / "text.txt"), "--tokens", "64"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "64 tokens" in line and float(line.split("relative error ")[1].split(",")[0]) < 1e-5, line
    assert "agrees at 100.0%" in line
    assert main(["export", str(source), "-o", str(tmp_path / "dropped"), "--drop-attention", "1"]) == 0
    with pytest.raises(SystemExit, match="plain exports"):
        export_check([str(tmp_path / "dropped")])
