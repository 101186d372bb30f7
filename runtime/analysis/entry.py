"""The analysis entry point: measure a model file on token windows, then plan groups from the
measurement (:mod:`.dependency` -> :mod:`.planner`; neither imports the other's caller)."""

from __future__ import annotations

import logging
import pathlib

import numpy as np

from ffnfusion.passes.layer_ranges import format_ranges
from ffnfusion.runtime.analysis.dependency import analyze
from ffnfusion.runtime.analysis.planner import plan_groups, rank_block_windows
from ffnfusion.runtime.block_runner import BlockRunner, choose_streamed
from ffnfusion.runtime.device import Device, resolve_device

logger = logging.getLogger(__name__)

BLOCK_WINDOW = 4  # whole blocks per window in the report's ranking (the paper's full-block windows)


def analyze_model(model_path: str | pathlib.Path, windows: np.ndarray, *, max_distance: int = 8,
                  dependency_tokens: int = 2048, threshold: float | None = None, max_width: int | None = None,
                  include_last: bool = False, stream: bool | None = None, progress=None,
                  device: str | Device = "auto"):
    """Measure ``model_path`` on ``windows`` and plan groups; returns ``(DependencyReport, FusionPlan)``.
    ``stream``: run block by block (None: when the model would not fit in memory); ``device``: where
    its pieces run."""
    runner = BlockRunner(model_path, streamed=choose_streamed(model_path, stream), device=resolve_device(device))
    logger.info(f"analyze: {runner.path}: {len(runner.units)} blocks, runs "
                f"{', '.join(format_ranges(range(a, b + 1)) for a, b in runner.block_map.runs) or 'none'}; "
                f"{windows.size} tokens in {len(windows)} windows of {windows.shape[1]}")
    report = analyze(runner, windows, max_distance=max_distance, dependency_tokens=dependency_tokens,
                     progress=progress)
    limits = {} if threshold is None else {"threshold": threshold}
    plan = plan_groups(report, max_width=max_width, include_last=include_last, **limits)
    if max_distance >= BLOCK_WINDOW - 1:  # M covers every pair inside a window
        report.block_windows = rank_block_windows(report, BLOCK_WINDOW)
    logger.info(f"analyze: plan {plan.describe() or '(no group passes the threshold)'}; cost "
                f"{report.cost['full_forward_equivalents']} full-forward equivalents")
    return report, plan
