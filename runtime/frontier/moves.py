"""Where a move acts on the evaluator's streams, and what a plan change does to the refits.

Positions count sublayers on the residual stream: ``2·j`` is layer ``j``'s attention input, ``2·j + 1``
its FFN input, ``2·num_layers`` the final stream. The evaluator keeps one stream per position; these
functions say which a move invalidates (:func:`change_position`), which one a refit targets
(:func:`cut_position`), where two plans first differ (:func:`first_difference`), and how the
down-projection updates follow FFNs that are removed or fused (:func:`remap_deltas`).
"""

from __future__ import annotations

import numpy as np

from ffnfusion.passes.depth_plan import DepthPlan, Move


def first_difference(base: DepthPlan, plan: DepthPlan, deltas: dict) -> int:
    """The first sublayer position where ``plan`` (with ``deltas``) differs from ``base``."""
    positions = [2 * j for j in plan.removed_attention - base.removed_attention]
    positions += [2 * j + 1 for j in plan.removed_ffn - base.removed_ffn]
    positions += [2 * first + 1 for first, _ in plan.groups]
    # a refitted FFN changes its position, or its window's (which computes from the window's input)
    positions += [2 * window[0] if (window := plan.window_of(first)) else 2 * first + 1 for first in deltas]
    positions += [2 * first for first, _ in plan.windows]
    return min(positions, default=2 * plan.num_layers)


def change_position(move: Move) -> int:
    """The first sublayer position a move changes."""
    first = move.layers[0]
    if move.kind in ("attention", "block", "parallel"):
        return 2 * first
    if move.kind == "ffn":
        return 2 * first + 1
    return 2 * first + 1  # fuse: the group now computes at its first member's position


def cut_position(move: Move) -> int:
    """The position whose input is the stream right after what the move changed."""
    last = move.layers[-1]
    return 2 * last + 1 if move.kind == "attention" else 2 * last + 2


def _span(plan: DepthPlan, layer: int) -> tuple[int, int]:
    """The FFN span at ``layer``, which holds an update (so it was not removed)."""
    span = plan.ffn_span(layer)
    assert span is not None, f"layer {layer}'s FFN is removed but has a down-projection update"
    return span


def remap_deltas(old: DepthPlan, new: DepthPlan, deltas: dict, width, hidden: int) -> dict:
    """Down-projection updates carried from ``old`` to ``new``: removed FFNs lose theirs, merged
    groups stack their members'."""
    if not deltas:
        return {}
    rows: dict[int, np.ndarray] = {}  # per single layer
    for first, delta in deltas.items():
        offset = 0
        for layer in range(first, _span(old, first)[1] + 1):
            rows[layer] = delta[offset:offset + width(layer)]
            offset += width(layer)
    result = {}
    for first in sorted({span[0] for layer in range(new.num_layers) if (span := new.ffn_span(layer))}):
        last = _span(new, first)[1]
        members = range(first, last + 1)
        if any(layer in rows for layer in members):
            result[first] = np.concatenate([rows.get(layer, np.zeros((width(layer), hidden), np.float32))
                                            for layer in members])
    return result
