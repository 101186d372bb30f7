"""Block-parallel windows (``ffnfusion parallelize``): whole decoder blocks, attention included, run
side by side as ``y = x + Σ_j (block_j(x) − x)``.

Every written model equals transformers' own layers computed in that form
(:func:`~ffnfusion.exporters.llama_surgery.parallelize_blocks`) to 1e-5: windows of k = 2..4 blocks,
the tiny Llama's GQA (6 query heads over 2 KV heads), members whose attention was dropped, prefill
then decode with a KV cache, and the TorchScript and opset-23 encodings. It is another function than
the sequential layers (checked too), and the other families are in ``test_family_matrix.py``.
"""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import onnx_ir as ir
import pytest
import torch
from conftest import TINY_DROPPED, prefill_then_decode, rel_err

from ffnfusion.cli import main
from ffnfusion.core.errors import InvalidArgumentError, InvalidPlanError
from ffnfusion.exporters import llama_surgery
from ffnfusion.exporters.onnx_export import ExportOptions, export_model
from ffnfusion.passes.block_parallel import (
    BATCHED_FFN,
    SEPARATE_CORES,
    WIDE_CORE,
    WIDE_QKV,
    BlockParallelPass,
    parallelize_windows,
)
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.ffn_fusion import FFNFusionPass
from ffnfusion.runtime.onnxruntime import create_session, run_logits

IDS = np.random.default_rng(3).integers(0, 128, (2, 11))


def _reference(model, windows, dropped=(), ids=IDS) -> np.ndarray:
    reference = copy.deepcopy(model)
    llama_surgery.drop_attention(reference, dropped)
    llama_surgery.parallelize_blocks(reference, windows)
    with torch.no_grad():
        return reference(input_ids=torch.from_numpy(ids)).logits.numpy()


def _parallelized(source, windows, tmp_path):
    model = ir.load(source)
    steps = find_blocks(model).sequential_steps
    result = parallelize_windows(model, windows)
    path = tmp_path / "parallel.onnx"
    ir.save(model, path)
    return path, result, steps


@pytest.mark.parametrize("windows", [[[1, 2]], [[1, 2, 3]], [[3, 4, 5, 6]], [[0, 1], [4, 5, 6]], [[0, 1], [2, 3], [6, 7]]],
                         ids=["k2", "k3", "k4", "two-windows", "adjacent-first-and-last"])
def test_windows_equal_the_torch_parallel_form(tiny_llama, tiny_full, tmp_path, windows):
    path, result, steps = _parallelized(tiny_full, windows, tmp_path)
    assert [(w.attention, w.core, w.ffn) for w in result.windows] == [(WIDE_QKV, WIDE_CORE, BATCHED_FFN)] * len(windows)
    softmaxes = [n for n in ir.load(path).graph if n.op_type == "Softmax"]
    assert len(softmaxes) == 8 - sum(len(w) - 1 for w in windows)  # one decomposed core per window
    logits = run_logits(create_session(path), IDS)
    assert rel_err(logits, _reference(tiny_llama, windows)) <= 1e-5
    assert rel_err(logits, _reference(tiny_llama, [])) > 1e-2  # not the sequential layers
    blocks = find_blocks(ir.load(path))
    assert [(layer.index, layer.last) for layer in blocks.layers if layer.window] == [(w[0], w[-1]) for w in windows]
    # each window: its blocks' attention + FFN steps become 2
    assert blocks.sequential_steps == steps - sum(2 * len(w) - 2 for w in windows)
    assert sum(w.saved_steps for w in result.windows) == steps - blocks.sequential_steps


def test_dropped_members_and_kv_cache_prefill_then_decode(tiny_llama, tiny_kv_cache, tmp_path):
    """Attention dropped in 2-6: window 5-7 has one attention among three blocks (a member without
    attention is its FFN on x), 0-1 two; every past/present stays as it was."""
    windows = [[0, 1], [5, 6, 7]]
    path, result, steps = _parallelized(tiny_kv_cache, windows, tmp_path)
    assert [w.attention_layers for w in result.windows] == [(0, 1), (7,)]
    assert [w.saved_steps for w in result.windows] == [2, 2]
    before, after = create_session(tiny_kv_cache), create_session(path)
    assert [(i.name, i.shape) for i in after.get_inputs()] == [(i.name, i.shape) for i in before.get_inputs()]
    assert [o.name for o in after.get_outputs()] == [o.name for o in before.get_outputs()]
    reference = _reference(tiny_llama, windows, TINY_DROPPED)
    prefill, decode = prefill_then_decode(after, IDS, 7)
    assert rel_err(prefill[0], reference[:, :7]) <= 1e-5
    assert rel_err(decode[0], reference[:, 7:]) <= 1e-5


