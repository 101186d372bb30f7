"""Measuring a model on real tokens to decide what to rewrite: the dependency analysis
(:func:`~.dependency.analyze` -> ``DependencyReport``), the planner (``plan_groups`` -> ``FusionPlan``)
and :func:`~.entry.analyze_model`, which runs one after the other on a model file."""

from ffnfusion.runtime.analysis.dependency import DependencyReport, analyze, least_important_attention
from ffnfusion.runtime.analysis.entry import analyze_model
from ffnfusion.runtime.analysis.planner import plan_groups, rank_block_windows

__all__ = ["DependencyReport", "analyze", "analyze_model", "least_important_attention", "plan_groups", "rank_block_windows"]
