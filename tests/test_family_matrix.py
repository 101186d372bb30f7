"""Decoder families beside Llama, each a tiny random model built from its transformers config class:
Qwen2 (q/k/v biases), Qwen3 (QK-norm), Mistral (sliding window shorter than the inputs), Phi-3 (one
gate_up_proj and one qkv_proj matrix), Granite (residual, embedding and attention multipliers, logits
scaling), Gemma 2 and Gemma 3 (sandwich norms: post-normed FFNs, fused in the grouped form and
refitted through their RMS; alternating sliding-window layers; soft-capping, QK-norm).

For each: the export equals transformers (with and without attention in layers 2-4), fusing 2-4
equals a torch reference of the parallel form, so do windows of whole blocks run side by side, and a
2-step frontier point written to disk equals the same plan and refits applied to the torch model.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx_ir as ir
import pytest
import torch
from conftest import prefill_then_decode, rel_err, without_attention

from ffnfusion.core.model_io import load_model
from ffnfusion.exporters import llama_surgery
from ffnfusion.exporters.onnx_export import ExportOptions, export_model
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.depth_plan import DepthPlan
from ffnfusion.passes.ffn_fusion import FFNFusionPass
from ffnfusion.runtime.exactness import fused_group_error
from ffnfusion.runtime.onnxruntime import create_session, run_logits

DROPPED = [2, 3, 4]
COMMON = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
FAMILIES = {  # name -> (config class, model class, config beyond COMMON)
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"residual_multiplier": 0.5, "embedding_multiplier": 3.0,
                                                        "attention_multiplier": 0.2, "logits_scaling": 2.0}),
    # sandwich norms (post-normed FFNs), GeGLU, (1 + w) gains, sliding and global layers; Gemma 2
    # soft-caps attention scores and logits, Gemma 3 has QK-norm
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 4,  # caps low enough to bite
                                                    "final_logit_softcapping": 5.0, "attn_logit_softcapping": 10.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 4}),
}
IDS = np.random.default_rng(1).integers(0, 128, (2, 9))  # 9 tokens: past Mistral's window of 4



def _logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.numpy()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, random model, full export, export with attention dropped in 2-4)."""
    import transformers

    name = request.param
    config_class, model_class, extra = FAMILIES[name]
    if not hasattr(transformers, model_class):
        pytest.skip(f"transformers {transformers.__version__} has no {model_class}")
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**COMMON, **extra)).eval()
    with torch.no_grad():  # norms and biases away from their 1 and 0, so a misplaced one shows; every
        for parameter_name, parameter in model.named_parameters():  # branch large enough to matter
            if "norm" in parameter_name:
                parameter.uniform_(0.5, 1.5)
            elif parameter_name.endswith("bias"):
                parameter.uniform_(-0.3, 0.3)
            elif parameter.ndim == 2 and "embed" not in parameter_name:
                parameter.normal_(0.0, 1.0 / parameter.shape[1] ** 0.5)
    out = tmp_path_factory.mktemp(name)
    full = export_model(copy.deepcopy(model), out / "full", ExportOptions())
    dropped = export_model(copy.deepcopy(model), out / "dropped", ExportOptions(drop_attention=DROPPED))
    return name, model, full, dropped


def test_export_equals_transformers(family):
    name, model, full, dropped = family
    assert rel_err(run_logits(create_session(full), IDS), _logits(model)) < 1e-4, name
    expected = _logits(without_attention(model, DROPPED))
    assert rel_err(run_logits(create_session(dropped), IDS), expected) < 1e-4, name
    block_map = find_blocks(ir.load(dropped))
    assert block_map.runs == [(2, 4)] and len(block_map.layers) == 6


