"""ONNX Runtime GenAI's model builder graphs: Skip norms, GroupQueryAttention with rotary inside, tied
embeddings read through a Transpose, KV inputs without a position input. Dropped and fused in place of
the exporter's graphs, they stay builder graphs (Skip norms restored) and onnxruntime_genai runs them.

Slow: the first run makes the builder's own environment (onnxruntime-genai depends on onnxruntime,
which clashes with onnxruntime-gpu), ~1 min."""

from __future__ import annotations

import collections
import copy

import numpy as np
import onnx_ir as ir
import pytest
import torch
from conftest import TINY_DROPPED, greedy_reference, make_tiny_llama, rel_err, save_tiny_tokenizer

from ffnfusion.api import fuse_ffn
from ffnfusion.checks import genai_builder
from ffnfusion.exporters import llama_surgery
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.layer_ranges import format_ranges
from ffnfusion.runtime.model_rewrite import remove_attention_file
from ffnfusion.runtime.onnxruntime import create_session, run_logits

pytestmark = pytest.mark.slow
IDS = np.random.default_rng(1).integers(0, 128, (1, 11))
PROMPT = [5, 17, 33, 90, 4, 61]


def _built(tmp_path_factory, precision: str):
    """The tiny Llama through ORT GenAI's builder at ``precision`` (fp32 | int4)."""
    out = tmp_path_factory.mktemp(f"genai-{precision}")
    make_tiny_llama().save_pretrained(out / "hf")
    save_tiny_tokenizer(out / "hf")
    return genai_builder.build(out / "hf", out / precision, precision)


@pytest.fixture(scope="module")
def builder_fp32(tmp_path_factory):
    return _built(tmp_path_factory, "fp32")


@pytest.fixture(scope="module")
def builder_int4(tmp_path_factory):
    return _built(tmp_path_factory, "int4")


def _ops(path) -> collections.Counter:
    return collections.Counter(node.op_type for node in ir.load(path).graph)


def test_builder_graph_blocks_are_found(builder_fp32):
    model = ir.load(builder_fp32 / "model.onnx")
    assert _ops(builder_fp32 / "model.onnx")["SkipSimplifiedLayerNormalization"] == 16  # no residual Add at all
    block_map = find_blocks(model)
    assert [(layer.attention, layer.ffn.width) for layer in block_map.layers] == [(True, 160)] * 8
    reference = make_tiny_llama()
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(IDS)).logits.numpy()
    assert rel_err(run_logits(create_session(builder_fp32 / "model.onnx"), IDS), expected) < 1e-5


def test_dropped_and_fused_builder_model_is_the_parallel_form_and_runs_in_genai(builder_fp32, tmp_path):
    remove_attention_file(builder_fp32, tmp_path / "dropped", TINY_DROPPED)
    fused = fuse_ffn(tmp_path / "dropped", [TINY_DROPPED], output=tmp_path / "fused")
    reference = make_tiny_llama()
    llama_surgery.drop_attention(reference, TINY_DROPPED)
    llama_surgery.parallelize_groups(reference, [TINY_DROPPED])
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(IDS)).logits.numpy()
    assert rel_err(run_logits(create_session(fused), IDS), expected) < 1e-5

    ops = _ops(fused)
    assert ops["GroupQueryAttention"] == 3 and ops["SkipSimplifiedLayerNormalization"] >= 5  # the builder's kernels
    inputs = [v.name for v in ir.load(fused).graph.inputs]
    assert "past_key_values.2.key" not in inputs and "past_key_values.7.key" in inputs
    assert (tmp_path / "fused" / "genai_config.json").is_file()

    # onnxruntime_genai on the fused folder: its KV cache for layers 0, 1, 7 only
    sequence, logits = list(PROMPT), []
    model = copy.deepcopy(reference)
    with torch.no_grad():
        for _ in range(8):
            logits.append(model(input_ids=torch.tensor([sequence])).logits[0, -1].numpy())
            sequence.append(int(logits[-1].argmax()))
    tokens, genai_logits = genai_builder.greedy(tmp_path / "fused", PROMPT, 8, vocab=128)
    assert tokens == sequence[len(PROMPT):]
    assert rel_err(genai_logits, np.array(logits)) < 1e-5


