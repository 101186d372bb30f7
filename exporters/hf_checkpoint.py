"""ONNX model → Hugging Face checkpoint that vLLM, TensorRT-LLM and llama.cpp serve: ``export_hf``.

Any model ffnfusion wrote (attention dropped, FFNs fused, repaired, a frontier point) becomes a
Nemotron-NAS checkpoint (:mod:`.nemotron_nas`): one layer per position on the residual stream, so
layers fused away are gone and the rest renumbered; a fused group is one wide FFN whose norm gains
are already folded into gate/up (its ``post_attention_layernorm`` is ones). A model whose layers are
all alike is written as a plain Llama instead.

The weights are read from the graph by structure (:func:`~ffnfusion.passes.blocks.find_blocks`,
:func:`~ffnfusion.passes.attention_branch.match_attention`), never by initializer names, one tensor at
a time into ≤ 2 GiB safetensors shards, so a model larger than RAM exports too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil

import numpy as np
import onnx_ir as ir

from ffnfusion.core.errors import BlockRecognitionError, InvalidArgumentError, InvalidPlanError, ModelSourceError
from ffnfusion.core.files import staged_directory
from ffnfusion.core.model_io import COMPANION_FILES, METADATA_FILE, load_model, model_file
from ffnfusion.exporters import nemotron_nas
from ffnfusion.passes import norm_matchers, op_matchers
from ffnfusion.passes.attention_branch import match_attention
from ffnfusion.passes.block_map import BlockMap, DecoderLayer
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.embedding import embedding_table, find_embedding_gather, find_embedding_output

logger = logging.getLogger(__name__)

SHARD_BYTES = 2 << 30
# Copied from the ONNX model's folder; config.json is written fresh.
TOKENIZER_FILES = tuple(name for name in COMPANION_FILES if name not in ("config.json", "generation_config.json"))
# Written by transformers 5; transformers 4 (vLLM's, llama.cpp's converter) does not know it.
TRANSFORMERS5_TOKENIZER_CLASS = "TokenizersBackend"


@dataclasses.dataclass
class HFLayer:
    """One written layer: which source layers it holds and what it is."""

    source_layers: list[int]
    kv_heads: int | None  # None: no attention
    ffn_width: int | None  # as in the ONNX model; None: no FFN
    written_width: int | None  # after padding to what the engines derive from ffn_mult

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class HFExportResult:
    directory: pathlib.Path
    architecture: str
    dtype: str
    layers: list[HFLayer]
    shards: list[str]
    tensor_parallel: int

    def to_dict(self) -> dict:
        return {"directory": str(self.directory), "architecture": self.architecture, "dtype": self.dtype,
                "num_hidden_layers": len(self.layers), "tensor_parallel": self.tensor_parallel,
                "shards": self.shards, "layers": [layer.to_dict() for layer in self.layers]}


def export_hf(model_path: str | os.PathLike, out_dir: str | os.PathLike, *, tensor_parallel: int = 1,
              llama_if_uniform: bool = True) -> HFExportResult:
    """Write ``model_path`` (an ONNX model ffnfusion exported or rewrote) to ``out_dir`` as a
    Nemotron-NAS checkpoint (a plain Llama when every layer is alike and ``llama_if_uniform``).
    FFN widths are padded (exactly) to multiples of lcm(256, ``tensor_parallel``)."""
    if tensor_parallel < 1:
        raise InvalidArgumentError(f"--tensor-parallel must be ≥ 1, got {tensor_parallel}")
    path = model_file(model_path)
    out = pathlib.Path(out_dir)
    if out.resolve() == path.parent.resolve():
        raise InvalidArgumentError(f"the output folder {out} is the input's folder; choose another")
    config_of_source = source_config(path.parent)
    checkpoint = checkpoint_tensors(load_model(path), config_of_source, tensor_parallel)
    layers = checkpoint.layers
    tensors = [(t.name, t.tensor, t.transpose) for t in checkpoint.tensors]
    uniform = len({(layer.kv_heads, layer.ffn_width) for layer in layers}) == 1 and layers[0].kv_heads is not None \
        and layers[0].ffn_width is not None and all(len(layer.source_layers) == 1 for layer in layers) \
        and layers[-1].source_layers[-1] + 1 == len(layers)
    width = layers[0].ffn_width
    llama = llama_if_uniform and uniform and width is not None and width % tensor_parallel == 0
    if llama:
        for layer in layers:
            layer.written_width = layer.ffn_width
    head_dim = config_of_source.get("head_dim") or \
        config_of_source["hidden_size"] // config_of_source["num_attention_heads"]
    config = _config(config_of_source, layers, llama, head_dim)
    dtype = _dtype_name(tensors[0][1])
    config["torch_dtype"] = dtype

    with staged_directory(out) as staging:
        shards = _write_shards(staging, tensors, layers)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if not llama:
            for name in nemotron_nas.REMOTE_CODE_FILES:
                shutil.copyfile(nemotron_nas.REMOTE_CODE_DIR / name, staging / name)
        generation = {k: config_of_source[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                      if config_of_source.get(k) is not None}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        _copy_tokenizer(path.parent, staging)
    result = HFExportResult(out, config["architectures"][0], dtype, layers, shards, tensor_parallel)
    logger.info(f"export-hf: wrote {out} ({result.architecture}, {len(layers)} layers from "
                f"{checkpoint.block_map.num_layers}, {dtype}, {len(shards)} shard(s))")
    return result


@dataclasses.dataclass(frozen=True)
class CheckpointTensor:
    """One checkpoint tensor and where the graph keeps it: ``value`` is the initializer (None for a
    tensor the graph does not store, such as a fused group's all-ones norm gain), stored ``[out, in]``
    in the checkpoint when ``transpose`` says the graph stores it ``[in, out]``."""

    name: str
    tensor: ir.TensorProtocol | np.ndarray
    transpose: bool
    value: ir.Value | None


@dataclasses.dataclass(frozen=True)
class CheckpointTensors:
    block_map: BlockMap
    layers: list[HFLayer]
    tensors: list[CheckpointTensor]


def _gain(name: str, gain: ir.Value) -> CheckpointTensor:
    """A norm gain the matchers found (always a constant)."""
    assert gain.const_value is not None
    return CheckpointTensor(name, gain.const_value, False, gain)


def checkpoint_tensors(model: ir.Model, source_config: dict, tensor_parallel: int = 1) -> CheckpointTensors:
    """Every tensor of the Nemotron-NAS checkpoint of ``model``, by checkpoint name, with the graph
    value it comes from: :func:`export_hf` writes them, and a trained checkpoint's values are written
    back into the same initializers (``ffnfusion heal``)."""
    hidden = source_config["hidden_size"]
    heads = source_config["num_attention_heads"]
    head_dim = source_config.get("head_dim") or hidden // heads
    reason = unrepresentable(source_config, head_dim)
    if reason:
        raise BlockRecognitionError(f"{reason}: a Nemotron-NAS checkpoint cannot represent it")
    block_map = find_blocks(model)
    graph = model.graph
    tensors: list[CheckpointTensor] = []
    layers = [_layer_tensors(position, layer, tensors, hidden, heads, head_dim, tensor_parallel)
              for position, layer in enumerate(block_map.layers)]
    gather = find_embedding_gather(graph)
    if find_embedding_output(graph) is not gather.outputs[0]:
        raise BlockRecognitionError("the embedding is scaled before the first layer (Gemma-style): "
                                    "not a Llama/Nemotron-NAS model")
    table = embedding_table(gather)
    if table is None:
        raise BlockRecognitionError("the embedding table is not a constant the checkpoint can hold")
    tensors.insert(0, CheckpointTensor("model.embed_tokens.weight", table, False, None))
    last = block_map.layers[-1]
    final = last.ffn if last.ffn is not None else last.attention_block
    assert final is not None  # find_blocks makes no layer without either
    final_stream = final.output
    head = _head(graph)
    norm = norm_matchers.match_norm(head.input, final_stream)
    if norm is None or norm.gain is None or norm.centered:
        raise BlockRecognitionError("no RMSNorm with a gain between the last layer and the output projection")
    tensors += [_gain("model.norm.weight", norm.gain),
                _weight("lm_head.weight", head.weight)]
    return CheckpointTensors(block_map, layers, tensors)


def unrepresentable(source_config: dict, head_dim: int) -> str | None:
    """What the source model's config says its layers do that a Nemotron-NAS (Llama) layer cannot:
    sliding-window attention (Mistral, Qwen2 with it on, Gemma 2/3), soft-capped scores or logits
    (Gemma 2), attention scaled other than by 1/√head_dim or scaled logits (Granite); None if nothing.
    These leave no weight of their own in the graph, so the config is where they show."""
    layer_types = source_config.get("layer_types") or []
    window = source_config.get("sliding_window")
    if "sliding_attention" in layer_types or (
            window is not None and not layer_types and source_config.get("use_sliding_window") is not False):
        return f"sliding-window attention (window {window})"
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if source_config.get(key) is not None:
            return f"soft-capping ({key} {source_config[key]})"
    scale = source_config.get("attention_multiplier")
    if scale is not None and abs(scale * head_dim ** 0.5 - 1) > 1e-6:
        return f"attention scores scaled by {scale} (attention_multiplier), not 1/sqrt(head_dim)"
    if source_config.get("logits_scaling") not in (None, 1, 1.0):
        return f"logits divided by {source_config['logits_scaling']} (logits_scaling)"
    return None


def _weight(name: str, weight: op_matchers.Weight) -> CheckpointTensor:
    return CheckpointTensor(name, weight.tensor, not weight.transposed, weight.value)


def source_config(directory: pathlib.Path) -> dict:
    """The Hugging Face config of the model the ONNX graph came from (``ffnfusion.json``, else
    ``config.json``): heads, rotary and vocabulary facts the graph does not state plainly."""
    metadata = directory / METADATA_FILE
    if metadata.is_file():
        config = json.loads(metadata.read_text()).get("config")
        if config:
            return config
    if (directory / "config.json").is_file():
        return json.loads((directory / "config.json").read_text())
    raise ModelSourceError(f"{directory} has no {METADATA_FILE} with the source model's config (nor a config.json); "
                           "export-hf needs it for the heads and rotary settings: use a model ffnfusion exported")


def _layer_tensors(position: int, layer: DecoderLayer, tensors: list, hidden: int, heads: int, head_dim: int,
                   tensor_parallel: int) -> HFLayer:
    prefix = f"model.layers.{position}."
    where = f"layer {layer.index}"
    if layer.window is not None:
        raise InvalidPlanError(f"layers {layer.index}-{layer.last} run side by side as whole blocks (a block-parallel "
                               "window), which a Nemotron-NAS checkpoint cannot describe (one layer per stream step)")
    if layer.ffn is None and layer.unknown != "FFN removed":
        raise BlockRecognitionError(f"{where}: {layer.unknown or 'no FFN found'}")
    kv_heads = None
    if layer.attention_block is not None:
        weights = match_attention(layer.attention_block)
        if isinstance(weights, str):
            raise BlockRecognitionError(f"{where}: attention not exportable: {weights}")
        if weights.norm.gain is None or weights.norm.centered:
            raise BlockRecognitionError(f"{where}: attention norm is not an RMSNorm with a gain")
        q_width, kv_width = weights.widths()
        if q_width != heads * head_dim or kv_width % head_dim:
            raise BlockRecognitionError(f"{where}: q/k widths {q_width}/{kv_width} do not fit {heads} heads of {head_dim}")
        kv_heads = kv_width // head_dim
        if heads % tensor_parallel or (kv_heads % tensor_parallel and tensor_parallel % kv_heads):
            raise InvalidArgumentError(f"--tensor-parallel {tensor_parallel}: {where} has {heads} query and {kv_heads} "
                                       "KV heads; TP needs heads % TP == 0 and KV heads divisible by TP or TP by them")
        tensors.append(_gain(prefix + "input_layernorm.weight", weights.norm.gain))
        for name, weight in (("q", weights.q), ("k", weights.k), ("v", weights.v), ("o", weights.o)):
            tensors.append(_weight(prefix + f"self_attn.{name}_proj.weight", weight))
    ffn = layer.ffn
    if ffn is None:
        logger.warning(f"export-hf: {where} keeps its attention but has no FFN; llama.cpp's deci graph drops "
                       "such a layer's attention output (vLLM and TensorRT-LLM do not)")
        return HFLayer(list(layer.span), kv_heads, None, None)
    if ffn.post_norm is not None:
        raise BlockRecognitionError(f"{where}: FFN with a post-norm (Gemma 2/3 sandwich layer); a Nemotron-NAS "
                                    "layer cannot represent it")
    if ffn.gate is None or ffn.activation != "silu" or ffn.norm.centered:
        raise BlockRecognitionError(f"{where}: FFN is {ffn.kind} {ffn.activation} with {ffn.norm.kind}; "
                                    "Nemotron-NAS layers are SiLU-gated with RMSNorm")
    if any(b is not None for b in (ffn.gate_bias, ffn.up_bias, ffn.down_bias, ffn.norm.bias)):
        raise BlockRecognitionError(f"{where}: FFN with biases; Nemotron-NAS layers have none")
    tensors.append(_gain(prefix + "post_attention_layernorm.weight", ffn.norm.gain) if ffn.norm.gain is not None else
                   CheckpointTensor(prefix + "post_attention_layernorm.weight", np.ones(hidden, ffn.dtype.numpy()),
                                    False, None))
    for name, weight in (("gate", ffn.gate), ("up", ffn.up), ("down", ffn.down)):
        tensors.append(_weight(prefix + f"mlp.{name}_proj.weight", weight))
    return HFLayer(list(layer.span), kv_heads, ffn.width, nemotron_nas.padded_width(ffn.width, tensor_parallel))


def _head(graph: ir.Graph) -> op_matchers.Linear:
    logits = next((v for v in graph.outputs if v.name == "logits"), None)
    head = op_matchers.match_linear(op_matchers.skip_casts(logits)) if logits is not None else None
    if head is None or head.input is None or head.bias is not None:
        raise BlockRecognitionError("no output projection without bias produces 'logits'")
    return head


def _config(source: dict, layers: list[HFLayer], llama: bool, head_dim: int) -> dict:
    hidden = source["hidden_size"]
    rope = source.get("rope_parameters") or {}
    config = {
        "architectures": ["LlamaForCausalLM" if llama else nemotron_nas.ARCHITECTURE],
        "model_type": "llama" if llama else nemotron_nas.MODEL_TYPE,
        "hidden_size": hidden, "num_attention_heads": source["num_attention_heads"], "head_dim": head_dim,
        "num_hidden_layers": len(layers), "hidden_act": "silu", "rms_norm_eps": source.get("rms_norm_eps", 1e-6),
        "rope_theta": source.get("rope_theta") or rope.get("rope_theta", 10000.0),
        "rope_scaling": source.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None),
        "max_position_embeddings": source.get("max_position_embeddings"), "vocab_size": source["vocab_size"],
        "bos_token_id": source.get("bos_token_id"), "eos_token_id": source.get("eos_token_id"),
        "pad_token_id": source.get("pad_token_id"), "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "use_cache": True,
    }
    if llama:
        config.update(intermediate_size=layers[0].ffn_width,
                      num_key_value_heads=layers[0].kv_heads)
        return config
    blocks = [nemotron_nas.NasBlock(None if layer.kv_heads is None else source["num_attention_heads"] // layer.kv_heads,
                                    layer.written_width).to_config(hidden) for layer in layers]
    config.update(intermediate_size=None, num_key_value_heads=None, auto_map=dict(nemotron_nas.AUTO_MAP),
                  block_configs=blocks)
    return config


def _dtype_name(tensor) -> str:
    dtype = tensor.dtype if isinstance(tensor, np.ndarray) else tensor.dtype.numpy()
    return {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}.get(np.dtype(dtype).name, "float32")


def _as_torch(tensor, transpose: bool, rows: int | None = None, columns: int | None = None):
    """A tensor as torch ``[out, in]``, zero-padded to ``rows`` × ``columns`` (the FFN width)."""
    import torch

    array = tensor if isinstance(tensor, np.ndarray) else tensor.numpy()
    if transpose:
        array = array.T
    array = np.array(array, order="C")  # a copy: the source may be a read-only memory map
    if array.dtype.name == "bfloat16":  # ml_dtypes: no torch.from_numpy for it
        result = torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    else:
        result = torch.from_numpy(array)
    if (rows and rows > result.shape[0]) or (columns and columns > result.shape[-1]):
        padded = result.new_zeros((rows or result.shape[0], columns or result.shape[-1]))
        padded[:result.shape[0], :result.shape[-1]] = result
        result = padded
    return result


def _write_shards(out: pathlib.Path, tensors: list, layers: list[HFLayer]) -> list[str]:
    """safetensors shards of ≤ ``SHARD_BYTES``, each written as soon as it is full (so at most one
    shard is in memory), each tensor read and padded only then; renamed once their count is known."""
    from safetensors.torch import save_file

    widths = {f"model.layers.{i}.": layer.written_width for i, layer in enumerate(layers)}
    shard: dict = {}
    size = total = 0
    written: list[tuple[pathlib.Path, list[str]]] = []

    def flush() -> None:
        staged = out / f".shard-{len(written)}.safetensors"
        save_file(shard, str(staged), metadata={"format": "pt"})
        written.append((staged, list(shard)))
        shard.clear()

    for name, tensor, transpose in tensors:
        prefix = name[:name.index(".", len("model.layers.")) + 1] if name.startswith("model.layers.") else ""
        width = widths.get(prefix)
        rows = width if width and name.endswith(("gate_proj.weight", "up_proj.weight")) else None
        columns = width if width and name.endswith("down_proj.weight") else None
        value = _as_torch(tensor, transpose, rows, columns)
        nbytes = value.numel() * value.element_size()
        if shard and size + nbytes > SHARD_BYTES:
            flush()
            size = 0
        shard[name] = value
        size += nbytes
        total += nbytes
    flush()
    names = ["model.safetensors"] if len(written) == 1 else \
        [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
    weight_map = {}
    for name, (staged, keys) in zip(names, written):
        staged.rename(out / name)
        weight_map.update(dict.fromkeys(keys, name))
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def _copy_tokenizer(src: pathlib.Path, dst: pathlib.Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    settings = dst / "tokenizer_config.json"
    if settings.is_file():
        data = json.loads(settings.read_text())
        if data.get("tokenizer_class") == TRANSFORMERS5_TOKENIZER_CLASS:
            data["tokenizer_class"] = "PreTrainedTokenizerFast"  # read by transformers 4 and 5 alike
            settings.write_text(json.dumps(data, indent=2) + "\n")
