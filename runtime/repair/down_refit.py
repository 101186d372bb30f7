"""Closed-form refit of a fused group's down projection: the linear algebra of the repair.

A fused group adds ``A(x)·W`` to the stream (``A`` its wide hidden activation, ``W = W₀`` the stacked
down weights) where the sequential layers it replaced added ``T(x)``. ``W`` enters linearly, so on
calibration tokens the ridge problem

    min_W ‖A·W − T‖² + λ'‖W − W₀‖²,      λ' = λ · mean(diag(AᵀA))

has the closed form ``W = W₀ + Δ`` with ``R = T − A·W₀`` (what the fused block still misses):

    Δ = (AᵀA + λ'I)⁻¹AᵀR = Aᵀ(AAᵀ + λ'I)⁻¹R = Aᵀα.

We solve the right-hand (kernel) form. Its system is N×N for N calibration tokens whatever the
group's width (a Llama-8B group of 8 × 14336 columns would need a 105 GB ``AᵀA`` in float64); ``A``
is never held whole (``AAᵀ = Σ_j A_j A_jᵀ`` over column blocks, ``Δ_j = A_jᵀα`` block by block); and
the group's update on held-out tokens E needs no weights: ``A_E·Δ = (A_E A_Fᵀ)α``. One kernel over
the fitting and held-out tokens serves every λ and every choice of fitting rows. ``λ = ∞`` is Δ = 0.
The solve itself, and the λ grid, are :mod:`ffnfusion.runtime.ridge`'s.

The cheaper per-channel output scale ``W = W₀·diag(s)`` solves, per output channel c with
``P = A·W₀``: ``min ‖P_c s_c − T_c‖² + λ'(s_c − 1)²``, ``λ' = λ · mean_c ‖P_c‖²``, so
``s_c = (P_cᵀT_c + λ') / (‖P_c‖² + λ')``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np

from ffnfusion.core.errors import RepairError

HiddenBlock = Callable[[np.ndarray], np.ndarray]  # stream rows -> A[:, one column block]


def kernel(x: np.ndarray, fit_rows: np.ndarray, blocks: Iterable[HiddenBlock]) -> np.ndarray:
    """``K = A(x)·A(x[fit_rows])ᵀ`` summed over column blocks, shape [len(x), len(fit_rows)], float64.

    Float64 products, not just a float64 sum: with more tokens than columns K is singular, and a
    float32 K (SwiGLU activations are far from centred: its top eigenvalue is ~N times its mean
    diagonal) leaks rounding into that null space, where a small λ amplifies it without bound.
    """
    total = np.zeros((len(x), len(fit_rows)), np.float64)
    for block in blocks:
        hidden = block(x).astype(np.float64)
        total += hidden @ hidden[fit_rows].T
    return total


def refit_update(k_eval_fit: np.ndarray, base: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The refit group's update on held-out rows: ``A_E·W₀ (+ b) + (A_E A_Fᵀ)·α``."""
    return base + (k_eval_fit @ alpha).astype(base.dtype)


def refit_down(down_rows: Callable[[int, int], np.ndarray], x_fit: np.ndarray, alpha: np.ndarray,
               blocks: Iterable[tuple[slice, HiddenBlock]]) -> np.ndarray:
    """``W₀ + A_Fᵀα``, one column block (a slice of W's rows, read by ``down_rows(start, stop)``)
    at a time; float32. The blocks cover every row of W."""
    parts = []
    for rows, block in blocks:
        delta = block(x_fit).astype(np.float64).T @ alpha
        parts.append((down_rows(rows.start, rows.stop).astype(np.float64) + delta).astype(np.float32))
    return np.concatenate(parts)


def channel_scales(base: np.ndarray, target: np.ndarray, lam: float) -> np.ndarray:
    """Per-output-channel ``s`` (shape [d]) for ``W₀·diag(s)``; ``base`` is ``A·W₀`` without bias."""
    if math.isinf(lam):
        return np.ones(base.shape[-1], np.float64)
    base64 = base.astype(np.float64)
    energy = np.einsum("nc,nc->c", base64, base64)
    shrink = lam * energy.mean()
    if not shrink > 0:
        raise RepairError(f"lambda must be positive and the activations non-zero (lambda {lam})")
    return (np.einsum("nc,nc->c", base64, target.astype(np.float64)) + shrink) / (energy + shrink)