@pytest.mark.parametrize("variant", ["torchscript-opset18", "dynamo-opset23"])
def test_other_encodings(tiny_llama, tiny_variants, tmp_path, variant):
    """TorchScript (no shapes on the stream, Casts around it) and opset 23 (RotaryEmbedding and
    Attention ops). Batch 1: ONNX Runtime's opset-23 RotaryEmbedding rejects a batch of 2."""
    ids = IDS[:1]
    windows = [[1, 2, 3], [6, 7]]
    path, result, _ = _parallelized(tiny_variants[variant], windows, tmp_path)
    assert [(w.attention, w.ffn) for w in result.windows] == [(WIDE_QKV, BATCHED_FFN)] * 2
    logits = run_logits(create_session(path), ids)
    assert rel_err(logits, _reference(tiny_llama, windows, TINY_DROPPED, ids)) <= 1e-5


def test_opset23_cores_become_one_attention_op_with_the_kv_cache(tiny_llama, tmp_path, capsys):
    """Opset 23 writes each core as ONNX's Attention op: a window's cores become one op with every
    member's heads (6 query heads each, K/V expanded from 2 by the exporter), prefill then decode
    through the members' own past/present unchanged. Batch 1 (ORT's opset-23 RotaryEmbedding)."""
    source = export_model(copy.deepcopy(tiny_llama), tmp_path / "export",
                          ExportOptions(opset=23, kv_cache=True))
    windows = [[1, 2, 3], [5, 6]]
    path, result, _ = _parallelized(source, windows, tmp_path)
    assert [(w.attention, w.core, w.ffn) for w in result.windows] == [(WIDE_QKV, WIDE_CORE, BATCHED_FFN)] * 2
    cores = [n for n in ir.load(path).graph if n.op_type == "Attention"]
    assert len(cores) == 8 - 3  # 8 layers, windows of 3 and 2 cores each one op
    assert sorted(n.inputs[0].shape[1] for n in cores) == [6, 6, 6, 12, 18]  # heads: k × 6
    before, after = create_session(source), create_session(path)
    assert [(i.name, i.shape) for i in after.get_inputs()] == [(i.name, i.shape) for i in before.get_inputs()]
    ids = IDS[:1]
    reference = _reference(tiny_llama, windows, (), ids)
    prefill, decode = prefill_then_decode(after, ids, 7)
    assert rel_err(prefill[0], reference[:, :7]) <= 1e-5
    assert rel_err(decode[0], reference[:, 7:]) <= 1e-5
    assert rel_err(decode[0], _reference(tiny_llama, [], (), ids)[:, 7:]) > 1e-2
    assert main(["inspect", str(path)]) == 0
    assert "block-parallel windows: 1-3 (3 blocks), 5-6 (2 blocks)" in capsys.readouterr().out
    assert main(["check-trt", str(path)]) == 0  # the wide op's 18 heads: TensorRT's Attention rules hold
    assert "0 problems" in capsys.readouterr().out


def test_separate_cores_when_asked(tiny_llama, tiny_full, tmp_path):
    """``--separate-cores``: each member's core stays its own Softmax, the rest as before; exact too."""
    out = tmp_path / "separate"
    assert main(["parallelize", str(tiny_full), "-o", str(out), "--windows", "1-3,5-6", "--separate-cores"]) == 0
    written = ir.load(out / "model.onnx")
    assert sum(n.op_type == "Softmax" for n in written.graph) == 8
    assert [w["attention_core"] for w in json.loads((out / "ffnfusion.json").read_text())["parallel_windows"]] == \
        [SEPARATE_CORES] * 2
    logits = run_logits(create_session(out / "model.onnx"), IDS)
    assert rel_err(logits, _reference(tiny_llama, [[1, 2, 3], [5, 6]])) <= 1e-5


