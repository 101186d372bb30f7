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

DROPPED = [2, 3, 4]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_llama):
    """kv_cache -> the tiny model exported with attention dropped in 2-4 (made once each)."""
    made = {}

    def export(kv_cache: bool):
        if kv_cache not in made:
            made[kv_cache] = export_model(copy.deepcopy(tiny_llama), tmp_path_factory.mktemp(f"kv-{kv_cache}"),
                                          ExportOptions(drop_attention=DROPPED, kv_cache=kv_cache))
        return made[kv_cache]
    return export


@pytest.mark.parametrize(("kv_cache", "io_binding"), [(True, False), (True, True), (False, False)])
def test_tiny_model_matches_transformers(tiny_llama, exports, kv_cache, io_binding):
    dropped = DROPPED
    path = exports(kv_cache)
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
