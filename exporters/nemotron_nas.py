"""Nemotron-NAS (DeciLM) checkpoints: the config semantics the serving engines share, a forward pass
written from them, and a torch model to export such a checkpoint to ONNX.

A Nemotron-NAS checkpoint is a Llama whose layers differ (``"model_type": "nemotron-nas"``, one
``block_configs`` entry per layer). What vLLM (``nemotron_nas.py``), TensorRT-LLM
(``modeling_nemotron_nas.py``) and llama.cpp (``deci``) agree on:

* attention ``no_op`` → the layer has no ``input_layernorm`` and no ``self_attn`` tensors, and adds
  nothing; else ``n_heads / n_heads_in_group`` KV heads;
* FFN ``no_op`` → no ``post_attention_layernorm``/``mlp`` tensors; else a SwiGLU of width
  ``I = round_up_256(int(2 · ffn_mult · H / 3))``;
* a layer is ``h = x + attn(n1(x))`` then ``y = h + mlp(n2(h))`` (each part only if present);
* every tensor in the file must be expected (vLLM raises on extras, llama.cpp counts them).

``ffn_mult = 1.5 · I / H`` for ``I`` a multiple of 256 round-trips exactly; other widths are padded with
zero rows (gate, up) and zero columns (down), which adds exactly nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib

import numpy as np

from ffnfusion.core.errors import ModelSourceError

MODEL_TYPE = "nemotron-nas"
ARCHITECTURE = "DeciLMForCausalLM"
WIDTH_MULTIPLE = 256  # all three engines round the FFN width up to this
REMOTE_CODE_DIR = pathlib.Path(__file__).with_name("decilm_remote_code")
REMOTE_CODE_FILES = ("configuration_decilm.py", "block_config.py")
AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig"}


def engine_width(ffn_mult: float, hidden: int) -> int:
    """The FFN width vLLM, TensorRT-LLM and llama.cpp derive from ``ffn_mult``."""
    width = int(2 * ffn_mult * hidden / 3)
    return -(-width // WIDTH_MULTIPLE) * WIDTH_MULTIPLE


def padded_width(width: int, tensor_parallel: int = 1) -> int:
    """The smallest width ≥ ``width`` that the engines derive back exactly and ``tensor_parallel``
    ranks split evenly."""
    multiple = math.lcm(WIDTH_MULTIPLE, tensor_parallel)
    return -(-width // multiple) * multiple


def ffn_mult_for(width: int, hidden: int) -> float:
    """``ffn_mult`` that gives back ``width`` (a multiple of 256) after the config's 6-digit rounding."""
    mult = round(1.5 * width / hidden, 6)
    if engine_width(mult, hidden) != width:
        raise ValueError(f"no ffn_mult gives FFN width {width} at hidden size {hidden}")
    return mult


@dataclasses.dataclass(frozen=True)
class NasBlock:
    """One layer: ``n_heads_in_group`` (None: attention no-op) and the FFN width (None: FFN no-op)."""

    n_heads_in_group: int | None
    ffn_width: int | None

    @property
    def attention(self) -> bool:
        return self.n_heads_in_group is not None

    def to_config(self, hidden: int) -> dict:
        """The ``block_configs`` entry, every sub-key explicit (llama.cpp indexes them directly)."""
        attention = {"no_op": not self.attention, "replace_with_linear": False, "sparsify": None,
                     "n_heads_in_group": self.n_heads_in_group, "window_length": None, "num_sink_tokens": None,
                     "use_prefill_window_in_sink_attention": False, "unshifted_sink": False}
        ffn = {"no_op": self.ffn_width is None, "replace_with_linear": False, "sparsify": None,
               "ffn_mult": None if self.ffn_width is None else ffn_mult_for(self.ffn_width, hidden)}
        return {"attention": attention, "ffn": ffn}

    @classmethod
    def from_config(cls, entry: dict, hidden: int, layer: int) -> NasBlock:
        attention, ffn = entry.get("attention", {}), entry.get("ffn", {})
        for part, name in ((attention, "attention"), (ffn, "ffn")):
            if part.get("replace_with_linear"):
                raise ModelSourceError(f"layer {layer}: {name} replaced with a linear layer is not supported "
                                       "(no engine-independent semantics to check it against)")
            if part.get("sparsify"):
                raise ModelSourceError(f"layer {layer}: sparsified {name} is not supported")
        if attention.get("window_length") or attention.get("num_sink_tokens"):
            raise ModelSourceError(f"layer {layer}: windowed/sink attention is not supported")
        heads_in_group = None if attention.get("no_op") else attention.get("n_heads_in_group")
        if not attention.get("no_op") and heads_in_group is None:
            raise ModelSourceError(f"layer {layer}: attention without n_heads_in_group")
        width = None
        if not ffn.get("no_op"):
            if ffn.get("ffn_mult") is not None:
                width = engine_width(ffn["ffn_mult"], hidden)
            elif ffn.get("intermediate_size") is not None:  # ModelOpt's converter writes this instead
                width = int(ffn["intermediate_size"])
            else:
                raise ModelSourceError(f"layer {layer}: FFN without ffn_mult or intermediate_size")
        return cls(heads_in_group, width)


