"""Check a fused group against the parallel-sum reference in numpy, straight from the weights.

No runtime session and no full model in memory: only the group's weights are read, so this works
on models far larger than RAM. For random tokens ``x``:

    reference = Σ_j ffn_j(n_j(x))      (the original model's layers, each with its own norm)
    fused     = ffn*(unit(x))          (the fused model's block: one unit-gain norm)

for every FFN kind ffnfusion fuses (gated or plain, biased or not, RMSNorm or LayerNorm).
"""

from __future__ import annotations

import numpy as np

from ffnfusion.core.errors import InvalidPlanError
from ffnfusion.core.model_io import load_model
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.runtime.ffn_reference import update


def fused_group_error(original_path: str, fused_path: str, group: list[int], tokens: int = 4, seed: int = 0) -> dict:
    """Relative error (Frobenius) of the fused block's update against the parallel sum."""
    original, fused = find_blocks(load_model(original_path)), find_blocks(load_model(fused_path))
    fused_block = fused.ffn(group[0])
    span = fused.layer(group[0]).span
    if list(span) != list(group):
        raise InvalidPlanError(f"the fused model holds layers {span.start}-{span.stop - 1} at layer {group[0]}, not {group}")
    members = [original.ffn(i) for i in group]
    x = np.random.default_rng(seed).standard_normal((tokens, members[0].hidden), dtype=np.float32)
    reference = sum(update(member, x) for member in members)
    candidate = update(fused_block, x)
    return {"group": [group[0], group[-1]], "tokens": tokens, "width": fused_block.width,
            "rel_err": float(np.linalg.norm(candidate - reference) / np.linalg.norm(reference))}
