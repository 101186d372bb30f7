"""FFNRemovalPass: the removal baseline equals skipping those FFNs in torch; numbering survives."""

from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import torch
from conftest import TINY_DROPPED, rel_err

from ffnfusion.exporters import llama_surgery
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.ffn_removal import FFNRemovalPass
from ffnfusion.runtime.onnxruntime import create_session, run_logits


def test_removed_ffns_match_torch_and_keep_numbering(tiny_dynamo20, tiny_llama, tmp_path):
    model = ir.load(tiny_dynamo20)
    FFNRemovalPass([1, 3, 4])(model)  # layer 1 keeps its attention; 3 and 4 leave the stream
    block_map = find_blocks(model)
    assert [layer.index for layer in block_map.layers] == [0, 1, 2, 5, 6, 7]
    assert block_map.layer(1).ffn is None and block_map.layer(1).attention
    assert block_map.runs == [(2, 2), (5, 6)]
    path = tmp_path / "removed.onnx"
    ir.save(model, path)

    reference = copy.deepcopy(tiny_llama)
    llama_surgery.drop_attention(reference, TINY_DROPPED)
    layers = llama_surgery.decoder_layers(reference)
    for index in (1, 3, 4):
        layers[index].mlp.forward = lambda x: torch.zeros_like(x)
    ids = np.random.default_rng(9).integers(0, 128, (2, 8))
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert rel_err(run_logits(create_session(path), ids), expected) <= 1e-5
