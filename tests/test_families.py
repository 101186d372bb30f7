"""Model families beyond Llama: GeGLU (Gemma), a plain biased MLP after LayerNorm (GPT-NeoX), and Gemma 2/3's
sandwich norms (post-normed FFNs: exported, read, fused in their grouped form, repaired through their
post-norm gains)."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx_ir as ir
import pytest
import torch
from conftest import rel_err, without_attention

from ffnfusion.exporters import llama_surgery
from ffnfusion.exporters.onnx_export import ExportOptions, export_model
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.ffn_fusion import FFNFusionPass
from ffnfusion.passes.plan import InvalidPlanError
from ffnfusion.runtime.exactness import fused_group_error
from ffnfusion.runtime.onnxruntime import create_session, run_logits

DROPPED = [2, 3, 4]


def _random_model_and_export(model_class, config, randomize, seed, directory):
    """A random tiny model of a family (parameters edited by ``randomize(name, param)``), exported
    with attention dropped in layers 2-4."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            randomize(name, param)
    path = export_model(copy.deepcopy(model), directory, ExportOptions(drop_attention=DROPPED))
    return model, path


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    """Gemma: gated GELU-tanh (GeGLU), (1 + w) norm gains, scaled embedding."""
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=64)
    return _random_model_and_export(
        GemmaForCausalLM, config, lambda name, p: p.uniform_(-0.5, 0.5) if "norm" in name else None, 1,
        tmp_path_factory.mktemp("gemma"))


def test_geglu_recognised_and_fused_exactly(tiny_gemma, tmp_path):
    model, path = tiny_gemma
    onnx_model = ir.load(path)
    block_map = find_blocks(onnx_model)
    assert block_map.runs == [(2, 4)]
    assert {layer.ffn.activation for layer in block_map.layers} == {"gelu_tanh"}
    FFNFusionPass([[2, 3, 4]])(onnx_model)
    fused = tmp_path / "fused.onnx"
    ir.save(onnx_model, fused)

    ids = np.random.default_rng(15).integers(0, 128, (2, 8))
    reference = copy.deepcopy(model)
    llama_surgery.drop_attention(reference, [2, 3, 4])
    llama_surgery.parallelize_groups(reference, [[2, 3, 4]])
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert rel_err(run_logits(create_session(fused), ids), expected) <= 1e-5
    assert find_blocks(ir.load(fused)).layer(3).ffn.activation == "gelu_tanh"


def test_group_with_different_activations_is_refused(tiny_gemma):
    onnx_model = ir.load(tiny_gemma[1])
    gelu = next(n for n in find_blocks(onnx_model).ffn(3).nodes if n.op_type == "Gelu")
    gelu.attributes["approximate"] = ir.AttrString("approximate", "none")
    with pytest.raises(InvalidPlanError, match="layer 3 has activation gelu, layer 2 has gelu_tanh"):
        FFNFusionPass([[2, 3]])(onnx_model)


@pytest.fixture(scope="module")
def tiny_neox(tmp_path_factory):
    """GPT-NeoX with sequential residuals: LayerNorm (with bias) and a biased GELU MLP."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    def randomize(name, param):
        if name.endswith(".bias"):
            param.uniform_(-0.5, 0.5)
        elif "layernorm" in name:
            param.uniform_(0.5, 1.5)

    config = GPTNeoXConfig(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=6,
                           num_attention_heads=4, max_position_embeddings=64, use_parallel_residual=False)
    return _random_model_and_export(GPTNeoXForCausalLM, config, randomize, 2, tmp_path_factory.mktemp("neox"))


def test_layernorm_biased_mlp_fused_exactly(tiny_neox, tmp_path):
    model, path = tiny_neox
    onnx_model = ir.load(path)
    block = find_blocks(onnx_model).ffn(3)
    assert (block.kind, block.norm.kind, block.activation) == ("plain", "LayerNormalization", "gelu")
    assert block.norm.bias is not None and block.up_bias is not None and block.down_bias is not None
    FFNFusionPass([[2, 3, 4]])(onnx_model)
    fused = tmp_path / "fused.onnx"
    ir.save(onnx_model, fused)
    assert find_blocks(ir.load(fused)).layer(2).ffn.width == 3 * 160

    ids = np.random.default_rng(16).integers(0, 128, (2, 8))
    reference = copy.deepcopy(model)
    llama_surgery.drop_attention(reference, [2, 3, 4])
    with torch.no_grad():
        sequential = reference(input_ids=torch.from_numpy(ids)).logits.numpy()
        llama_surgery.parallelize_groups(reference, [[2, 3, 4]])
        parallel = reference(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert rel_err(run_logits(create_session(path), ids), sequential) <= 1e-5
    assert rel_err(run_logits(create_session(fused), ids), parallel) <= 1e-5
    assert fused_group_error(str(path), str(fused), [2, 3, 4])["rel_err"] <= 1e-5  # numpy, from the weights


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    """Gemma 3: sandwich norms (the FFN branch is post_ff(mlp(pre_ff(x))), the attention branch
    post_attn(attn(input_ln(x)))), QK-norm, sliding and global layers."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64,
                              sliding_window=8)

    def randomize(name, param):
        if "norm" in name:
            param.uniform_(-0.5, 0.5)

    return _random_model_and_export(Gemma3ForCausalLM, config, randomize, 5, tmp_path_factory.mktemp("gemma3"))



