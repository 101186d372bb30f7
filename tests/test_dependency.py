"""Dependency analysis equals a direct torch computation: skip block i, rerun, compare contributions."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import TINY_DROPPED
from torch import nn

from ffnfusion.exporters import llama_surgery
from ffnfusion.runtime.analysis.dependency import analyze, pairs_to_compute
from ffnfusion.runtime.block_runner import BlockRunner


class _Skip(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _cosdist(a, b):
    a, b = a.double(), b.double()
    return (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean().item()


def _layer_io(model, input_ids, skip=None):
    """Inputs/outputs of every decoder layer (and x + attn for attention layers), optionally with
    layer ``skip`` replaced by the identity."""
    model = copy.deepcopy(model)
    layers = llama_surgery.decoder_layers(model)
    if skip is not None:
        layers[skip] = _Skip()
    io, handles = {}, []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(
            lambda mod, args, out, i=index: io.__setitem__(i, (args[0], out)), with_kwargs=False))
        if hasattr(layer, "self_attn"):
            handles.append(layer.post_attention_layernorm.register_forward_hook(
                lambda mod, args, out, i=index: io.__setitem__(("attn", i), args[0])))
    with torch.no_grad():
        model(input_ids=torch.from_numpy(input_ids))
    return io


@pytest.fixture(scope="module", params=[False, True], ids=["in-ram", "streamed"])
def analysis(tiny_dynamo20, request):
    windows = np.random.default_rng(8).integers(0, 128, (3, 16))
    # batch_tokens=16: one window per batch, so batching is exercised too
    runner = BlockRunner(tiny_dynamo20, streamed=request.param, batch_tokens=16)
    report = analyze(runner, windows, max_distance=2, dependency_tokens=32, progress=lambda *a: None)
    return windows, report


def test_streamed_and_in_ram_analyses_are_equal(tiny_dynamo20):
    windows = np.random.default_rng(9).integers(0, 128, (4, 16))
    reports = [analyze(BlockRunner(tiny_dynamo20, streamed=streamed, batch_tokens=32), windows, max_distance=3,
                       dependency_tokens=48) for streamed in (False, True)]
    assert reports[0].blocks == reports[1].blocks
    np.testing.assert_allclose(np.array(reports[0].dependency, dtype=float),
                               np.array(reports[1].dependency, dtype=float), rtol=1e-6, equal_nan=True)
    for a, b in zip(reports[0].per_block, reports[1].per_block):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-6 * abs(a[k]) for k in a)
    assert reports[1].cost["streamed"] and not reports[0].cost["streamed"]


def test_blocks_follow_the_residual_stream(analysis):
    _, report = analysis
    assert [b["kind"] for b in report.blocks] == ["layer", "layer", "ffn", "ffn", "ffn", "ffn", "ffn", "layer"]
    assert [b["layer"] for b in report.blocks] == list(range(8))
    assert report.runs == [[2, 6]]
    assert report.cost["tokens"] == 48 and report.cost["dependency_tokens"] == 32


def test_per_block_metrics_match_torch(analysis, tiny_llama):
    windows, report = analysis
    model = copy.deepcopy(tiny_llama)
    llama_surgery.drop_attention(model, TINY_DROPPED)
    ios = [_layer_io(model, w[None]) for w in windows]
    for index, metrics in enumerate(report.per_block):
        xs = torch.cat([io[index][0] for io in ios], 1)
        outs = torch.cat([io[index][1] for io in ios], 1)
        assert metrics["cosdist"] == pytest.approx(_cosdist(xs, outs), abs=1e-4)
        h_ratio = ((outs - xs).double().norm(dim=-1) / xs.double().norm(dim=-1)).mean().item()
        assert metrics["h_ratio"] == pytest.approx(h_ratio, abs=1e-4)
        if index not in TINY_DROPPED:
            attn = torch.cat([io[("attn", index)] for io in ios], 1)
            assert metrics["importance"] == pytest.approx(_cosdist(xs, attn), abs=1e-4)
        else:
            assert "importance" not in metrics


def test_dependency_matrix_matches_torch(analysis, tiny_llama):
    windows, report = analysis
    model = copy.deepcopy(tiny_llama)
    llama_surgery.drop_attention(model, TINY_DROPPED)
    dep_windows = windows[:2]  # dependency_tokens=32 -> the first two windows of 16
    base = [_layer_io(model, w[None]) for w in dep_windows]
    computed = 0
    for i in range(8):
        skipped = [_layer_io(model, w[None], skip=i) for w in dep_windows]
        for j in range(i + 1, 8):
            value = report.dependency[i][j]
            if value is None:
                continue
            h = torch.cat([io[j][1] - io[j][0] for io in base], 1)
            h_tilde = torch.cat([io[j][1] - io[j][0] for io in skipped], 1)
            assert value == pytest.approx(_cosdist(h, h_tilde), abs=1e-4), (i, j)
            computed += 1
    assert computed == sum(v is not None for row in report.dependency for v in row)


def test_pairs_cover_runs_and_distance(analysis, tiny_dynamo20):
    _, report = analysis
    units = BlockRunner(tiny_dynamo20, streamed=True).units
    reach = pairs_to_compute(units, [(2, 6)], max_distance=2)
    assert reach[2] == 6 and reach[4] == 6  # whole run, beyond max_distance
    assert reach[0] == 2 and reach[6] == 7
    assert report.dependency[2][6] is not None and report.dependency[0][3] is None
    m_max, m_sum = report.window_metrics(2, 4)
    trio = [report.dependency[2][3], report.dependency[2][4], report.dependency[3][4]]
    assert m_max == max(trio) and m_sum == pytest.approx(sum(trio))
