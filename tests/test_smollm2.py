"""The real model end to end (slow: ~5 min): SmolLM2-135M-Instruct, exported by ffnfusion."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from ffnfusion.cli.demo import DemoOptions, relative_error, run
from ffnfusion.core.model_io import load_model
from ffnfusion.exporters import llama_surgery
from ffnfusion.exporters.onnx_export import ExportOptions, export_model
from ffnfusion.exporters.sources import load_causal_lm, resolve_source
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.plan import FusionPlan
from ffnfusion.runtime import calibration
from ffnfusion.runtime.model_rewrite import fuse_model_file
from ffnfusion.runtime.onnxruntime import create_session, run_logits
from ffnfusion.runtime.tensorrt_check import check_tensorrt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_causal_lm(resolve_source("smollm2"))


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory):
    """Exported with --drop-attention 10-17 and fused 10-13,14-16, as in the README."""
    model, tokenizer = smollm2
    out = tmp_path_factory.mktemp("smollm2")
    import copy

    base = export_model(copy.deepcopy(model), out / "base", ExportOptions(drop_attention=list(range(10, 18))),
                        tokenizer=tokenizer, source="smollm2")
    fused = out / "fused" / "model.onnx"
    fuse_model_file(str(base), str(fused), FusionPlan.parse("10-13,14-16"), target="gpu")
    return base, fused


def test_blocks_and_runs(exported):
    block_map = find_blocks(ir.load(exported[0]))
    assert len(block_map.layers) == 30 and block_map.runs == [(10, 17)]
    assert {layer.ffn.width for layer in block_map.layers} == {1536}
    assert {layer.ffn.norm.epsilon for layer in block_map.layers} == {1e-5}
    fused = find_blocks(ir.load(exported[1]))
    assert [layer.ffn.width for layer in fused.layers] == [1536] * 10 + [6144, 4608] + [1536] * 13
    assert [list(layer.span) for layer in fused.layers][10:12] == [[10, 11, 12, 13], [14, 15, 16]]


def test_fused_logits_equal_the_parallel_form(exported, smollm2):
    import copy

    import torch

    model, tokenizer = smollm2
    ids = calibration.token_windows(tokenizer, calibration.python_docs_text(), 128, 2)
    reference = copy.deepcopy(model)
    llama_surgery.drop_attention(reference, range(10, 18))
    with torch.no_grad():
        sequential = reference(input_ids=torch.from_numpy(ids)).logits.numpy()
        llama_surgery.parallelize_groups(reference, [range(10, 14), range(14, 17)])
        parallel = reference(input_ids=torch.from_numpy(ids)).logits.numpy()
    unfused = run_logits(create_session(exported[0]), ids)
    fused = run_logits(create_session(exported[1]), ids)
    assert relative_error(unfused, sequential) <= 1e-5
    assert relative_error(fused, parallel) <= 1e-5
    assert relative_error(fused, unfused) > 1e-2  # not a no-op


def test_demo_pipeline(tmp_path):
    # Importance is measured on the first 4096 calibration tokens, as in the default demo; the repair
    # and the frontier's selection use fewer tokens than the demo's defaults (CI time: the repair's
    # N×N solves were half of its 4.7 min, the frontier's first step scores every move).
    summary = run(DemoOptions(workdir=str(tmp_path), calib_tokens=4096, dependency_tokens=512,
                              verify_tokens=1024, threshold=1.0, frontier_steps=(2,), frontier_fit_tokens=1024,
                              frontier_select_tokens=256, repair_tokens=2048))
    assert len(summary["dropped_attention"]) == 8
    assert summary["fused_vs_torch_parallel_rel_err"] <= 1e-5
    verification = summary["verification"]
    assert 5 < verification["dropped"]["ref"]["ppl"] < 40  # the original model on real text
    assert set(verification) == {"dropped", "fused", "repaired", "naive", "removed"}
    for name in verification:
        assert 0 < verification[name]["top1_agreement"] <= 1
    # The repair never keeps a refit that raised its held-out KL; the repaired model is the same
    # graph (only W_down values differ) and still passes the TensorRT check.
    for group in summary["repair"]["groups"]:
        assert group["kl_after"] <= group["kl_before"]
        assert group["chosen"] is None or group["fit_error_after"] < group["fit_error_before"]
    fused, repaired = (load_model(tmp_path / name / "model.onnx") for name in ("fused", "repaired"))
    assert [n.op_type for n in fused.graph] == [n.op_type for n in repaired.graph]
    assert check_tensorrt(tmp_path / "repaired" / "model.onnx").ok
    # The frontier's search beats the removal baselines at its budget (KL on the selection text,
    # perplexity on the held-out one), and its written model is the torch model with the same plan.
    frontier = summary["frontier"]
    assert frontier["original_steps"] == 60 and frontier["checked"]["vs_torch_rel_err"] <= 1e-5
    (point,) = frontier["points"]
    assert point["steps"] == 2 and (tmp_path / "frontier" / point["model"]).is_file()
    baselines = frontier["baselines"]
    assert set(baselines) == {"block_removal", "attention_removal", "ffn_removal", "fusion"}  # not block-parallel
    for name in ("block_removal", "attention_removal", "ffn_removal"):
        assert point["kl"] < baselines[name][0]["kl"], name
    assert point["ppl"] < baselines["block_removal"][0]["ppl"]
    runs = summary["runs"]
    assert summary["plan"]["groups"]
    for group in summary["plan"]["groups"]:  # inside one run, never its last FFN
        assert any(first <= group[0] and group[-1] < last for first, last in runs)


def test_generate_equals_transformers_greedy(smollm2, tmp_path):
    """32 new tokens through ORT with the KV cache == transformers' greedy generate."""
    import copy

    import torch

    from ffnfusion.runtime.generate import generate_text

    model, tokenizer = smollm2
    path = export_model(copy.deepcopy(model), tmp_path, ExportOptions(kv_cache=True), tokenizer=tokenizer,
                        source="smollm2")
    prompt = "The Python language reference describes"
    pieces = []
    ours = generate_text(create_session(path), tokenizer, prompt, 32, on_text=pieces.append)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=32, do_sample=False, use_cache=True)[0, ids.shape[1]:]
    assert ours == expected.tolist()
    assert "".join(pieces) == tokenizer.decode(ours, skip_special_tokens=True)


