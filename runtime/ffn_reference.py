"""FFN blocks evaluated in numpy straight from their stored weights (float32).

No runtime session: the exactness check and the repair's least-squares fit read only the weights of
the blocks they look at. ``ffn_activation`` is the activation the down projection reads, ``update`` the
block's residual update ``ffn(n(x))``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ffnfusion.core.errors import InvalidPlanError
from ffnfusion.passes.block_map import FFNBlock
from ffnfusion.passes.elementwise import ACTIVATIONS
from ffnfusion.passes.norm_matchers import Norm
from ffnfusion.passes.streaming import read_columns, read_rows


def activation(kind: str, value: np.ndarray) -> np.ndarray:
    return ACTIVATIONS[kind](value)


def _const(value) -> np.ndarray:
    """A matched constant (gain, bias) as float32; 0 for an absent one."""
    return np.float32(0.0) if value is None else value.const_value.numpy().astype(np.float32)


def unit_norm(norm: Norm, x: np.ndarray) -> np.ndarray:
    """``x / rms(x)`` (centred first for a LayerNorm): ``norm`` without its gain and bias."""
    if norm.centered:
        x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + norm.epsilon)


def apply_norm(norm: Norm, x: np.ndarray, member: int | None = None) -> np.ndarray:
    """``norm(x)``, gain and bias included; ``member`` picks one gain of a grouped post-norm's stack."""
    gain = np.float32(1.0) if norm.gain is None else _const(norm.gain)
    if member is not None:
        gain = gain[member, 0]
    return unit_norm(norm, x) * gain + _const(norm.bias)


def normed(block: FFNBlock, x: np.ndarray) -> np.ndarray:
    """``n(x)``: the block's input RMSNorm or LayerNorm, gain and bias included."""
    return apply_norm(block.norm, x)


def check_refittable(block: FFNBlock) -> None:
    """The repair refits a group's stacked ``W_down`` linearly, or, where the members normalise their
    output, their post-RMSNorm gains: refuse an FFN where neither is what the layer computes."""
    post = block.post_norm
    if post is not None and (post.centered or post.gain is None or post.bias is not None):
        raise InvalidPlanError(f"layer {block.layer}'s FFN normalises its output with a "
                               f"{'LayerNorm' if post.centered else 'gainless norm'}: the repair refits "
                               "post-RMSNorm gains only (Gemma 2/3); not supported for this model")


def post_norm_members(block: FFNBlock) -> int:
    """How many post-norms ``block`` applies side by side: 1, or k for a grouped post-norm."""
    gain = block.post_norm.gain if block.post_norm is not None else None
    return 1 if gain is None or gain.const_value is None or len(gain.const_value.shape) != 3 \
        else int(gain.const_value.shape.numpy()[0])


def ffn_activation(block: FFNBlock, x: np.ndarray, columns: slice = slice(None)) -> np.ndarray:
    """``act(n(x)·G + b_g) ⊙ (n(x)·U + b_u)`` (or ``act(n(x)·U + b_u)``), restricted to ``columns``."""
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


def _down_product(block: FFNBlock, x: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``ffn_activation(x)[:, start:stop] · W_down[start:stop]``, summed over blocks of
    ``COLUMN_BLOCK`` columns (8 fused Llama-8B FFNs on 4096 tokens would otherwise hold 2 × 1.9 GB
    of activations)."""
    total = np.zeros((len(x), block.hidden), np.float32)
    for first in range(start, stop, COLUMN_BLOCK):
        last = min(stop, first + COLUMN_BLOCK)
        total += ffn_activation(block, x, slice(first, last)) @ read_rows(block.down, first, last).astype(np.float32)
    return total


def member_output(block: FFNBlock, x: np.ndarray, member: int) -> np.ndarray:
    """What member ``member`` of a post-normed block feeds its post-norm: ``down_j(act_j(x))`` (``+ b_d``
    for a single FFN); the members of a grouped post-norm are equal slices of the block's columns."""
    width = block.width // post_norm_members(block)
    output = _down_product(block, x, member * width, (member + 1) * width)
    return output + _const(block.down_bias) if width == block.width else output


def update(block: FFNBlock, x: np.ndarray) -> np.ndarray:
    """The block's residual update for stream rows ``x``: ``down(ffn_activation(x)) + b_d``, through
    its post-norm when it has one (a grouped post-norm: each member's own, summed)."""
    if block.post_norm is None:
        return _down_product(block, x, 0, block.width) + _const(block.down_bias)
    count = post_norm_members(block)
    if count == 1:
        return apply_norm(block.post_norm, member_output(block, x, 0))
    return np.sum([apply_norm(block.post_norm, member_output(block, x, j), member=j) for j in range(count)], axis=0)


def sequential_update(blocks: Sequence[FFNBlock], x: np.ndarray) -> np.ndarray:
    """``x_k − x`` after running ``blocks`` one after another from ``x`` (the unfused run)."""
    stream = x.astype(np.float32, copy=True)
    for block in blocks:
        stream += update(block, stream)
    return stream - x