def test_sandwich_norm_layers_export_exactly_and_are_read(tiny_gemma3, tmp_path, capsys):
    from ffnfusion.cli import main

    model, path = tiny_gemma3
    with torch.no_grad():
        expected = without_attention(model, DROPPED)(input_ids=torch.from_numpy(GEMMA_IDS)).logits.numpy()
    assert rel_err(run_logits(create_session(path), GEMMA_IDS), expected) < 1e-4  # attention-free layers: FFN post-normed
    block_map = find_blocks(ir.load(path))
    assert block_map.runs == [(2, 4)]
    assert all(layer.ffn is not None and layer.ffn.post_norm is not None for layer in block_map.layers)
    assert main(["inspect", str(path)]) == 0 and "rms_decomposed+post" in capsys.readouterr().out
    # Removing a whole branch stays exact: attention dropped in layer 5 as well.
    assert main(["drop-attention", str(path), "--layers", "5", "-o", str(tmp_path / "dropped")]) == 0
    with torch.no_grad():
        expected = without_attention(model, [*DROPPED, 5])(input_ids=torch.from_numpy(GEMMA_IDS)).logits.numpy()
    assert rel_err(run_logits(create_session(tmp_path / "dropped" / "model.onnx"), GEMMA_IDS), expected) < 1e-4


GEMMA_IDS = np.random.default_rng(6).integers(0, 128, (2, 9))


def _parallel_reference_logits(model, groups) -> np.ndarray:
    """The torch model with attention dropped in 2-4 and ``groups`` in parallel form:
    ``x + Σ post_j(mlp_j(pre_j(x)))`` (llama_surgery.ParallelFFNGroup)."""
    reference = copy.deepcopy(model)
    llama_surgery.drop_attention(reference, DROPPED)
    llama_surgery.parallelize_groups(reference, groups)
    with torch.no_grad():
        return reference(input_ids=torch.from_numpy(GEMMA_IDS)).logits.numpy()


def test_sandwich_norm_group_fuses_exactly_into_the_grouped_form(tiny_gemma3, tmp_path, capsys):
    from ffnfusion.cli import main

    model, path = tiny_gemma3
    assert main(["fuse", str(path), "--groups", "2-4", "-o", str(tmp_path / "fused")]) == 0
    fused = tmp_path / "fused" / "model.onnx"
    logits = run_logits(create_session(fused), GEMMA_IDS)
    assert rel_err(logits, _parallel_reference_logits(model, [DROPPED])) <= 1e-5
    assert rel_err(logits, run_logits(create_session(path), GEMMA_IDS)) > 1e-3  # not the sequential model
    # Read back as one FFN of the members' total width with a stacked post-norm: 4 sequential steps
    # (norm, wide gate/up GEMM, batched down GEMM, norms + sum) where there were 12.
    onnx_model = ir.load(fused)
    block = find_blocks(onnx_model).layer(2)
    assert block.span == range(2, 5) and block.ffn.width == 3 * 96 and block.ffn.norm_description == "rms_decomposed+post"
    assert block.ffn.post_norm.gain.const_value.shape.numpy() == (3, 1, 64)
    matmuls = [node for node in onnx_model.graph if node.op_type == "MatMul" and node.name.startswith("ffnfusion.layers.2-4")]
    assert len(matmuls) == 3  # gate, up, the batched down projection
    assert main(["inspect", str(fused)]) == 0 and "2-4" in capsys.readouterr().out


