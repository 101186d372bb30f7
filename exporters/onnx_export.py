"""PyTorch / Hugging Face -> ONNX with ``torch.onnx.export``.

The default is the dynamo exporter at opset 20, which emits RMSNorm decomposed into
Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul and SwiGLU as MatMul/Sigmoid/Mul. ``dynamo=False`` selects the
legacy TorchScript exporter (tests use it to check that block recognition is exporter-agnostic).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import time
import warnings

import torch
from torch import nn

from ffnfusion.core.errors import InvalidArgumentError
from ffnfusion.core.files import staged_model, write_json_atomically
from ffnfusion.core.model_io import EXTERNAL_DATA_THRESHOLD, METADATA_FILE, MODEL_FILE
from ffnfusion.exporters import llama_surgery
from ffnfusion.exporters.llama_surgery import HFModel
from ffnfusion.exporters.sources import ModelSource, load_causal_lm

logger = logging.getLogger(__name__)

SUPPORTED_OPSETS = range(18, 24)
# The legacy exporter (optimum's path) down to 14: below 17 LayerNorm and always GELU are written out.
LEGACY_OPSETS = range(14, 24)


@dataclasses.dataclass
class ExportOptions:
    opset: int = 20
    dtype: str = "float32"
    drop_attention: list[int] = dataclasses.field(default_factory=list)
    kv_cache: bool = False
    dynamo: bool = True


class _LogitsOnly(nn.Module):
    """``(input_ids, attention_mask) -> logits``: the graph signature runtimes expect."""

    def __init__(self, model: HFModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class _WithKVCache(nn.Module):
    """Flat KV-cache signature: ``past_key_values.{i}.key/value`` in, ``present.{i}.*`` out.

    Only layers that still have attention carry a cache; attention-free layers have none.
    """

    def __init__(self, model: HFModel, attention_layers: list[int]):
        super().__init__()
        self.model = model
        self.attention_layers = attention_layers

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        cache = _attention_layers_cache(DynamicCache)(self.model.config, self.attention_layers)
        for slot, layer in enumerate(self.attention_layers):
            cache.update(past[2 * slot], past[2 * slot + 1], layer)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        present = []
        for layer in self.attention_layers:
            present += [cache.layers[layer].keys, cache.layers[layer].values]
        return (out.logits, *present)


def _attention_layers_cache(dynamic_cache_class):
    """A DynamicCache that answers length queries about attention-free layers (which never store
    anything) with the first attention layer's numbers; transformers asks layer 0 by default.

    Every layer keeps its whole past, sliding-window layers (Gemma 2/3) included: the flat
    past/present signature carries every token, and the window is the attention mask's job (a
    cropping cache layer would return fewer keys than the mask it was given has columns)."""
    from transformers.cache_utils import DynamicLayer

    class AttentionLayersCache(dynamic_cache_class):  # type: ignore[valid-type,misc]  # a base chosen at run time
        def __init__(self, config, attention_layers):
            super().__init__(config=config)
            self.layers = [DynamicLayer() for _ in range(config.get_text_config(decoder=True).num_hidden_layers)]
            self._attention_layers = set(attention_layers)
            self._first = min(attention_layers)

        def _proxy(self, layer_idx: int) -> int:
            return layer_idx if layer_idx in self._attention_layers else self._first

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return super().get_seq_length(self._proxy(layer_idx))

        def get_mask_sizes(self, query_length: int, layer_idx: int):
            return super().get_mask_sizes(query_length, self._proxy(layer_idx))

        def get_query_offset(self, layer_idx: int = 0):
            return super().get_query_offset(self._proxy(layer_idx))

    return AttentionLayersCache


def _kv_shape(model: HFModel, layer: int, past_len: int) -> tuple[int, int, int]:
    """``(kv heads, past length, head dim)`` of one layer's cache (Nemotron-NAS layers differ)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = llama_surgery.decoder_layers(model)[layer].self_attn
    if hasattr(attention, "k_proj"):  # per layer: Nemotron-NAS layers differ
        heads = attention.k_proj.out_features // head_dim
    else:  # one fused qkv projection (Phi-3): the config's count
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return heads, past_len, head_dim