def test_parallelized_builder_model_is_exact_and_runs_in_genai(builder_fp32, tmp_path):
    """Whole blocks 1-3 side by side on a builder graph: its one packed qkv projection and its
    GroupQueryAttention cores stay per member (the layout says why), the FFNs one batched chain;
    equal to the torch parallel form, and onnxruntime_genai decodes it through its shared KV buffers."""
    from ffnfusion.passes.block_parallel import BATCHED_FFN
    from ffnfusion.runtime.model_rewrite import parallelize_model_file

    summary = parallelize_model_file(builder_fp32, tmp_path / "parallel", "1-3")
    [window] = summary["windows"]
    assert "fused qkv" in window["attention"] and "GroupQueryAttention" in window["attention_core"]
    assert window["ffn"] == BATCHED_FFN
    path = tmp_path / "parallel" / "model.onnx"
    assert _ops(path)["GroupQueryAttention"] == 8 and _ops(path)["SkipSimplifiedLayerNormalization"] >= 10
    reference = make_tiny_llama()
    llama_surgery.parallelize_blocks(reference, [[1, 2, 3]])
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(IDS)).logits.numpy()
    assert rel_err(run_logits(create_session(path), IDS), expected) < 1e-5
    expected_tokens, expected_logits = greedy_reference(reference, PROMPT, 8)
    tokens, genai_logits = genai_builder.greedy(tmp_path / "parallel", PROMPT, 8, vocab=128)
    assert tokens == expected_tokens
    assert rel_err(genai_logits, np.array(expected_logits)) < 1e-5


def test_onnxruntime_genai_runs_our_kv_cache_export(tiny_kv_cache, tiny_llama):
    """``export --kv-cache`` writes a genai_config.json that onnxruntime_genai runs as it is."""
    import json

    config = json.loads((tiny_kv_cache.parent / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is False
    assert config["model"]["decoder"]["inputs"]["position_ids"] == "position_ids"
    reference = copy.deepcopy(tiny_llama)
    llama_surgery.drop_attention(reference, TINY_DROPPED)
    sequence, logits = list(PROMPT), []
    with torch.no_grad():
        for _ in range(8):
            logits.append(reference(input_ids=torch.tensor([sequence])).logits[0, -1].numpy())
            sequence.append(int(logits[-1].argmax()))
    tokens, genai_logits = genai_builder.greedy(tiny_kv_cache.parent, PROMPT, 8, vocab=128)
    assert tokens == sequence[len(PROMPT):]
    assert rel_err(genai_logits, np.array(logits)) < 1e-5


def test_int4_builder_model_fuses_into_int4_with_bounded_added_error(builder_int4, tmp_path):
    """int4 (MatMulNBits, block 32, symmetric): the group is dequantised, folded and requantised in
    the members' format; its error against the torch parallel form stays within 1.5x the error the
    int4 model itself has against torch (unfused), and onnxruntime_genai runs it."""
    remove_attention_file(builder_int4, tmp_path / "dropped", TINY_DROPPED)
    fused = fuse_ffn(tmp_path / "dropped", [TINY_DROPPED], output=tmp_path / "fused")
    ops = _ops(fused)
    assert "MatMul" not in ops and ops["MatMulNBits"] == 3 * 5 + 3 + 1  # 3 attention layers, 1 FFN, head
    written = next(n for n in ir.load(fused).graph if n.name.endswith("/up_proj"))
    assert {k: v.value for k, v in written.attributes.items() if k != "N"} == \
        {"K": 96, "bits": 4, "block_size": 32, "accuracy_level": 4}

    reference = make_tiny_llama()
    llama_surgery.drop_attention(reference, TINY_DROPPED)
    with torch.no_grad():
        unfused_expected = reference(input_ids=torch.from_numpy(IDS)).logits.numpy()
        llama_surgery.parallelize_groups(reference, [TINY_DROPPED])
        fused_expected = reference(input_ids=torch.from_numpy(IDS)).logits.numpy()
    own = rel_err(run_logits(create_session(tmp_path / "dropped" / "model.onnx"), IDS), unfused_expected)
    added = rel_err(run_logits(create_session(fused), IDS), fused_expected)
    assert added <= 1.5 * own, (added, own)
    tokens, _ = genai_builder.greedy(tmp_path / "fused", PROMPT, 8)
    ort = create_session(fused)
    sequence = list(PROMPT)
    for _ in range(8):
        sequence.append(int(run_logits(ort, np.array([sequence]))[0, -1].argmax()))
    assert tokens == sequence[len(PROMPT):]


def test_runners_read_builder_graphs(builder_fp32, tmp_path, capsys):
    """analyze, verify (in RAM and block-streamed), generate and frontier on a builder model: the
    block runner cuts its pieces from the split graph and feeds GQA's KV inputs (head size from
    genai_config.json); a frontier point is a builder model onnxruntime_genai runs."""
    import json

    from ffnfusion.cli import main

    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 128, 2048))
    remove_attention_file(builder_fp32, tmp_path / "dropped", TINY_DROPPED)
    fused = fuse_ffn(tmp_path / "dropped", [[2, 3, 4]], output=tmp_path / "fused")
    dropped = str(tmp_path / "dropped")
    assert main(["analyze", dropped, "-o", str(tmp_path / "report"), "--token-ids", str(ids), "--tokens", "512",
                 "--window", "128", "--dependency-tokens", "256"]) == 0
    assert json.loads((tmp_path / "report" / "plan.json").read_text())["groups"]
    numbers = []
    for stream in ("--no-stream", "--stream"):
        capsys.readouterr()
        assert main(["verify", dropped, str(fused.parent), "--token-ids", str(ids), "--tokens", "512", "--window", "128",
                     "--json", stream]) == 0
        numbers.append(json.loads(capsys.readouterr().out))
    flat = [(n["ref"]["ppl"], n["new"]["ppl"], n["kl"], n["hidden_cosine"]) for n in numbers]
    assert flat[0] == pytest.approx(flat[1], rel=1e-5)
    assert main(["generate", str(fused.parent), "--prompt", "t5 t17 t33", "--max-new-tokens", "4"]) == 0
    assert main(["frontier", dropped, "-o", str(tmp_path / "frontier"), "--calib-ids", str(ids), str(ids),
                 "--eval-ids", str(ids), "--tokens", "512", "--select-tokens", "128", "--eval-tokens", "512",
                 "--window", "128", "--steps", "6", "--no-latency", "--baselines", "none"]) == 0
    point = tmp_path / "frontier" / "steps-6"
    assert _ops(point / "model.onnx")["SkipSimplifiedLayerNormalization"] >= 5 and (point / "genai_config.json").is_file()
    tokens, _ = genai_builder.greedy(point, PROMPT, 6)
    session = create_session(point / "model.onnx")
    sequence = list(PROMPT)
    for _ in range(6):
        sequence.append(int(run_logits(session, np.array([sequence]))[0, -1].argmax()))
    assert tokens == sequence[len(PROMPT):]


