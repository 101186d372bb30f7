"""Nemotron-NAS (DeciLM) checkpoints out (``export-hf``) and in (``export`` of a NAS folder).

The oracle is :func:`nemotron_nas.reference_forward`: the engines' semantics over config.json and the
safetensors, with no transformers model class, checked against torch references of the parallel form.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_DROPPED, prefill_then_decode, rel_err

from ffnfusion.api import fuse_ffn
from ffnfusion.core.errors import InvalidArgumentError, ModelSourceError
from ffnfusion.core.model_io import load_model
from ffnfusion.exporters import llama_surgery, nemotron_nas
from ffnfusion.exporters.hf_checkpoint import export_hf
from ffnfusion.exporters.onnx_export import ExportOptions, export_source
from ffnfusion.exporters.sources import resolve_source
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.runtime.onnxruntime import create_session, run_logits

IDS = np.random.default_rng(1).integers(0, 128, (2, 11))


def torch_logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.numpy()


def test_ffn_mult_round_trips_every_width_the_engines_can_derive():
    for hidden in (96, 576, 4096, 8192, 16384):
        for width in range(256, 60000, 256 * 7):
            assert nemotron_nas.engine_width(nemotron_nas.ffn_mult_for(width, hidden), hidden) == width
    assert nemotron_nas.padded_width(160) == 256 and nemotron_nas.padded_width(512) == 512
    assert nemotron_nas.padded_width(480, tensor_parallel=3) == 768
    with pytest.raises(ValueError, match="no ffn_mult"):
        nemotron_nas.ffn_mult_for(160, 96)


@pytest.fixture(scope="module")
def fused_tiny(tmp_path_factory, tiny_dynamo20):
    """The tiny Llama (attention dropped in 2-6) with 2-4 fused, and its Nemotron-NAS checkpoint."""
    out = tmp_path_factory.mktemp("nas")
    fuse_ffn(tiny_dynamo20, [[2, 3, 4]], output=out / "fused")
    result = export_hf(out / "fused", out / "hf")
    return out / "fused" / "model.onnx", out / "hf", result


def test_export_hf_of_a_fused_llama_is_the_parallel_form(fused_tiny, tiny_llama):
    onnx_path, hf, result = fused_tiny
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    assert config["num_hidden_layers"] == len(config["block_configs"]) == 6  # 2-4 became one layer
    assert config["intermediate_size"] is None and config["num_key_value_heads"] is None
    blocks = config["block_configs"]
    assert [b["attention"]["no_op"] for b in blocks] == [False, False, True, True, True, False]
    assert [b["attention"]["n_heads_in_group"] for b in blocks] == [3, 3, None, None, None, 3]
    # FFN 160 -> 256 and the fused 480 -> 512, padded with zeros: ffn_mult = 1.5 * I / H
    assert [b["ffn"]["ffn_mult"] for b in blocks] == [4.0, 4.0, 8.0, 4.0, 4.0, 4.0]
    assert [layer.source_layers for layer in result.layers] == [[0], [1], [2, 3, 4], [5], [6], [7]]
    assert (result.layers[2].ffn_width, result.layers[2].written_width) == (480, 512)
    expected = nemotron_nas.NasConfig.read(hf).expected_tensors()
    from safetensors import safe_open

    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert np.all(f.get_tensor("model.layers.2.post_attention_layernorm.weight").numpy() == 1.0)  # folded
    assert names == set(expected) and "model.layers.2.input_layernorm.weight" not in names

    reference = copy.deepcopy(tiny_llama)
    llama_surgery.drop_attention(reference, TINY_DROPPED)
    llama_surgery.parallelize_groups(reference, [[2, 3, 4]])
    assert rel_err(nemotron_nas.reference_forward(hf, IDS), torch_logits(reference)) < 1e-5
    # and the ONNX model it came from says the same
    ort = run_logits(create_session(onnx_path), IDS)
    assert rel_err(nemotron_nas.reference_forward(hf, IDS), ort) < 1e-5


def test_export_hf_config_classes_load_with_trust_remote_code(fused_tiny):
    from transformers import AutoConfig

    _, hf, _ = fused_tiny
    config = AutoConfig.from_pretrained(hf, trust_remote_code=True)
    assert type(config).__name__ == "DeciLMConfig" and config.num_hidden_layers == 6
    block = config.block_configs[2]  # the engines read these as attributes
    assert block.attention.no_op and block.attention.n_heads_in_group is None and block.ffn.ffn_mult == 8.0
    assert config.block_configs[0].attention.n_heads_in_group == 3


def test_a_uniform_model_is_written_as_a_plain_llama(tmp_path, tiny_llama, tiny_full):
    result = export_hf(tiny_full, tmp_path / "hf")
    assert result.architecture == "LlamaForCausalLM"
    from transformers import LlamaForCausalLM

    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert rel_err(torch_logits(loaded), torch_logits(tiny_llama)) < 1e-5
    assert not (tmp_path / "hf" / "configuration_decilm.py").exists()


def test_export_hf_refuses_bad_tensor_parallelism_and_writes_nothing(tmp_path, fused_tiny):
    onnx_path, _, _ = fused_tiny
    with pytest.raises(InvalidArgumentError, match="6 query and 2 KV heads"):
        export_hf(onnx_path, tmp_path / "tp4", tensor_parallel=4)
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(InvalidArgumentError, match="6 query and 2 KV heads"):
        export_hf(onnx_path, tmp_path / "tp3", tensor_parallel=3)  # 2 KV heads cannot be split 3 ways
    result = export_hf(onnx_path, tmp_path / "tp6", tensor_parallel=6)  # KV heads replicated, widths lcm(256, 6)
    assert [layer.written_width for layer in result.layers] == [768, 768, 768, 768, 768, 768]
    assert rel_err(nemotron_nas.reference_forward(tmp_path / "tp6", IDS),
                   nemotron_nas.reference_forward(fused_tiny[1], IDS)) < 1e-6


def test_export_hf_cli_exit_codes(tmp_path, fused_tiny):
    onnx_path, _, _ = fused_tiny
    cli = [sys.executable, "-m", "ffnfusion.cli", "export-hf", str(onnx_path)]
    bad = subprocess.run([*cli, "-o", str(tmp_path / "bad"), "--tensor-parallel", "4"], capture_output=True, text=True)
    assert bad.returncode == 2 and "KV heads" in bad.stderr and not (tmp_path / "bad").exists()
    good = subprocess.run([*cli, "-o", str(tmp_path / "good"), "--json"], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["num_hidden_layers"] == 6


def _random_nas_checkpoint(directory, blocks, hidden=96, heads=6, vocab=128, seed=0):
    """A Nemotron-NAS folder with random weights, written straight from the config semantics."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    config = {"architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "hidden_size": hidden,
              "num_attention_heads": heads, "num_hidden_layers": len(blocks), "vocab_size": vocab,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 128, "hidden_act": "silu",
              "intermediate_size": None, "num_key_value_heads": None, "tie_word_embeddings": False,
              "block_configs": [b.to_config(hidden) for b in blocks]}
    (directory / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in nemotron_nas.NasConfig.read(directory).expected_tensors().items():
        if name.endswith("norm.weight"):
            tensors[name] = 0.5 + torch.rand(shape, generator=generator)
        else:
            tensors[name] = torch.randn(shape, generator=generator) * (0.5 if "embed" in name else 0.08)
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


MIXED = [nemotron_nas.NasBlock(3, 256), nemotron_nas.NasBlock(1, 512), nemotron_nas.NasBlock(None, 256),
         nemotron_nas.NasBlock(None, 768), nemotron_nas.NasBlock(2, None), nemotron_nas.NasBlock(None, None),
         nemotron_nas.NasBlock(None, 256), nemotron_nas.NasBlock(3, 256)]


@pytest.fixture(scope="module")
def mixed_nas(tmp_path_factory):
    return _random_nas_checkpoint(tmp_path_factory.mktemp("mixed") / "hf", MIXED)


def test_export_of_a_mixed_nemotron_nas_folder_matches_the_engines_forward(tmp_path, mixed_nas):
    onnx = export_source(resolve_source(str(mixed_nas)), tmp_path / "onnx", ExportOptions())
    reference = nemotron_nas.reference_forward(mixed_nas, IDS)
    assert rel_err(run_logits(create_session(onnx), IDS), reference) < 1e-5
    block_map = find_blocks(load_model(onnx))
    # layer numbers kept: 4 has attention but no FFN, 5 is empty, so the runs are 2-3 and 6
    assert [layer.index for layer in block_map.layers] == [0, 1, 2, 3, 4, 6, 7]
    assert block_map.runs == [(2, 3), (6, 6)]
    assert [layer.ffn.width if layer.ffn else None for layer in block_map.layers] == [256, 512, 256, 768, None, 256, 256]

    fuse_ffn(onnx, [[2, 3]], output=tmp_path / "fused")
    parallel = nemotron_nas.build_torch_model(mixed_nas)
    llama_surgery.parallelize_groups(parallel, [[2, 3]])
    fused_ort = run_logits(create_session(tmp_path / "fused" / "model.onnx"), IDS)
    assert rel_err(fused_ort, torch_logits(parallel)) < 1e-5
    assert rel_err(fused_ort, reference) > 1e-3  # the parallel form is not the sequential one

    # round trip: the fused model back out as Nemotron-NAS, one layer fewer
    result = export_hf(tmp_path / "fused", tmp_path / "hf-fused")
    assert [layer.source_layers for layer in result.layers] == [[0], [1], [2, 3], [4], [6], [7]]
    assert rel_err(nemotron_nas.reference_forward(tmp_path / "hf-fused", IDS), torch_logits(parallel)) < 1e-5


def test_export_of_a_mixed_nemotron_nas_folder_with_kv_cache(tmp_path, mixed_nas):
    onnx = export_source(resolve_source(str(mixed_nas)), tmp_path / "onnx", ExportOptions(kv_cache=True))
    session = create_session(onnx)
    past = sorted(i.name for i in session.get_inputs() if i.name.startswith("past_key_values"))
    assert past == sorted(f"past_key_values.{i}.{k}" for i in (0, 1, 4, 7) for k in ("key", "value"))
    first, second = prefill_then_decode(session, IDS, 6)
    whole = nemotron_nas.reference_forward(mixed_nas, IDS)
    assert rel_err(np.concatenate([first[0], second[0]], axis=1), whole) < 1e-5
    assert first[1 + 2].shape[1] == 6  # layer 1 keeps all 6 heads as KV heads (n_heads_in_group 1)


def test_a_checkpoint_with_tensors_the_config_does_not_name_is_refused(tmp_path, mixed_nas):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(mixed_nas, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.2.input_layernorm.weight"] = torch.ones(96)  # vLLM raises on it, llama.cpp too
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ModelSourceError, match="unexpected \\['model.layers.2.input_layernorm.weight'\\]"):
        nemotron_nas.reference_forward(bad, IDS)
    config = json.loads((mixed_nas / "config.json").read_text())
    config["block_configs"][1]["ffn"]["replace_with_linear"] = True
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match="layer 1: ffn replaced with a linear layer is not supported"):
        nemotron_nas.NasConfig.read(bad)
