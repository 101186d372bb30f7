"""Check a fused group against the parallel-sum reference in numpy, straight from the weights.

No runtime session and no full model in memory: only the group's weights are read, so this works
on models far larger than RAM. For random tokens ``x``:

    reference = Σ_j ffn_j(n_j(x))      (the original model's layers, each with its own norm)
    fused     = ffn*(unit(x))          (the fused model's block: one unit-gain norm)

for every FFN kind ffnfusion fuses (gated or plain, biased or not, RMSNorm or LayerNorm).
"""

from __future__ import annotations

import math

import numpy as np

from ffnfusion.model_io import load_model
from ffnfusion.passes.blocks import FFNBlock, find_blocks


def _activation(kind: str, value: np.ndarray) -> np.ndarray:
    if kind == "silu":
        return value / (1 + np.exp(-value))
    if kind == "gelu_tanh":
        return 0.5 * value * (1 + np.tanh(np.sqrt(2 / np.pi) * (value + 0.044715 * value ** 3)))
    return 0.5 * value * (1 + np.vectorize(math.erf)(value / np.sqrt(2)))


def _unit(block: FFNBlock, x: np.ndarray) -> np.ndarray:
    if block.norm.kind == "LayerNormalization":
        x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + block.norm.epsilon)


def _const(value) -> np.ndarray | float:
    return 0.0 if value is None else value.const_value.numpy().astype(np.float32)


def _ffn(block: FFNBlock, x: np.ndarray) -> np.ndarray:
    """The block's residual update for stream rows ``x``, in float32 from the stored weights."""
    gain = 1.0 if block.norm.gain is None else _const(block.norm.gain)
    normed = _unit(block, x) * gain + _const(block.norm.bias)
    hidden = normed @ block.up.numpy_in_out().astype(np.float32) + _const(block.up_bias)
    if block.gate is not None:
        gate = normed @ block.gate.numpy_in_out().astype(np.float32) + _const(block.gate_bias)
        hidden = _activation(block.activation, gate) * hidden
    else:
        hidden = _activation(block.activation, hidden)
    return hidden @ block.down.numpy_in_out().astype(np.float32) + _const(block.down_bias)


def fused_group_error(original_path: str, fused_path: str, group: list[int], tokens: int = 4, seed: int = 0) -> dict:
    """Relative error (Frobenius) of the fused block's update against the parallel sum."""
    original, fused = find_blocks(load_model(original_path)), find_blocks(load_model(fused_path))
    fused_block = fused.ffn(group[0])
    span = fused.layer(group[0]).span
    if list(span) != list(group):
        raise ValueError(f"the fused model holds layers {span.start}-{span.stop - 1} at layer {group[0]}, not {group}")
    members = [original.ffn(i) for i in group]
    x = np.random.default_rng(seed).standard_normal((tokens, members[0].hidden), dtype=np.float32)
    reference = sum(_ffn(member, x) for member in members)
    candidate = _ffn(fused_block, x)
    return {"group": [group[0], group[-1]], "tokens": tokens, "width": fused_block.width,
            "rel_err": float(np.linalg.norm(candidate - reference) / np.linalg.norm(reference))}