def test_fused_gate_up_layout_fuses_exactly(tmp_path):
    """``--extra_options fuse_mlp_gate_up=true``: gate and up as one MatMul and a Split; the two halves
    are read as the gate and up projections."""
    make_tiny_llama().save_pretrained(tmp_path / "hf")
    save_tiny_tokenizer(tmp_path / "hf")
    built = genai_builder.build(tmp_path / "hf", tmp_path / "gate_up", "fp32", {"fuse_mlp_gate_up": "true"})
    assert _ops(built / "model.onnx")["Split"] == 8
    remove_attention_file(built, tmp_path / "dropped", TINY_DROPPED)
    fused = fuse_ffn(tmp_path / "dropped", [TINY_DROPPED], output=tmp_path / "fused")
    reference = make_tiny_llama()
    llama_surgery.drop_attention(reference, TINY_DROPPED)
    llama_surgery.parallelize_groups(reference, [TINY_DROPPED])
    expected_tokens, _ = greedy_reference(reference, PROMPT, 6)
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(IDS)).logits.numpy()
    assert rel_err(run_logits(create_session(fused), IDS), expected) < 1e-5
    assert genai_builder.greedy(tmp_path / "fused", PROMPT, 6)[0] == expected_tokens


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_every_entry_point_writes_the_same_builder_model_and_reading_changes_nothing(
        precision, builder_fp32, builder_int4, tmp_path):
    """Skip norms split for the walk and restored, 4-bit groups requantised: by the pass on an
    onnx_ir.Model, fuse_ffn on a ModelProto, Olive's FuseFFN and `ffnfusion fuse` alike (byte-identical
    models), and find_blocks on the input changes none of its bytes."""
    from entry_points import fused_by_every_entry_point

    remove_attention_file(builder_fp32 if precision == "fp32" else builder_int4, tmp_path / "dropped", TINY_DROPPED)
    model = ir.load(tmp_path / "dropped" / "model.onnx")
    before = ir.serde.serialize_model(model).SerializeToString(deterministic=True)
    assert len(find_blocks(model).layers) == 8
    assert ir.serde.serialize_model(model).SerializeToString(deterministic=True) == before
    results = fused_by_every_entry_point(tmp_path / "dropped", format_ranges(TINY_DROPPED), tmp_path / "fused")
    assert len(results) >= 3 and len(set(results.values())) == 1, {k: len(v) for k, v in results.items()}
    fused = ir.load(tmp_path / "fused" / "cli" / "model.onnx")
    ops = collections.Counter(node.op_type for node in fused.graph)
    assert ops["SkipSimplifiedLayerNormalization"] > 0
    assert (ops["MatMul"] == 0) == (precision == "int4")