def test_sandwich_norm_groups_side_by_side_and_in_float16(tiny_gemma3, tmp_path):
    model, path = tiny_gemma3
    onnx_model = ir.load(path)
    FFNFusionPass([[2, 3]])(onnx_model)  # then layer 4 alone: two groups' worth of the stream rewired
    ir.save(onnx_model, tmp_path / "fused.onnx")
    assert rel_err(run_logits(create_session(tmp_path / "fused.onnx"), GEMMA_IDS),
                   _parallel_reference_logits(model, [[2, 3]])) <= 1e-5
    # An already fused group is not fused again with its neighbour: the original layers are.
    with pytest.raises(InvalidPlanError, match="layer 2 is already a fused post-normed group"):
        FFNFusionPass([[2, 3, 4]])(ir.load(tmp_path / "fused.onnx"))
    half = export_model(copy.deepcopy(model), tmp_path / "fp16", ExportOptions(drop_attention=DROPPED, dtype="float16"))
    onnx_model = ir.load(half)
    FFNFusionPass([DROPPED])(onnx_model)
    ir.save(onnx_model, tmp_path / "fused16.onnx")
    logits = run_logits(create_session(tmp_path / "fused16.onnx"), GEMMA_IDS).astype(np.float32)
    assert rel_err(logits, _parallel_reference_logits(model, [DROPPED])) <= 5e-3  # fp16 weights; post-norms in float32


def test_sandwich_norm_models_through_the_commands(tiny_gemma3, tmp_path, capsys):
    """analyze plans post-normed groups; fuse --repair refits their post-norm gains (the written
    model = the torch parallel form with the written gains, ≤ 1e-5, and the held-out KL falls);
    export-hf refuses them in one line and writes nothing."""
    from ffnfusion.cli import main

    model, path = tiny_gemma3
    calib = []
    for index in range(3):
        calib.append(str(tmp_path / f"calib{index}.npy"))
        np.save(calib[-1], np.random.default_rng(7 + index).integers(0, 128, 4096))
    assert main(["analyze", str(path), "-o", str(tmp_path / "report"), "--token-ids", calib[0],
                 "--tokens", "512", "--window", "64", "--threshold", "10", "--include-last"]) == 0
    assert json.loads((tmp_path / "report" / "plan.json").read_text())["groups"] == [[2, 3, 4]]
    capsys.readouterr()

    repaired = tmp_path / "repaired" / "model.onnx"
    assert main(["fuse", str(path), "--groups", "2-4", "--repair", "--repair-tokens", "2048", "--calib-ids",
                 *calib[:2], "-o", str(repaired), "--json"]) == 0
    group = json.loads(capsys.readouterr().out)["repair"]["groups"][0]
    assert group["chosen"] is not None and group["kl_after"] < group["kl_before"], group
    gains = find_blocks(ir.load(repaired)).layer(2).ffn.post_norm.gain.const_value.numpy()  # [3, 1, 64]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for member, layer in enumerate(DROPPED):  # Gemma's RMSNorm scales by (1 + w)
            norm = reference.model.layers[layer].post_feedforward_layernorm
            assert not np.allclose(norm.weight.numpy() + 1, gains[member, 0])  # the gains moved
            norm.weight.copy_(torch.from_numpy(gains[member, 0] - 1))
    llama_surgery.drop_attention(reference, DROPPED)
    llama_surgery.parallelize_groups(reference, [DROPPED])
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(GEMMA_IDS)).logits.numpy()
    assert rel_err(run_logits(create_session(repaired), GEMMA_IDS), expected) <= 1e-5

    assert main(["export-hf", str(path), "-o", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ffnfusion: error:") and "sliding-window attention" in err[-1], err[-3:]
    assert not (tmp_path / "hf").exists()
