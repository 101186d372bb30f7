"""Greedy generation through ONNX Runtime equals transformers' greedy generate."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ffnfusion.exporters import llama_surgery
from ffnfusion.exporters.onnx_export import ExportOptions, export_model
from ffnfusion.runtime.generate import greedy_tokens
from ffnfusion.runtime.onnxruntime import create_session


@pytest.mark.parametrize(("kv_cache", "io_binding"), [(True, False), (True, True), (False, False)])
def test_tiny_model_matches_transformers(tiny_llama, tmp_path, kv_cache, io_binding):
    dropped = [2, 3, 4]
    path = export_model(copy.deepcopy(tiny_llama), tmp_path, ExportOptions(drop_attention=dropped, kv_cache=kv_cache))
    prompt = np.random.default_rng(11).integers(0, 128, 7)
    # io_binding=True on the CPU runs the GPU path's bookkeeping (presents bound as the next pasts)
    ours = list(greedy_tokens(create_session(path), prompt, 16, io_binding=io_binding))

    reference = copy.deepcopy(tiny_llama)
    llama_surgery.drop_attention(reference, dropped)
    reference.generation_config.pad_token_id = 0
    with torch.no_grad():
        expected = reference.generate(torch.from_numpy(prompt)[None], max_new_tokens=16, do_sample=False,
                                      min_new_tokens=16)[0, 7:].tolist()
    assert ours == expected
