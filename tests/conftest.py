"""Shared fixtures: tiny random Llamas with odd sizes, exported once per session per variant."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from ffnfusion.exporters.onnx_export import ExportOptions, export_model

# Odd sizes on purpose: hidden 96, FFN 160, GQA 6 query heads over 2 KV heads.
TINY_CONFIG = dict(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=8,
                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                   rms_norm_eps=1e-6)
TINY_DROPPED = [2, 3, 4, 5, 6]  # one attention-free run 2-6; layers 0, 1 and 7 keep attention


def make_tiny_llama(seed: int = 0):
    """A random LlamaForCausalLM whose norm gains are random too (folding must matter)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY_CONFIG)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def save_tiny_tokenizer(directory) -> None:
    """A word-level tokenizer for the tiny vocabulary (``t0`` … ``t127``): exporters that save one
    beside the model (ORT GenAI's builder, optimum) want it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(TINY_CONFIG["vocab_size"])}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="t1", eos_token="t2", unk_token="t0").save_pretrained(directory)


def greedy_reference(model, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens from a torch causal LM (no cache: every step recomputed) and their logits."""
    sequence, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits.append(model(input_ids=torch.tensor([sequence])).logits[0, -1].numpy())
            sequence.append(int(logits[-1].argmax()))
    return sequence[len(prompt):], np.array(logits)


def prefill_then_decode(session, input_ids, split: int):
    """Run ``input_ids[:, :split]`` with an empty KV cache, then the rest with the returned cache.
    Returns the two output lists (logits first, then present.* tensors)."""
    from ffnfusion.runtime.onnxruntime import default_feeds

    first = session.run(None, default_feeds(session, input_ids[:, :split]))
    past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values")]
    batch, total = input_ids.shape
    feeds = {"input_ids": input_ids[:, split:], "attention_mask": np.ones((batch, total), np.int64),
             "position_ids": np.tile(np.arange(split, total), (batch, 1)), **dict(zip(past_names, first[1:]))}
    return first, session.run(None, feeds)


def without_attention(model, layers):
    """A copy of ``model`` with the attention *output* of ``layers`` zeroed inside transformers' own
    layers (an independent reference for the exporter's attention-free layers: residual multipliers
    and Gemma 3's post_attn(0) = 0 still apply, the FFN runs as it always does)."""
    model = copy.deepcopy(model)
    for index in layers:
        def zero(*args, **kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            return torch.zeros_like(hidden), None
        model.model.layers[index].self_attn.forward = zero
    return model


def rel_err(actual, reference) -> float:
    return float(np.linalg.norm(actual - reference) / np.linalg.norm(reference))


@pytest.fixture(scope="session")
def tiny_llama():
    return make_tiny_llama()


def _export(tmp_path_factory, tiny_llama, name, **options):
    out = tmp_path_factory.mktemp(name)
    opts = ExportOptions(drop_attention=list(TINY_DROPPED), **options)
    return export_model(copy.deepcopy(tiny_llama), out, opts)


@pytest.fixture(scope="session")
def tiny_full(tmp_path_factory, tiny_llama):
    """The tiny Llama with attention in every layer, opset 20 (what a frontier, a heal reference and
    attention removal start from). Shared: tests read it and write elsewhere."""
    return export_model(copy.deepcopy(tiny_llama), tmp_path_factory.mktemp("full"), ExportOptions(opset=20))


@pytest.fixture(scope="session")
def windows():
    """Random token windows of the tiny Llama's vocabulary for the depth search: its refits fit on
    ``fit``, its moves are scored on ``select``, perplexities are held out on ``eval``."""
    rng = np.random.default_rng(0)
    vocab = TINY_CONFIG["vocab_size"]
    return {name: rng.integers(0, vocab, (count, 32)) for name, count in (("fit", 8), ("select", 4), ("eval", 4))}


@pytest.fixture(scope="session")
def tiny_dynamo20(tmp_path_factory, tiny_llama):
    return _export(tmp_path_factory, tiny_llama, "dynamo20", opset=20)


@pytest.fixture(scope="session")
def tiny_dynamo23(tmp_path_factory, tiny_llama):
    return _export(tmp_path_factory, tiny_llama, "dynamo23", opset=23)


@pytest.fixture(scope="session")
def tiny_torchscript(tmp_path_factory, tiny_llama):
    return _export(tmp_path_factory, tiny_llama, "torchscript", opset=18, dynamo=False)


@pytest.fixture(scope="session")
def tiny_kv_cache(tmp_path_factory, tiny_llama):
    return _export(tmp_path_factory, tiny_llama, "kvcache", opset=20, kv_cache=True)


@pytest.fixture(scope="session")
def tiny_variants(tiny_dynamo20, tiny_dynamo23, tiny_torchscript):
    return {"dynamo-opset20": tiny_dynamo20, "dynamo-opset23": tiny_dynamo23,
            "torchscript-opset18": tiny_torchscript}


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
