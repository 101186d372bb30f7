"""Synthetic Llama-shaped decoders with random weights, streamed to external data.

``ffnfusion synth llama-8b -o DIR`` writes a ~15 GB float16 model without holding more than one
block of rows of one weight in memory: every weight is a :class:`ChunkedTensor` that draws its
random rows when ``ir.save`` writes it. The graph has the node structure our exporter emits for
norms and FFNs (decomposed RMSNorm with float32 Casts in half precision, MatMul/Sigmoid/Mul SwiGLU,
[in, out] weights); attention is a plain causal GQA attention (no rotary embedding: positions do
not matter to fusion).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import numpy as np
import onnx_ir as ir

from ffnfusion.core.chunked_tensor import ChunkedTensor, rows_per_chunk
from ffnfusion.core.errors import InvalidArgumentError
from ffnfusion.core.files import write_json_atomically

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    dtype: str = "float32"
    dropped: tuple[int, ...] = ()
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS = {
    "tiny": SynthConfig(hidden=64, ffn=96, layers=6, heads=4, kv_heads=2, vocab=256, dropped=(2, 3, 4)),
    "smollm2": SynthConfig(hidden=576, ffn=1536, layers=30, heads=9, kv_heads=3, vocab=49152,
                           dropped=tuple(range(10, 18))),
    "llama-8b": SynthConfig(hidden=4096, ffn=14336, layers=32, heads=32, kv_heads=8, vocab=128256,
                            dtype="float16", dropped=tuple(range(12, 28))),
}


def random_tensor(name: str, shape: tuple[int, ...], dtype: ir.DataType, seed: int, scale: float,
                  offset: float = 0.0) -> ChunkedTensor:
    """``offset + scale · N(0, 1)`` drawn a block of rows at a time when written."""
    rows = shape[0]
    cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1

    def chunks():
        rng = np.random.default_rng(seed)
        step = rows_per_chunk(cols * 4)
        for start in range(0, rows, step):
            block = rng.standard_normal((min(step, rows - start), cols), dtype=np.float32)
            block *= scale
            block += offset
            yield block.reshape((-1, *shape[1:]))

    return ChunkedTensor(chunks, dtype, shape, name)


class _Builder:
    """Appends nodes and initializers; names values after their role."""

    def __init__(self, dtype: ir.DataType):
        self.dtype = dtype
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self.seed = 0

    def init(self, tensor: ir.TensorProtocol) -> ir.Value:
        value = ir.Value(name=tensor.name, shape=ir.Shape(tensor.shape.numpy()), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.initializers.append(value)
        return value

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        return self.init(ir.tensor(array, name=name))

    def weight(self, name: str, shape: tuple[int, ...], scale: float, offset: float = 0.0) -> ir.Value:
        self.seed += 1
        return self.init(random_tensor(name, shape, self.dtype, self.seed, scale, offset))

    def op(self, op_type: str, inputs, name: str, **attributes) -> ir.Value:
        node = ir.node(op_type, inputs, attributes or None, name=name)
        node.outputs[0].name = name
        self.nodes.append(node)
        return node.outputs[0]


def build_model(config: SynthConfig) -> ir.Model:
    dtype = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}[config.dtype]
    half = dtype != ir.DataType.FLOAT
    b = _Builder(dtype)
    h, d = config.hidden, config.head_dim
    input_ids = ir.val("input_ids", ir.DataType.INT64, ["batch", "sequence"])
    attention_mask = ir.val("attention_mask", ir.DataType.INT64, ["batch", "sequence"])
    axes_last = b.const("axes_last", np.array([-1], np.int64))
    two = b.const("two", np.array(2.0, np.float32))
    eps = b.const("eps", np.array(config.eps, np.float32))

    def rms_norm(x, prefix):
        x32 = b.op("Cast", [x], f"{prefix}/cast_in", to=ir.DataType.FLOAT) if half else x
        mean = b.op("ReduceMean", [b.op("Pow", [x32, two], f"{prefix}/pow"), axes_last], f"{prefix}/mean", keepdims=1)
        inv = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [mean, eps], f"{prefix}/add_eps")], f"{prefix}/sqrt")],
                   f"{prefix}/reciprocal")
        unit = b.op("Mul", [x32, inv], f"{prefix}/normalize")
        unit = b.op("Cast", [unit], f"{prefix}/cast_out", to=dtype) if half else unit
        gain = b.weight(f"{prefix}.weight", (h,), 0.1, 1.0)
        return b.op("Mul", [gain, unit], f"{prefix}/scale")

    # Causal additive mask [S, S]: 0 on and below the diagonal, -1e4 above.
    seq = b.op("Slice", [b.op("Shape", [input_ids], "mask/shape"), b.const("one_i", np.array([1], np.int64)),
                         b.const("two_i", np.array([2], np.int64))], "mask/seq")
    square = b.op("Concat", [seq, seq], "mask/square", axis=0)
    ones = b.op("ConstantOfShape", [square], "mask/ones", value=ir.tensor(np.array([1.0], np.float32)))
    lower = b.op("Trilu", [ones], "mask/lower", upper=0)
    mask = b.op("Mul", [b.op("Sub", [lower, b.const("one_f", np.array(1.0, np.float32))], "mask/sub"),
                        b.const("big", np.array(1e4, np.float32))], "mask/additive")
    mask = b.op("Cast", [mask], "mask/cast", to=dtype) if half else mask

    table = b.weight("model.embed_tokens.weight", (config.vocab, h), 1.0)
    x = b.op("Gather", [table, input_ids], "embedding")
    shape_heads = b.const("shape_heads", np.array([0, 0, config.heads, d], np.int64))
    shape_kv = b.const("shape_kv", np.array([0, 0, config.kv_heads, d], np.int64))
    shape_back = b.const("shape_back", np.array([0, config.heads, -1, d], np.int64))
    shape_merge = b.const("shape_merge", np.array([0, 0, h], np.int64))
    repeat = b.const("repeat", np.array([1, 1, config.heads // config.kv_heads, 1, 1], np.int64))
    axis2 = b.const("axis2", np.array([2], np.int64))
    scale = b.const("scale", np.array(1 / np.sqrt(d), dtype.numpy()))
    for layer in range(config.layers):
        p = f"model.layers.{layer}"
        if layer not in config.dropped:
            n = rms_norm(x, f"{p}.input_layernorm")
            q = b.op("MatMul", [n, b.weight(f"{p}.self_attn.q_proj.weight", (h, h), h ** -0.5)], f"{p}/q")
            k = b.op("MatMul", [n, b.weight(f"{p}.self_attn.k_proj.weight", (h, config.kv_heads * d), h ** -0.5)], f"{p}/k")
            v = b.op("MatMul", [n, b.weight(f"{p}.self_attn.v_proj.weight", (h, config.kv_heads * d), h ** -0.5)], f"{p}/v")
            q = b.op("Transpose", [b.op("Reshape", [q, shape_heads], f"{p}/q_heads")], f"{p}/q_t", perm=[0, 2, 1, 3])
            kv = []
            for name, t in (("k", k), ("v", v)):
                t = b.op("Transpose", [b.op("Reshape", [t, shape_kv], f"{p}/{name}_heads")], f"{p}/{name}_t", perm=[0, 2, 1, 3])
                t = b.op("Expand", [b.op("Unsqueeze", [t, axis2], f"{p}/{name}_unsq"), repeat], f"{p}/{name}_rep")
                kv.append(b.op("Reshape", [t, shape_back], f"{p}/{name}_gqa"))
            scores = b.op("MatMul", [q, b.op("Transpose", [kv[0]], f"{p}/k_tt", perm=[0, 1, 3, 2])], f"{p}/scores")
            scores = b.op("Add", [b.op("Mul", [scores, scale], f"{p}/scaled"), mask], f"{p}/masked")
            probs = b.op("Softmax", [scores], f"{p}/softmax", axis=-1)
            context = b.op("Transpose", [b.op("MatMul", [probs, kv[1]], f"{p}/context")], f"{p}/context_t", perm=[0, 2, 1, 3])
            merged = b.op("Reshape", [context, shape_merge], f"{p}/merge")
            out = b.op("MatMul", [merged, b.weight(f"{p}.self_attn.o_proj.weight", (h, h), h ** -0.5)], f"{p}/o")
            x = b.op("Add", [x, out], f"{p}/attn_residual")
        n = rms_norm(x, f"{p}.post_attention_layernorm")
        gate = b.op("MatMul", [n, b.weight(f"{p}.mlp.gate_proj.weight", (h, config.ffn), h ** -0.5)], f"{p}/gate")
        silu = b.op("Mul", [gate, b.op("Sigmoid", [gate], f"{p}/sigmoid")], f"{p}/silu")
        up = b.op("MatMul", [n, b.weight(f"{p}.mlp.up_proj.weight", (h, config.ffn), h ** -0.5)], f"{p}/up")
        down = b.op("MatMul", [b.op("Mul", [silu, up], f"{p}/gated"),
                               b.weight(f"{p}.mlp.down_proj.weight", (config.ffn, h), config.ffn ** -0.5)], f"{p}/down")
        x = b.op("Add", [x, down], f"{p}/ffn_residual")
    final = rms_norm(x, "model.norm")
    logits = b.op("MatMul", [final, b.weight("lm_head.weight", (h, config.vocab), h ** -0.5)], "logits")
    logits.type, logits.shape = ir.TensorType(dtype), ir.Shape(["batch", "sequence", config.vocab])
    graph = ir.Graph([input_ids, attention_mask], [logits], nodes=b.nodes, initializers=b.initializers,
                     opset_imports={"": 20}, name="synthetic_llama")
    return ir.Model(graph, ir_version=10, producer_name="ffnfusion-synth")


def write_synthetic(preset: str, out_dir: str | pathlib.Path, *, dtype: str | None = None,
                    dropped: list[int] | None = None) -> pathlib.Path:
    """Build ``preset`` (optionally overriding dtype and attention-free layers) and save it."""
    if preset not in PRESETS:
        raise InvalidArgumentError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    config = PRESETS[preset]
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype)
    if dropped is not None:
        if any(not 0 <= i < config.layers for i in dropped):
            raise InvalidArgumentError(f"--drop-attention: preset {preset} has layers 0-{config.layers - 1}")
        config = dataclasses.replace(config, dropped=tuple(dropped))
    from ffnfusion.core.model_io import initializer_bytes, save_model

    out = pathlib.Path(out_dir)
    model = build_model(config)
    size = initializer_bytes(model)
    logger.info(f"synth: {preset}: {config.layers} layers, hidden {config.hidden}, FFN {config.ffn}, {config.dtype}, "
        f"attention-free {list(config.dropped)}; writing {size / 2**30:.2f} GiB of random weights")
    path = save_model(model, out / "model.onnx", external=True)
    write_json_atomically(out / "ffnfusion.json", {"source": f"synth:{preset}", "dropped_attention": list(config.dropped),
                                                   "config": dataclasses.asdict(config)})
    return path
