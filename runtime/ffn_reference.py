"""FFN blocks evaluated in numpy straight from their stored weights (float32).

No runtime session: the exactness check and the repair's least-squares fit read only the weights of
the blocks they look at. ``ffn_activation`` is the activation the down projection reads, ``update`` the
block's residual update ``ffn(n(x))``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ffnfusion.core.errors import InvalidPlanError
from ffnfusion.passes.blocks import FFNBlock
from ffnfusion.passes.elementwise import ACTIVATIONS
from ffnfusion.passes.streaming import read_columns, read_rows


def activation(kind: str, value: np.ndarray) -> np.ndarray:
    return ACTIVATIONS[kind](value)


def _const(value) -> np.ndarray:
    """A matched constant (gain, bias) as float32; 0 for an absent one."""
    return np.float32(0.0) if value is None else value.const_value.numpy().astype(np.float32)


def normed(block: FFNBlock, x: np.ndarray) -> np.ndarray:
    """``n(x)``: the block's RMSNorm or LayerNorm, gain and bias included."""
    if block.norm.centered:
        x = x - x.mean(-1, keepdims=True)
    unit = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + block.norm.epsilon)
    gain = 1.0 if block.norm.gain is None else _const(block.norm.gain)
    return unit * gain + _const(block.norm.bias)


def check_refittable(block: FFNBlock) -> None:
    """The refits and the repair fit ``W_down`` linearly: refuse an FFN whose update is not linear in it."""
    if block.post_norm is not None:
        raise InvalidPlanError(f"layer {block.layer}'s FFN normalises its output (a post-norm, as in Gemma 2/3's sandwich "
                               "layers): its update is not linear in W_down, which the refits and the repair assume; "
                               "not supported for this model yet")


def ffn_activation(block: FFNBlock, x: np.ndarray, columns: slice = slice(None)) -> np.ndarray:
    """``act(n(x)·G + b_g) ⊙ (n(x)·U + b_u)`` (or ``act(n(x)·U + b_u)``), restricted to ``columns``."""
    check_refittable(block)
    n = normed(block, x.astype(np.float32, copy=False))
    start, stop, _ = columns.indices(block.width)

    def project(weight, bias):
        # only these columns are read: a fused group's weights are never materialised whole
        out = n @ read_columns(weight, start, stop)
        return out if bias is None else out + _const(bias)[start:stop]

    up = project(block.up, block.up_bias)
    if block.gate is None:
        return activation(block.activation, up)
    return activation(block.activation, project(block.gate, block.gate_bias)) * up


def down_bias(block: FFNBlock) -> np.ndarray:
    """``b_d`` (zeros when the block has none), float32."""
    if block.down_bias is None:
        return np.zeros(block.hidden, np.float32)
    return _const(block.down_bias)


COLUMN_BLOCK = 4096  # FFN columns evaluated at a time: a wide fused group never holds [tokens, width]


def update(block: FFNBlock, x: np.ndarray) -> np.ndarray:
    """The block's residual update ``down(ffn_activation(x)) + b_d`` for stream rows ``x``, summed
    over blocks of ``COLUMN_BLOCK`` columns (8 fused Llama-8B FFNs on 4096 tokens would otherwise
    hold 2 × 1.9 GB of activations)."""
    total = np.zeros((len(x), block.hidden), np.float32)
    for start in range(0, block.width, COLUMN_BLOCK):
        stop = min(block.width, start + COLUMN_BLOCK)
        total += ffn_activation(block, x, slice(start, stop)) @ read_rows(block.down, start, stop).astype(np.float32)
    return total + _const(block.down_bias)


def sequential_update(blocks: Sequence[FFNBlock], x: np.ndarray) -> np.ndarray:
    """``x_k − x`` after running ``blocks`` one after another from ``x`` (the unfused run)."""
    stream = x.astype(np.float32, copy=True)
    for block in blocks:
        stream += update(block, stream)
    return stream - x
