"""Choose fusion groups from a ``DependencyReport``: ``plan_groups(report, ...) -> FusionPlan``.

Per attention-free run (layers a..b):

1. by default drop the run's last FFN from the candidates (the paper found fusing it hurts);
   post-normed FFNs (Gemma 2/3) are candidates like any other (the fusion writes their grouped form);
2. a window of consecutive candidates is valid when every pair inside it has
   ``M[i, j] <= threshold`` and its total FFN width is at most ``max_width``;
3. take valid windows greedily: longest first (most sequential steps saved), then lowest
   ``M_max``, then lowest ``M_sum``; windows never overlap.

Each chosen group carries its ``M_max``, ``M_sum`` and width, so the plan explains itself.

:func:`rank_block_windows` does the same for whole blocks (attention kept, run side by side by
:mod:`~ffnfusion.passes.block_parallel`), as the paper chose its full-block windows: every window of
``size`` consecutive blocks, lowest ``M_max`` first, ties by ``M_sum``, none overlapping one taken before.
"""

from __future__ import annotations

from ffnfusion.passes.plan import FusionPlan
from ffnfusion.runtime.analysis.dependency import DependencyReport

DEFAULT_THRESHOLD = 0.2


def plan_groups(report: DependencyReport, *, threshold: float = DEFAULT_THRESHOLD,
                max_width: int | None = None, include_last: bool = False) -> FusionPlan:
    widths = {}
    for block in report.blocks:
        if block["kind"] == "ffn":
            widths[block["layer"]] = block["width"]
    chosen: list[tuple[list[int], dict]] = []
    for first, last in report.runs:
        candidates = [layer for layer in range(first, last + (1 if include_last else 0)) if layer in widths]
        windows = []
        for start in range(len(candidates)):
            for end in range(start + 1, len(candidates)):
                layers = candidates[start:end + 1]
                if layers != list(range(layers[0], layers[-1] + 1)):
                    break  # a previously fused FFN would be split
                width = sum(widths[layer] for layer in layers)
                if max_width is not None and width > max_width:
                    break
                m_max, m_sum = report.window_metrics(layers[0], layers[-1])
                if m_max > threshold:
                    break  # longer windows only add pairs
                windows.append((layers, {"m_max": m_max, "m_sum": m_sum, "width": width}))
        windows.sort(key=lambda item: (-len(item[0]), item[1]["m_max"], item[1]["m_sum"]))
        taken: set[int] = set()
        for layers, reason in windows:
            if taken.isdisjoint(layers):
                taken.update(layers)
                chosen.append((layers, reason))
    chosen.sort(key=lambda item: item[0][0])
    settings = {"threshold": threshold, "max_width": max_width, "include_last": include_last}
    return FusionPlan(tuple(tuple(layers) for layers, _ in chosen),
                      tuple({"layers": [layers[0], layers[-1]], **reason} for layers, reason in chosen),
                      settings)


def rank_block_windows(report: DependencyReport, size: int = 4) -> list[dict]:
    """Windows of ``size`` consecutive whole blocks (units of kind ``layer``: attention and FFN), best
    first: ``[{"layers": [first, last], "m_max", "m_sum"}, ...]``; the first ``n`` are the paper's
    choice of ``n`` windows. ``M`` must cover pairs ``size − 1`` apart (``analyze --max-distance``)."""
    layers = sorted(block["layer"] for block in report.blocks
                    if block["kind"] == "layer" and "last_layer" not in block)
    present = set(layers)
    scored: list[tuple[float, float, int]] = []  # (M_max, M_sum, first layer)
    for first in layers:
        if present.issuperset(range(first, first + size)):
            scored.append((*report.window_metrics(first, first + size - 1), first))
    taken: set[int] = set()
    ranked = []
    for m_max, m_sum, first in sorted(scored):
        members = set(range(first, first + size))
        if taken.isdisjoint(members):
            taken.update(members)
            ranked.append({"layers": [first, first + size - 1], "m_max": m_max, "m_sum": m_sum})
    return ranked
