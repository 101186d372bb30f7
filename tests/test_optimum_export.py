"""The real optimum exporter: ``optimum-cli export onnx`` (its own environment: optimum-onnx pins
transformers < 4.58) on a tiny Llama with KV cache; ffnfusion drops attention (keeping a pass-through
KV pair per layer, as optimum expects) and fuses; ``ORTModelForCausalLM`` loads the result and
generates what the torch parallel form generates. Slow: ~1 min to make the environment once."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from conftest import TINY_DROPPED, greedy_reference, make_tiny_llama, rel_err, save_tiny_tokenizer

from ffnfusion.checks import optimum_export
from ffnfusion.cli import main
from ffnfusion.exporters import llama_surgery
from ffnfusion.passes.blocks import find_blocks

pytestmark = pytest.mark.slow
PROMPT = [5, 17, 33, 90, 4, 61]


def test_optimum_export_fused_generates_in_ort_model_for_causal_lm(tmp_path, capsys):
    make_tiny_llama().save_pretrained(tmp_path / "hf")
    save_tiny_tokenizer(tmp_path / "hf")
    source = optimum_export.export(tmp_path / "hf", tmp_path / "optimum")
    assert [layer.attention for layer in find_blocks(ir.load(source / "model.onnx")).layers] == [True] * 8

    dropped, fused = tmp_path / "dropped", tmp_path / "fused"
    assert main(["drop-attention", str(source), "-o", str(dropped), "--layers", "2-6", "--keep-kv-io"]) == 0
    assert main(["fuse", str(dropped), "-o", str(fused), "--groups", "2-6"]) == 0
    capsys.readouterr()
    assert (fused / "config.json").is_file()

    reference = make_tiny_llama()
    llama_surgery.drop_attention(reference, TINY_DROPPED)
    llama_surgery.parallelize_groups(reference, [TINY_DROPPED])
    expected_tokens, expected_logits = greedy_reference(reference, PROMPT, 8)
    tokens, logits = optimum_export.generate(fused, PROMPT, 8)
    assert tokens == expected_tokens
    assert rel_err(logits, expected_logits) < 1e-5
