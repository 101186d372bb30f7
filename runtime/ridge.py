"""Ridge regression as the refits use it: one λ policy, two forms of the same solve.

``min_Δ ‖AΔ − R‖² + λ'‖Δ‖²`` with ``λ' = λ · mean(diag(AᵀA))``: ``λ`` is relative to the features'
mean energy, so one grid (:data:`LAMBDAS`) serves every layer and model size.

* :func:`solve_primal` — ``Δ = (AᵀA + λ'I)⁻¹AᵀR`` from the Gram matrix; for few features (the
  frontier's one-FFN refits: ``AᵀA`` is ``width × width``);
* :func:`solve_kernel` — ``Δ = Aᵀα``, ``α = (AAᵀ + λ'I)⁻¹R``; its system is ``N × N`` for N tokens
  whatever the width (the repair of a fused group: 8 × 14336 columns would need a 105 GB ``AᵀA``).

Both give the same ``Δ`` (``tests/test_ridge.py``); ``trace(AAᵀ) = trace(AᵀA)``, so the scale is the same.
"""

from __future__ import annotations

import math

import numpy as np

from ffnfusion.core.errors import RepairError

# Relative λ, smallest first. The repair tries the first eight (and no repair); the frontier, which
# refits once per candidate move, every other one from 1e-2 (float32 AᵀA is safe down to ~1e-3).
LAMBDAS = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
REPAIR_LAMBDAS = LAMBDAS[:8]
FRONTIER_LAMBDAS = LAMBDAS[3::2]


def _shift(lam: float, trace: float, features: int) -> float:
    shift = lam * trace / features
    if not shift > 0:
        raise RepairError(f"lambda must be positive and the features non-zero (lambda {lam})")
    return shift


def solve_primal(gram: np.ndarray, cross: np.ndarray, lam: float) -> np.ndarray:
    """``(AᵀA + λ'I)⁻¹AᵀR`` from ``gram = AᵀA`` and ``cross = AᵀR``, float64."""
    gram = gram.astype(np.float64)  # a copy, shifted in place
    shift = _shift(lam, float(np.trace(gram)), len(gram))
    return np.linalg.solve(_shifted(gram, shift, scratch=True), cross.astype(np.float64))


def solve_kernel(kernel: np.ndarray, residual: np.ndarray, lam: float, features: int, *,
                 scratch: bool = False) -> np.ndarray:
    """``α = (AAᵀ + λ'I)⁻¹R`` from ``kernel = AAᵀ`` over the fitting rows (``Δ = Aᵀα``); ``features``
    is A's column count. ``lam = inf`` gives α = 0 (Δ = 0). ``scratch``: ``kernel`` (float64) is a
    copy the caller drops after the solve, shifted in place rather than copied again."""
    if math.isinf(lam):
        return np.zeros(residual.shape, np.float64)
    shift = _shift(lam, float(np.trace(kernel)), features)
    return np.linalg.solve(_shifted(kernel, shift, scratch), residual.astype(np.float64))


def _shifted(matrix: np.ndarray, shift: float, scratch: bool) -> np.ndarray:
    """``matrix + shift·I`` in float64 with the same bits, without an identity and a sum beside it:
    the N×N systems are the repair's largest arrays (8,192 tokens: 0.5 GiB each)."""
    system = matrix if scratch and matrix.dtype == np.float64 else matrix.astype(np.float64)
    system.flat[::len(system) + 1] += shift
    return system