def test_a_window_that_is_already_parallel_reads_on(tiny_llama, tiny_full, tmp_path):
    """A second pass adds its windows beside the first's (metadata merged, both recognised)."""
    model = ir.load(tiny_full)
    parallelize_windows(model, [[5, 6]])
    parallelize_windows(model, "1-2")
    assert model.metadata_props["ffnfusion.parallel_windows"] == "1-2,5-6"
    path = tmp_path / "twice.onnx"
    ir.save(model, path)
    assert rel_err(run_logits(create_session(path), IDS), _reference(tiny_llama, [[1, 2], [5, 6]])) <= 1e-5
    with pytest.raises(InvalidPlanError, match="layer 6 already runs in window 5-6"):
        parallelize_windows(model, [[6, 7]])


@pytest.mark.parametrize("windows, error, message", [
    ("3-3", InvalidArgumentError, "two or more consecutive layers"),
    ("1-3,3-4", InvalidArgumentError, "windows 1-3 and 3-4 overlap"),
    ("7-8", InvalidPlanError, "layer 8 does not exist"),
    ("3-4", InvalidPlanError, r"no member keeps its attention.*ffnfusion fuse --groups 3-4"),
])
def test_bad_windows_are_refused(tiny_dynamo20, windows, error, message):
    model = ir.load(tiny_dynamo20)
    with pytest.raises(error, match=message):
        BlockParallelPass(windows)(model)


def test_a_fused_ffn_is_not_a_block(tiny_dynamo20):
    model = ir.load(tiny_dynamo20)
    FFNFusionPass([[2, 3, 4]])(model)
    with pytest.raises(InvalidPlanError, match="layer 2 is part of the fused FFN 2-4"):
        parallelize_windows(model, [[1, 2]])


def test_cli_writes_inspects_verifies_and_refuses(tiny_full, tmp_path, capsys):
    digest = hashlib.sha256(tiny_full.read_bytes()).hexdigest()
    out = tmp_path / "parallel"
    assert main(["parallelize", str(tiny_full), "-o", str(out), "--windows", "1-3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["windows"] == [{"layers": [1, 3], "attention_layers": [1, 2, 3], "attention": WIDE_QKV,
                                   "attention_core": WIDE_CORE, "ffn": BATCHED_FFN, "saved_steps": 4}]
    assert json.loads((out / "ffnfusion.json").read_text())["parallel_windows"] == summary["windows"]
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "block-parallel windows: 1-3 (3 blocks)" in table and "sequential steps: 12" in table
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(4).integers(0, 128, 512))
    assert main(["verify", str(tiny_full), str(out), "--text-ids", str(ids), "--tokens", "256", "--window", "128"]) == 0
    assert "KL(ref||new)" in capsys.readouterr().out
    assert main(["check-trt", str(out)]) == 0
    assert "0 problems" in capsys.readouterr().out
    # refused in one line, nothing written: a bad window (exit 2), FFN fusion inside a window (a plan
    # the model cannot take: exit 1)
    for argv, code, message in (
        (["parallelize", str(tiny_full), "-o", str(tmp_path / "bad"), "--windows", "2-2"], 2, "two or more"),
        (["fuse", str(out), "-o", str(tmp_path / "bad"), "--groups", "2-3"], 1, "block-parallel window"),
    ):
        assert main(argv) == code
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("ffnfusion: error:")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
        assert not (tmp_path / "bad").exists()
    assert hashlib.sha256(tiny_full.read_bytes()).hexdigest() == digest


def test_block_windows_benchmark(tiny_full, tmp_path, capsys):
    """Ranks windows on the model's own analysis and measures the best 1..count side by side."""
    from ffnfusion.benchmarks import block_windows

    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(5).integers(0, 128, 512))
    out = tmp_path / "rows.json"
    assert block_windows.main([str(tiny_full), "--size", "2", "--count", "2", "--work", str(tmp_path / "work"),
                               "--calib-ids", str(ids), "--eval-ids", str(ids), "--tokens", "256", "--window", "64",
                               "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [len(row["windows"]) for row in rows] == [1, 2] and [row["steps_saved"] for row in rows] == [2, 4]
    assert rows[0]["windows"][0] in (rows[1]["windows"])  # the best window stays as more are added
    assert all(row["kl"] > 0 and row["ppl"] > 0 for row in rows)
    assert "| none (original) |" in capsys.readouterr().out
    second = find_blocks(ir.load(tmp_path / "work" / "windows-2" / "model.onnx"))
    assert sorted((layer.index, layer.last) for layer in second.layers if layer.window) == \
        sorted(tuple(window) for window in rows[1]["windows"])
