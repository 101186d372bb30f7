"""Training-free repair of fused groups: the linear algebra (:mod:`.down_refit`) and the pass that
measures candidates by running the model (:mod:`.repair_pass`)."""

from ffnfusion.runtime.repair.repair_pass import (
    GroupRepair,
    RepairPass,
    RepairReport,
    RepairResult,
    lambda_grid,
)

__all__ = ["GroupRepair", "RepairPass", "RepairReport", "RepairResult", "lambda_grid"]