@dataclasses.dataclass
class _TracedInputs:
    """What the exporter traces: the module, example inputs, names and dynamic axes."""

    wrapper: nn.Module
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic: dict[str, dict[int, str]]


def _traced_inputs(model: HFModel, options: ExportOptions) -> _TracedInputs:
    """Logits only, or (``--kv-cache``) logits and present KV from past KV of the attention layers."""
    batch, seq = 2, 5
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    attention_mask = torch.ones(batch, seq, dtype=torch.int64)
    if not options.kv_cache:
        return _TracedInputs(_LogitsOnly(model), (input_ids, attention_mask), ["input_ids", "attention_mask"],
                             ["logits"], {"input_ids": {0: "batch", 1: "sequence"},
                                          "attention_mask": {0: "batch", 1: "sequence"}})
    attention_layers = llama_surgery.attention_layers(model)
    if not attention_layers:
        raise InvalidArgumentError("--kv-cache needs at least one layer with attention; all are dropped")
    past_len = 3
    past = [
        torch.zeros(batch, *_kv_shape(model, layer, past_len), dtype=getattr(torch, options.dtype))
        for layer in attention_layers for _ in range(2)
    ]
    attention_mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    position_ids = torch.arange(past_len, past_len + seq).expand(batch, seq)
    past_names = [f"past_key_values.{i}.{kind}" for i in attention_layers for kind in ("key", "value")]
    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
               "position_ids": {0: "batch", 1: "sequence"}}
    dynamic.update({n: {0: "batch", 2: "past_sequence"} for n in past_names})
    return _TracedInputs(_WithKVCache(model, attention_layers), (input_ids, attention_mask, position_ids, tuple(past)),
                         ["input_ids", "attention_mask", "position_ids", *past_names],
                         ["logits", *(n.replace("past_key_values", "present") for n in past_names)], dynamic)


def export_model(
    model: HFModel,
    out_dir: str | os.PathLike,
    options: ExportOptions,
    *,
    tokenizer=None,
    source: str = "",
) -> pathlib.Path:
    """Export a Hugging Face causal LM (already loaded) to ``out_dir/model.onnx``.

    Layers in ``options.drop_attention`` are made attention-free first, and residual multipliers
    (Granite) are folded into each branch's output projection. Returns the model path.
    """
    if options.opset not in SUPPORTED_OPSETS and not (not options.dynamo and options.opset in LEGACY_OPSETS):
        raise InvalidArgumentError(f"opset {options.opset} not supported: use 18-23 (default 20), or 14-17 with "
                                   "--exporter torchscript")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    num_layers = config.num_hidden_layers
    if llama_surgery.fold_residual_multipliers(model):
        logger.info("export: residual multiplier folded into o_proj and down_proj")
    dropped = llama_surgery.drop_attention(model, options.drop_attention)
    model = model.to(getattr(torch, options.dtype)).eval()

    batch_dim, seq_dim = torch.export.Dim("batch"), torch.export.Dim("sequence")
    traced = _traced_inputs(model, options)
    wrapper, args, input_names, output_names, dynamic = (traced.wrapper, traced.args, traced.input_names,
                                                         traced.output_names, traced.dynamic)

    path = out_dir / MODEL_FILE
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD
    logger.info(f"export: torch.onnx.export(dynamo={options.dynamo}, opset {options.opset}, {options.dtype}), "
        f"{num_layers} layers, attention dropped in {_format_layers(dropped) or 'none'}")
    start = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad(), _quiet_exporter_logs():
        warnings.simplefilter("ignore")
        if options.dynamo:
            shapes = _dynamo_shapes(dynamic, input_names, batch_dim, seq_dim)
            if options.kv_cache:  # the past tensors travel as one tuple argument
                shapes = (*shapes[:3], tuple(shapes[3:]))
            program = torch.onnx.export(
                wrapper, args, dynamo=True, opset_version=options.opset, input_names=input_names,
                output_names=output_names, dynamic_shapes=shapes, optimize=True, verbose=False,
            )
            assert program is not None  # dynamo=True returns the program
            program.model.ir_version = min(program.model.ir_version, 10)
            program.model.metadata_props.update(llama_surgery.layer_metadata(model))
            _save_atomically(lambda p: program.save(p, external_data=external), path, external)
        else:
            _save_atomically(
                lambda p: _legacy_export(wrapper, args, p, options.opset, input_names, output_names,
                                         dynamic, external, llama_surgery.layer_metadata(model)),
                path, external,
            )
    logger.info(f"export: wrote {path} in {time.perf_counter() - start:.1f} s"
        + (f" (weights in {path.name}.data)" if external else ""))

    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if options.kv_cache:
        write_json_atomically(out_dir / "genai_config.json", genai_config(model, config))
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    metadata = {
        "source": source,
        "exporter": "dynamo" if options.dynamo else "torchscript",
        "opset": options.opset,
        "dtype": options.dtype,
        "kv_cache": options.kv_cache,
        "num_layers": num_layers,
        "dropped_attention": dropped,
        "config": config_dict,
    }
    write_json_atomically(out_dir / METADATA_FILE, metadata)
    return path


