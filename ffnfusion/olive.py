"""Olive integration: a ``FuseFFN`` surgeon for Olive's ``GraphSurgeries`` pass.

Importing ``ffnfusion`` after Olive, or ``ffnfusion.olive`` at any time (e.g. from an Olive
``user_script``), registers it: Olive's ``Surgeon`` subclasses register themselves by class name::

    {"type": "GraphSurgeries", "surgeries": [{"surgeon": "FuseFFN", "groups": "10-13,14-16"}]}

``plan`` (a ``plan.json`` path written by ``ffnfusion analyze``) may replace ``groups``.
``ParallelizeBlocks`` runs windows of whole blocks side by side (see ``ffnfusion parallelize``)::

    {"surgeon": "ParallelizeBlocks", "windows": "1-3,6-7"}
"""

from __future__ import annotations

import onnx_ir as ir
from olive.passes.onnx.graph_surgeries import Surgeon

from ffnfusion.core.errors import InvalidArgumentError
from ffnfusion.passes.block_parallel import BlockParallelPass
from ffnfusion.passes.ffn_fusion import FFNFusionPass
from ffnfusion.passes.plan import FusionPlan


class FuseFFN(Surgeon):
    """Fuse groups of attention-free FFN layers into wide FFNs (see ``ffnfusion fuse``)."""

    def __init__(self, groups: str | list[list[int]] | None = None, plan: str | None = None):
        super().__init__()
        if groups is not None and plan is None:
            self.plan = FusionPlan.coerce(groups)
        elif plan is not None and groups is None:
            self.plan = FusionPlan.load(plan)
        else:
            raise InvalidArgumentError("FuseFFN needs exactly one of 'groups' (e.g. \"10-13,14-16\") or 'plan' (plan.json)")

    def call_ir(self, model: ir.Model) -> ir.Model:
        return FFNFusionPass(self.plan)(model).model


class ParallelizeBlocks(Surgeon):
    """Run windows of whole decoder blocks side by side (see ``ffnfusion parallelize``)."""

    def __init__(self, windows: str | list[list[int]], merge_cores: bool = True):
        super().__init__()
        self.parallel = BlockParallelPass(windows, merge_cores)  # windows checked here, before any model is read

    def call_ir(self, model: ir.Model) -> ir.Model:
        return self.parallel(model).model