FLOAT16_KV = {"qwen2", "phi3"}  # biased and fused projections: where float16 casts differ from Llama's


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_kv_cache_export_prefill_then_decode_equals_transformers(family, tmp_path, dtype):
    name, model, _, _ = family
    if dtype == "float16" and name not in FLOAT16_KV:
        pytest.skip(f"float16 KV export checked on {', '.join(sorted(FLOAT16_KV))} (one export each; CI time)")
    path = export_model(copy.deepcopy(model), tmp_path, ExportOptions(drop_attention=[0, 3], kv_cache=True,
                                                                      dtype=dtype))
    prefill, decode = prefill_then_decode(create_session(path), IDS, 6)
    full = _logits(without_attention(model, [0, 3]))
    tolerance = 1e-4 if dtype == "float32" else 5e-3  # fp16 round-off, a few dozen ops deep
    assert rel_err(prefill[0].astype(np.float32), full[:, :6]) <= tolerance, name
    assert rel_err(decode[0].astype(np.float32), full[:, 6:]) <= tolerance, name


def test_fusion_equals_the_torch_parallel_form(family, tmp_path):
    name, model, _, dropped = family
    onnx_model = ir.load(dropped)
    FFNFusionPass([DROPPED])(onnx_model)
    fused = tmp_path / "fused.onnx"
    ir.save(onnx_model, fused)
    reference = copy.deepcopy(model)
    llama_surgery.drop_attention(reference, DROPPED)
    llama_surgery.parallelize_groups(reference, [DROPPED])
    assert rel_err(run_logits(create_session(fused), IDS), _logits(reference)) <= 1e-5, name
    assert fused_group_error(str(dropped), str(fused), DROPPED)["rel_err"] <= 1e-5
    assert find_blocks(ir.load(fused)).layer(2).span == range(2, 5)


def test_block_parallel_windows_equal_the_torch_parallel_form(family, tmp_path):
    """Whole blocks side by side: 0-1 (both with attention), 3-5 (attention dropped in 3 and 4).
    Where the family's attention or FFN layout does not batch (biases, QK-norm, one qkv matrix,
    post-norms, cores with different masks), the members keep their own products: still exact."""
    from ffnfusion.passes.block_parallel import WIDE_CORE, WIDE_QKV, parallelize_windows

    name, model, _, dropped = family
    windows = [[0, 1], [3, 4, 5]]
    onnx_model = ir.load(dropped)
    result = parallelize_windows(onnx_model, windows)
    if name in ("qwen2", "mistral", "granite"):  # Llama-shaped attention (Qwen2's q/k/v biases stacked)
        assert [w.attention for w in result.windows] == [WIDE_QKV, WIDE_QKV], name
    # window 0-1's two attention cores as one with all their heads; Gemma 2's layer 0 is sliding, 1 global
    assert ("different masks" in result.windows[0].core) if name == "gemma2" else result.windows[0].core == WIDE_CORE
    written = tmp_path / "parallel.onnx"
    ir.save(onnx_model, written)
    reference = copy.deepcopy(model)
    llama_surgery.drop_attention(reference, DROPPED)
    llama_surgery.parallelize_blocks(reference, windows)
    assert rel_err(run_logits(create_session(written), IDS), _logits(reference)) <= 1e-5, name
    assert [(layer.index, layer.last) for layer in find_blocks(ir.load(written)).layers if layer.window] == [(0, 1), (3, 5)]


def test_depth_plan_equals_the_torch_model_with_the_same_plan(family, tmp_path):
    from ffnfusion.passes.depth_plan import DepthReductionPass

    name, model, full, _ = family
    # blocks 0-1 side by side (a refit in 1's FFN), attention 3-4 and FFN 5 removed, FFNs 2-4 fused
    plan = DepthPlan(6, removed_attention=frozenset({3, 4}), removed_ffn=frozenset({5}), groups=((2, 4),),
                     windows=((0, 1),))
    rng = np.random.default_rng(2)
    deltas = {1: rng.normal(0, 0.05, (96, 64)).astype(np.float32),
              2: rng.normal(0, 0.05, (3 * 96, 64)).astype(np.float32)}
    onnx_model = load_model(full)
    DepthReductionPass(plan, deltas)(onnx_model)
    written = tmp_path / "model.onnx"
    ir.save(onnx_model, written)
    assert find_blocks(ir.load(written)).sequential_steps == plan.steps
    reference = copy.deepcopy(model)
    llama_surgery.apply_depth_plan(reference, plan, deltas)
    assert rel_err(run_logits(create_session(written), IDS), _logits(reference)) <= 1e-5, name
    assert rel_err(_logits(reference), _logits(model)) > 1e-2  # the plan changes the model