def genai_config(model: HFModel, config) -> dict:
    """``genai_config.json`` for onnxruntime_genai: our KV names, the ``position_ids`` input, and
    ``past_present_share_buffer: false`` (our present tensors are the past grown by Concat, not a
    preallocated buffer). Layers without attention simply have no KV pair, which genai accepts."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = {_kv_shape(model, layer, 0)[0] for layer in llama_surgery.attention_layers(model)}
    context = getattr(config, "max_position_embeddings", None) or 2048
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": MODEL_FILE, "head_size": head_dim, "hidden_size": config.hidden_size,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
        "num_attention_heads": config.num_attention_heads, "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": max(kv_heads),
    }
    eos = config.eos_token_id
    return {
        "model": {"bos_token_id": config.bos_token_id, "eos_token_id": eos,
                  "pad_token_id": config.pad_token_id if config.pad_token_id is not None else eos,
                  "context_length": context, "decoder": decoder, "type": "llama", "vocab_size": config.vocab_size},
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0, "early_stopping": True,
                   "length_penalty": 1.0, "diversity_penalty": 0.0, "no_repeat_ngram_size": 0},
    }


@contextlib.contextmanager
def _quiet_exporter_logs():
    """torch.onnx logs one warning per torchvision op it cannot register (torchvision is absent)."""
    exporter_logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = exporter_logger.level
    exporter_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        exporter_logger.setLevel(level)


def _dynamo_shapes(dynamic, input_names, batch_dim, seq_dim):
    dims = {"batch": batch_dim, "sequence": seq_dim}
    shapes = []
    for name in input_names:
        axes = dynamic[name]
        shapes.append({axis: dims.get(label, torch.export.Dim.DYNAMIC) for axis, label in axes.items()})
    return tuple(shapes)


def _legacy_export(wrapper, args, path, opset, input_names, output_names, dynamic, external, metadata):
    dynamic_axes = {**dynamic, "logits": {0: "batch", 1: "sequence"}}
    torch.onnx.export(
        wrapper, args, str(path), dynamo=False, opset_version=opset, input_names=input_names,
        output_names=output_names, dynamic_axes=dynamic_axes, external_data=external,
    )
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    model.ir_version = min(model.ir_version, 10)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def _save_atomically(save, path: pathlib.Path, external: bool) -> None:
    """``save(staged_path)`` in a staging folder (the exporter names the data file after the graph,
    so it already has its final name), then both renamed into place."""
    with staged_model(path, external=external) as staged:
        save(staged)


def _format_layers(layers: list[int]) -> str:
    from ffnfusion.passes.layer_ranges import format_ranges

    return format_ranges(layers)


def export_source(source: ModelSource, out_dir, options: ExportOptions) -> pathlib.Path:
    """Load ``source`` with transformers and export it (see :func:`export_model`)."""
    logger.info(f"load: {source.describe()}")
    start = time.perf_counter()
    model, tokenizer = load_causal_lm(source, "float32")
    logger.info(f"load: {type(model).__name__}, {model.config.num_hidden_layers} layers, "
        f"hidden {model.config.hidden_size}, FFN {model.config.intermediate_size} "
        f"({time.perf_counter() - start:.1f} s)")
    return export_model(model, out_dir, options, tokenizer=tokenizer, source=source.spec)
