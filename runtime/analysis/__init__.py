"""Measuring a model on real tokens to decide what to rewrite: the dependency analysis
(:func:`~.dependency.analyze` -> ``DependencyReport``) and the planner (``plan_groups`` -> ``FusionPlan``)."""

from ffnfusion.runtime.analysis.dependency import DependencyReport, analyze, analyze_model, least_important_attention
from ffnfusion.runtime.analysis.planner import plan_groups

__all__ = ["DependencyReport", "analyze", "analyze_model", "least_important_attention", "plan_groups"]