def _refits(original, written, plan: DepthPlan, refitted: list[int]) -> dict[int, np.ndarray]:
    """The frontier's refits read back from the files: written down projection minus the original
    members' (``[width, hidden]``, members in order; a fused group's zero padding left out)."""
    before, after = find_blocks(load_model(original)), find_blocks(load_model(written))
    deltas = {}
    for first in refitted:
        last = plan.ffn_span(first)[1]
        members = np.concatenate([before.ffn(i).down.numpy_in_out() for i in range(first, last + 1)])
        written_down = after.ffn(first).down.numpy_in_out()
        assert not written_down[len(members):].any()  # padding to an aligned width adds nothing
        deltas[first] = written_down[:len(members)] - members
    return deltas


@pytest.mark.slow
def test_frontier_point_equals_the_torch_model_with_its_plan(family, tmp_path):
    from ffnfusion.cli import main

    name, model, full, _ = family
    calib = []
    for index in range(3):
        calib.append(tmp_path / f"calib{index}.npy")
        np.save(calib[-1], np.random.default_rng(10 + index).integers(0, 128, 1024))
    assert main(["frontier", str(full), "-o", str(tmp_path / "frontier"), "--steps", "2", "--tokens", "512",
                 "--select-tokens", "128", "--eval-tokens", "128", "--window", "64", "--baselines", "none",
                 "--no-latency", "--calib-ids", *map(str, calib), "--eval-ids", str(calib[0])]) == 0
    point = tmp_path / "frontier" / "steps-2"
    reduction = json.loads((point / "ffnfusion.json").read_text())["depth_reduction"]
    plan = DepthPlan.from_dict(reduction["plan"])
    assert plan.saved == 2
    reference = copy.deepcopy(model)
    llama_surgery.apply_depth_plan(
        reference, plan, _refits(full, point / "model.onnx", plan, reduction["refitted_ffns"]))
    assert rel_err(run_logits(create_session(point / "model.onnx"), IDS), _logits(reference)) <= 1e-5, \
        (name, reduction["moves"])


EXPORT_HF_REFUSALS = {"qwen2": "attention projections with biases", "qwen3": "QK-norm",
                      "mistral": "sliding-window attention (window 4)", "phi3": "fused qkv projection",
                      "granite": "attention_multiplier", "gemma2": "sliding-window attention",
                      "gemma3": "sliding-window attention"}


def test_export_hf_refuses_what_nemotron_nas_cannot_carry_in_one_line(family, tmp_path, capsys):
    from ffnfusion.cli import main

    name, _, _, dropped = family
    assert main(["export-hf", str(dropped), "-o", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert EXPORT_HF_REFUSALS[name] in err[-1] and err[-1].startswith("ffnfusion: error:"), err
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_every_model_command_runs(family, tmp_path, capsys):
    """analyze, fuse --repair, verify, bench and check-trt on each family's attention-dropped export."""
    from ffnfusion.cli import main

    name, _, _, dropped = family
    ids, other = tmp_path / "ids.npy", tmp_path / "other.npy"
    np.save(ids, np.random.default_rng(3).integers(0, 128, 4096))
    np.save(other, np.random.default_rng(4).integers(0, 128, 4096))
    report = tmp_path / "report"
    repaired = tmp_path / "repaired.onnx"
    for argv in (["analyze", dropped, "-o", report, "--calib-ids", ids, "--tokens", 128, "--window", 32,
                  "--dependency-tokens", 64, "--threshold", 10, "--include-last"],
                 ["fuse", dropped, "-o", repaired, "--groups", "2-4", "--repair", "--repair-tokens", 2048,
                  "--calib-ids", ids, other],
                 ["verify", dropped, repaired, "--text-ids", ids, "--tokens", 64, "--window", 32, "--json"],
                 ["bench", dropped, repaired, "--batch", "1", "--seq", "4", "--repeats", "2"],
                 ["check-trt", repaired]):
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 0, (name, argv[0], err[-2000:])
    assert json.loads((report / "plan.json").read_text())["groups"]  # the dropped run is found and planned
    assert find_blocks(ir.load(repaired)).layer(2).span == range(2, 5)
