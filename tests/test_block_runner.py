"""The block-by-block runner computes what one ONNX Runtime session of the whole model computes,
streamed or with its sessions kept, and so do the analysis, verification and repair built on it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import rel_err

from ffnfusion.core.model_io import save_model
from ffnfusion.passes.dtype_widening import Float32WideningPass
from ffnfusion.passes.ffn_fusion import FFNFusionPass
from ffnfusion.runtime import block_runner, model_pieces
from ffnfusion.runtime.block_runner import BlockRunner, choose_streamed
from ffnfusion.runtime.onnxruntime import create_session, run_logits
from ffnfusion.runtime.verify import compare_many

WINDOWS = np.random.default_rng(3).integers(0, 128, (3, 16))


@pytest.mark.parametrize("streamed", [False, True], ids=["in-ram", "streamed"])
@pytest.mark.parametrize("variant", ["tiny_dynamo20", "tiny_torchscript", "tiny_kv_cache"])
def test_logits_equal_one_session(variant, streamed, request):
    path = request.getfixturevalue(variant)
    expected = run_logits(create_session(path), WINDOWS)
    runner = BlockRunner(path, streamed=streamed, batch_tokens=32)  # two batches of windows
    assert rel_err(runner.logits(WINDOWS), expected) < 1e-5
    assert (len(runner._sessions) == 0) == streamed  # streamed: nothing kept


@pytest.mark.parametrize("variant", ["tiny_dynamo20", "tiny_torchscript"])
def test_head_fed_by_vocabulary_slices(variant, request, monkeypatch):
    path = request.getfixturevalue(variant)
    monkeypatch.setattr(model_pieces, "HEAD_SLICE_BYTES", 96 * 4 * 10)  # 10 of 128 columns a slice
    runner = BlockRunner(path, streamed=True)
    assert runner._head_projection is not None
    expected = run_logits(create_session(path), WINDOWS)
    assert rel_err(runner.logits(WINDOWS), expected) < 1e-5
    assert len(list(runner._head_projection.slices())) == 13


def test_bfloat16_runs_widened(tmp_path):
    from ffnfusion.exporters.synthetic import write_synthetic

    path = write_synthetic("tiny", tmp_path / "bf16", dtype="bfloat16")
    runner = BlockRunner(path, streamed=True)
    assert runner.widen and runner.stream_dtype == ir.DataType.FLOAT
    widened = ir.load(path)
    Float32WideningPass()(widened)
    reference = save_model(widened, tmp_path / "f32" / "model.onnx")
    ids = np.random.default_rng(0).integers(0, 256, (2, 8))
    assert rel_err(runner.logits(ids), run_logits(create_session(reference), ids)) < 1e-5


def test_the_choice_between_streamed_and_in_ram(tiny_dynamo20, monkeypatch, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="ffnfusion")
    assert choose_streamed(tiny_dynamo20, True) and not choose_streamed(tiny_dynamo20, False)
    assert "forced by --stream" in caplog.text and "forced by --no-stream" in caplog.text
    monkeypatch.setattr(block_runner, "available_memory", lambda: 10 * 2**30)
    assert not choose_streamed(tiny_dynamo20, None)
    monkeypatch.setattr(block_runner, "available_memory", lambda: 1000)
    assert choose_streamed(tiny_dynamo20, None)
    assert "block-streamed (0.0 GiB of weights x2 vs 0.0 GiB available)" in caplog.text


def test_wide_ffns_streamed_by_column_blocks_equal_one_session(tiny_dynamo20, tmp_path, monkeypatch):
    """Streamed, an FFN over ``WIDE_FFN_BYTES`` runs in numpy a block of columns at a time (its
    attention still a session): here every FFN, plain layers with attention, a fused group headed by
    attention (1-2) and an attention-free group (3-5) — the same logits and analysis extras."""
    from ffnfusion.runtime import ffn_reference

    fused = ir.load(tiny_dynamo20)
    FFNFusionPass([[1, 2], [3, 4, 5]])(fused)
    path = save_model(fused, tmp_path / "fused" / "model.onnx")
    in_ram = BlockRunner(path, streamed=False)
    monkeypatch.setattr(block_runner, "WIDE_FFN_BYTES", 0)
    monkeypatch.setattr(ffn_reference, "COLUMN_BLOCK", 40)  # several blocks per FFN (widths 96, 192, 288)
    columns = BlockRunner(path, streamed=True)
    assert all(columns._column_ffn(i) is not None for i in range(len(columns.units)))
    assert in_ram._column_ffn(0) is None  # in RAM: every unit a session
    assert rel_err(columns.logits(WINDOWS), run_logits(create_session(path), WINDOWS)) < 1e-5
    stream = in_ram.embed(WINDOWS)
    for index in range(len(columns.units)):
        with in_ram.unit(index, extras=True) as session, columns.unit(index, extras=True) as numpy_ffn:
            expected, actual = session(stream, WINDOWS), numpy_ffn(stream, WINDOWS)
        assert len(actual) == len(expected) and all(rel_err(a, e) < 1e-5 for a, e in zip(actual, expected))
        stream = expected[0]


def test_verification_streamed_equals_in_ram_and_the_logits(tiny_dynamo20, tmp_path):
    fused = ir.load(tiny_dynamo20)
    FFNFusionPass([[2, 3, 4]])(fused)
    fused_path = save_model(fused, tmp_path / "fused" / "model.onnx")
    results = [compare_many(str(tiny_dynamo20), [str(fused_path)], WINDOWS, stream=s)[0] for s in (False, True)]
    for key in ("top1_agreement", "kl", "hidden_cosine"):
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-6)
    assert results[0]["new"]["ppl"] == pytest.approx(results[1]["new"]["ppl"], rel=1e-6)
    # and the perplexity is what the whole-model session's logits give
    logits = run_logits(create_session(tiny_dynamo20), WINDOWS).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp[:, :-1], WINDOWS[:, 1:, None], -1).mean()
    assert results[1]["ref"]["ppl"] == pytest.approx(float(np.exp(nll)), rel=1e-5)
    assert 0 < results[1]["kl"] and results[1]["top1_agreement"] < 1


def test_repair_streamed_equals_in_ram(tiny_dynamo20):
    from test_repair import GROUP, _down, _fused, _sources

    from ffnfusion.runtime.repair import RepairPass

    weights = []
    for stream in (False, True):
        result = RepairPass(tiny_dynamo20, [GROUP], _sources(same_distribution=True), lambdas=[1e-1],
                            stream=stream)(_fused(tiny_dynamo20))
        assert result.report.streamed == stream
        weights.append((_down(result.model), [c["kl"] for c in result.report.groups[0].candidates]))
    np.testing.assert_allclose(weights[1][1], weights[0][1], rtol=1e-5)
    np.testing.assert_allclose(weights[1][0], weights[0][0], rtol=1e-5, atol=1e-7)