def test_repair_streamed_equals_in_ram_on_smollm2(exported):
    """The refit of group 10-13 (λ fixed; 1,024 fitting tokens and 256 to select from each of Python's
    docs and the license texts) is the same computed block-streamed or with the model in RAM."""
    from ffnfusion.passes.ffn_fusion import FFNFusionPass
    from ffnfusion.runtime.repair import RepairPass

    base = exported[0]
    sources = calibration.repair_sources(base.parent, tokens=2048, window=256, select_tokens=256)
    group = [10, 11, 12, 13]
    downs, kls = [], []
    for stream in (False, True):
        model = ir.load(base)
        FFNFusionPass([group])(model)
        result = RepairPass(base, [group], sources, lambdas=[1.0], stream=stream)(model)
        assert result.report.streamed == stream
        downs.append(find_blocks(result.model).layer(10).ffn.down.numpy_in_out().astype(np.float64))
        kls.append([c["kl"] for c in result.report.groups[0].candidates])
    assert np.linalg.norm(downs[1] - downs[0]) / np.linalg.norm(downs[0]) < 1e-5
    np.testing.assert_allclose(kls[1], kls[0], rtol=1e-5)


def test_analysis_and_verification_streamed_equal_in_ram_on_smollm2(exported):
    """The dependency matrix M, the per-block metrics and the verification numbers on SmolLM2 are the
    same (1e-5 relative) computed block-streamed or with the model in RAM."""
    from ffnfusion.runtime.analysis.dependency import analyze
    from ffnfusion.runtime.block_runner import BlockRunner
    from ffnfusion.runtime.verify import compare_many

    base, fused = exported
    windows = calibration.calibration_windows(base.parent, tokens=512, window=128)
    reports = [analyze(BlockRunner(base, streamed=streamed), windows, max_distance=3, dependency_tokens=256)
               for streamed in (False, True)]
    matrices = [np.array(r.dependency, dtype=float) for r in reports]
    finite = np.isfinite(matrices[0])
    assert finite.sum() > 30 and (finite == np.isfinite(matrices[1])).all()
    np.testing.assert_allclose(matrices[1][finite], matrices[0][finite], rtol=1e-5, atol=1e-7)
    for a, b in zip(reports[0].per_block, reports[1].per_block):
        assert all(b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7) for k in a)
    results = [compare_many(str(base), [str(fused)], windows, stream=s)[0] for s in (False, True)]
    for key in ("top1_agreement", "kl", "hidden_cosine"):
        assert results[1][key] == pytest.approx(results[0][key], rel=1e-5)
    assert results[1]["new"]["ppl"] == pytest.approx(results[0]["new"]["ppl"], rel=1e-5)