@dataclasses.dataclass(frozen=True)
class NasConfig:
    """The parts of a Nemotron-NAS ``config.json`` the forward pass needs."""

    raw: dict
    blocks: tuple[NasBlock, ...]

    hidden = property(lambda self: self.raw["hidden_size"])
    heads = property(lambda self: self.raw["num_attention_heads"])
    head_dim = property(lambda self: self.raw.get("head_dim") or self.hidden // self.heads)
    eps = property(lambda self: self.raw.get("rms_norm_eps", 1e-6))
    rope_theta = property(lambda self: self.raw.get("rope_theta")
                          or (self.raw.get("rope_parameters") or {}).get("rope_theta", 10000.0))

    @classmethod
    def read(cls, directory: str | os.PathLike) -> NasConfig:
        path = pathlib.Path(directory) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ModelSourceError(f"cannot read {path}: {err}") from err
        if raw.get("model_type") != MODEL_TYPE:
            raise ModelSourceError(f"{path}: model_type {raw.get('model_type')!r}, expected {MODEL_TYPE!r}")
        entries = raw.get("block_configs") or []
        if len(entries) != raw.get("num_hidden_layers"):
            raise ModelSourceError(f"{path}: {len(entries)} block_configs for num_hidden_layers="
                                   f"{raw.get('num_hidden_layers')} (they must be equal)")
        if raw.get("hidden_act", "silu") != "silu":
            raise ModelSourceError(f"{path}: hidden_act {raw['hidden_act']!r}; Nemotron-NAS FFNs are SiLU-gated")
        scaling = raw.get("rope_scaling") or {}
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise ModelSourceError(f"{path}: rope scaling {scaling.get('rope_type') or scaling.get('type')!r} "
                                   "is not supported yet (only the default rotary embedding)")
        return cls(raw, tuple(NasBlock.from_config(e, raw["hidden_size"], i) for i, e in enumerate(entries)))

    def kv_heads(self, block: NasBlock) -> int:
        assert block.n_heads_in_group is not None
        return self.heads // block.n_heads_in_group

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name the engines load, with its shape (HF ``[out, in]`` layout)."""
        hidden, dim = self.hidden, self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.raw["vocab_size"], hidden),
                                              "model.norm.weight": (hidden,),
                                              "lm_head.weight": (self.raw["vocab_size"], hidden)}
        for i, block in enumerate(self.blocks):
            prefix = f"model.layers.{i}."
            if block.attention:
                kv = self.kv_heads(block) * dim
                shapes.update({prefix + "input_layernorm.weight": (hidden,),
                               prefix + "self_attn.q_proj.weight": (self.heads * dim, hidden),
                               prefix + "self_attn.k_proj.weight": (kv, hidden),
                               prefix + "self_attn.v_proj.weight": (kv, hidden),
                               prefix + "self_attn.o_proj.weight": (hidden, self.heads * dim)})
            if block.ffn_width is not None:
                width = block.ffn_width
                shapes.update({prefix + "post_attention_layernorm.weight": (hidden,),
                               prefix + "mlp.gate_proj.weight": (width, hidden),
                               prefix + "mlp.up_proj.weight": (width, hidden),
                               prefix + "mlp.down_proj.weight": (hidden, width)})
        return shapes


def read_tensors(directory: str | os.PathLike, config: NasConfig):
    """The checkpoint's tensors (torch, float32), checked against :meth:`NasConfig.expected_tensors`
    the way the engines check them: a missing, extra or misshapen tensor is an error."""
    import torch
    from safetensors.torch import load_file

    directory = pathlib.Path(directory)
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    expected = config.expected_tensors()
    if "lm_head.weight" not in tensors and config.raw.get("tie_word_embeddings") and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ModelSourceError(f"{directory}: tensors do not match block_configs: missing {missing[:4]}"
                               f"{'...' if len(missing) > 4 else ''}, unexpected {extra[:4]}{'...' if len(extra) > 4 else ''}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ModelSourceError(f"{directory}: {name} has shape {tuple(tensors[name].shape)}, the config says {shape}")
    return {name: tensor.to(torch.float32) for name, tensor in tensors.items()}


def reference_forward(directory: str | os.PathLike, input_ids: np.ndarray) -> np.ndarray:
    """Logits ``[batch, seq, vocab]`` (float32) of a Nemotron-NAS checkpoint, computed from its
    ``config.json`` and safetensors by the semantics above — no transformers model class involved,
    so it checks what :func:`~ffnfusion.exporters.hf_checkpoint.export_hf` writes."""
    import torch

    config = NasConfig.read(directory)
    weights = read_tensors(directory, config)
    dim, heads = config.head_dim, config.heads

    def rms(x, gain):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.eps) * gain

    ids = torch.from_numpy(np.asarray(input_ids, np.int64))
    batch, seq = ids.shape
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)
    cos, sin = (torch.cat([f(angles)] * 2, -1).float() for f in (torch.cos, torch.sin))

    def rotate(t):  # [batch, heads, seq, dim], HF's rotate_half convention
        half = t.shape[-1] // 2
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

    mask = torch.full((seq, seq), float("-inf")).triu(1)
    x = weights["model.embed_tokens.weight"][ids]
    with torch.no_grad():
        for i, block in enumerate(config.blocks):
            w = {k.removeprefix(f"model.layers.{i}."): v for k, v in weights.items() if k.startswith(f"model.layers.{i}.")}
            if block.attention:
                kv = config.kv_heads(block)
                n = rms(x, w["input_layernorm.weight"])
                q = (n @ w["self_attn.q_proj.weight"].T).view(batch, seq, heads, dim).transpose(1, 2)
                k = (n @ w["self_attn.k_proj.weight"].T).view(batch, seq, kv, dim).transpose(1, 2)
                v = (n @ w["self_attn.v_proj.weight"].T).view(batch, seq, kv, dim).transpose(1, 2)
                q, k = rotate(q), rotate(k)
                k, v = (t.repeat_interleave(heads // kv, dim=1) for t in (k, v))
                scores = (q @ k.transpose(-1, -2)) / math.sqrt(dim) + mask
                out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, heads * dim)
                x = x + out @ w["self_attn.o_proj.weight"].T
            if block.ffn_width is not None:
                n = rms(x, w["post_attention_layernorm.weight"])
                gate, up = n @ w["mlp.gate_proj.weight"].T, n @ w["mlp.up_proj.weight"].T
                x = x + (torch.nn.functional.silu(gate) * up) @ w["mlp.down_proj.weight"].T
        logits = rms(x, weights["model.norm.weight"]) @ weights["lm_head.weight"].T
    return logits.numpy()


def build_torch_model(directory: str | os.PathLike, dtype: str = "float32"):
    """A transformers Llama re-shaped layer by layer to the checkpoint's ``block_configs`` (transformers
    has no Nemotron-NAS class): per-layer KV heads and FFN widths, attention-free, FFN-free and empty
    layers as :mod:`.llama_surgery` modules. Weights loaded strictly (every tensor used, none missing)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

    from ffnfusion.exporters import llama_surgery

    config = NasConfig.read(directory)
    raw, blocks = config.raw, config.blocks
    first_attention = next((b for b in blocks if b.attention), None)
    widths = [b.ffn_width for b in blocks if b.ffn_width is not None]
    base = LlamaConfig(
        vocab_size=raw["vocab_size"], hidden_size=config.hidden, intermediate_size=widths[0] if widths else WIDTH_MULTIPLE,
        num_hidden_layers=len(blocks), num_attention_heads=config.heads, head_dim=config.head_dim,
        num_key_value_heads=config.kv_heads(first_attention) if first_attention else config.heads,
        rms_norm_eps=config.eps, max_position_embeddings=raw.get("max_position_embeddings") or 4096,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=False, bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"), hidden_act="silu")
    model = LlamaForCausalLM(base)
    layers = llama_surgery.decoder_layers(model)
    for index, block in enumerate(blocks):
        layer = layers[index]
        if block.attention and config.kv_heads(block) != base.num_key_value_heads:
            layer.self_attn = LlamaAttention(_with(base, num_key_value_heads=config.kv_heads(block)), index)
        if block.ffn_width is not None and block.ffn_width != base.intermediate_size:
            layer.mlp = LlamaMLP(_with(base, intermediate_size=block.ffn_width))
        if not block.attention:
            layers[index] = llama_surgery.AttentionFreeDecoderLayer(layer) if block.ffn_width else \
                llama_surgery.EmptyDecoderLayer()
        elif block.ffn_width is None:
            layers[index] = llama_surgery.AttentionOnlyDecoderLayer(layer)
    model.load_state_dict(read_tensors(directory, config), strict=True)
    model.config.nemotron_nas_blocks = [dataclasses.asdict(b) for b in blocks]
    return model.to(getattr(torch, dtype)).eval()


def _with(config, **changes):
    import copy

    changed = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(changed, key, value)
    return changed
