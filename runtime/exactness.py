"""Check a fused group against the parallel-sum reference in numpy, straight from the weights.

No runtime session and no full model in memory: only the group's weights are read, so this works
on models far larger than RAM. For random tokens ``x``:

    reference = x + Σ_j down_j(silu(n_j(x)·G_j) ⊙ (n_j(x)·U_j))      (original model's layers)
    fused     = x + down*(silu(u·G*) ⊙ (u·U*)),  u = x / rms(x)          (the fused model's block)
"""

from __future__ import annotations

import numpy as np

from ffnfusion.model_io import load_model
from ffnfusion.passes.blocks import FFNBlock, find_blocks


def _ffn(block: FFNBlock, unit: np.ndarray) -> np.ndarray:
    gain = block.norm.gain.const_value.numpy().astype(np.float32) if block.norm.gain is not None else 1.0
    normed = unit * gain
    gate = normed @ block.gate.numpy_in_out().astype(np.float32)
    up = normed @ block.up.numpy_in_out().astype(np.float32)
    return (gate / (1 + np.exp(-gate)) * up) @ block.down.numpy_in_out().astype(np.float32)


def fused_group_error(original_path: str, fused_path: str, group: list[int], tokens: int = 4, seed: int = 0) -> dict:
    """Relative error (Frobenius) of the fused block's update against the parallel sum."""
    original, fused = find_blocks(load_model(original_path)), find_blocks(load_model(fused_path))
    fused_block = fused.ffn(group[0])
    span = fused.layer(group[0]).span
    if list(span) != list(group):
        raise ValueError(f"the fused model holds layers {span.start}-{span.stop - 1} at layer {group[0]}, not {group}")
    members = [original.ffn(i) for i in group]
    x = np.random.default_rng(seed).standard_normal((tokens, members[0].hidden), dtype=np.float32)
    eps = members[0].norm.epsilon
    unit = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    reference = sum(_ffn(member, unit) for member in members)
    candidate = _ffn(fused_block, unit)
    return {"group": [group[0], group[-1]], "tokens": tokens, "width": fused_block.width,
            "rel_err": float(np.linalg.norm(candidate - reference) / np.linalg.norm(reference))}
