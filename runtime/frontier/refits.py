"""The frontier's refits as least squares: ``Δ`` for the down projection of the FFN before a cut,
so that the stream after the cut matches the original model's on the fitting tokens. The evaluator
(:mod:`.evaluator`) runs the model and hands these the FFN's activations ``A`` and the residual ``R``
to close; λ is chosen on held-out fitting rows, and no refit is returned where none helps there.

* :func:`down_refit` — the update is ``A·(W + Δ)``: one ridge solve (ReplaceMe, arXiv 2505.02819);
* :func:`post_norm_down_refit` — the update is RMS-normalised after ``W`` (Gemma 2/3's sandwich
  layers): the same ridge with the output RMS held, re-solved as it moves.
"""

from __future__ import annotations

import numpy as np

from ffnfusion.passes.norm_matchers import Norm
from ffnfusion.runtime import ridge


def down_refit(a: np.ndarray, residual: np.ndarray, val_rows: int):
    """``Δ = argmin ‖AΔ − R‖² + λ'‖Δ‖²`` with λ chosen on the last ``val_rows`` rows; None when no λ
    beats Δ = 0 there. Returns (Δ float32, λ, held-out relative residual). Solved in the primal form
    (``width × width``) or, with fewer fitting rows than features, the kernel form (``rows × rows``,
    the same Δ: an 8B FFN's 14,336 features made a 1.6 GB Gram matrix, ~12 GiB with its copies)."""
    if len(a) - val_rows < a.shape[1]:
        return _down_refit_kernel(a, residual, val_rows)
    val = slice(len(a) - val_rows, len(a))
    gram_val = (a[val].T @ a[val]).astype(np.float64)
    gram = (a.T @ a).astype(np.float64)
    cross_val = (a[val].T @ residual[val]).astype(np.float64)
    cross = (a.T @ residual).astype(np.float64)
    norm = float(np.linalg.norm(residual[val])) or 1.0
    best = None
    for lam in ridge.FRONTIER_LAMBDAS:
        delta = ridge.solve_primal(gram - gram_val, cross - cross_val, lam)
        error = float(np.linalg.norm(a[val] @ delta.astype(np.float32) - residual[val])) / norm
        if best is None or error < best[1]:
            best = (lam, error)
    if best is None or best[1] >= 1.0:
        return None
    return ridge.solve_primal(gram, cross, best[0]).astype(np.float32), best[0], best[1]


def _down_refit_kernel(a: np.ndarray, residual: np.ndarray, val_rows: int):
    """:func:`down_refit` through ``Δ = Aᵀα``, ``α = (AAᵀ + λ'I)⁻¹R`` (:func:`~ffnfusion.runtime.ridge.solve_kernel`)."""
    fit, val = slice(0, len(a) - val_rows), slice(len(a) - val_rows, len(a))
    features = a.shape[1]
    kernel_fit = (a[fit] @ a[fit].T).astype(np.float64)
    val_by_fit = (a[val] @ a[fit].T).astype(np.float64)  # predictions on the held-out rows: A_val·A_fitᵀ·α
    norm = float(np.linalg.norm(residual[val])) or 1.0
    best = None
    for lam in ridge.FRONTIER_LAMBDAS:
        alpha = ridge.solve_kernel(kernel_fit, residual[fit], lam, features)
        error = float(np.linalg.norm((val_by_fit @ alpha).astype(np.float32) - residual[val])) / norm
        if best is None or error < best[1]:
            best = (lam, error)
    if best is None or best[1] >= 1.0:
        return None
    alpha = ridge.solve_kernel((a @ a.T).astype(np.float64), residual, best[0], features, scratch=True)
    return (a.T @ alpha.astype(np.float32)).astype(np.float32), best[0], best[1]


POST_NORM_ROUNDS = 3  # fixed-point rounds of the post-norm refit (the output RMS settles in two)


def post_norm_down_refit(a: np.ndarray, down: np.ndarray, bias: np.ndarray, norm: Norm, residual: np.ndarray,
                     val_rows: int):
    """The refit of an FFN whose output is RMS-normalised (Gemma's sandwich layers):
    ``u = g ⊙ d / r(d)``, ``d = A·W + b``, ``r(d) = sqrt(mean(d²) + ε)`` per token. ``u`` is not
    linear in ``W``, but it is with ``r`` held: ``u ≈ g ⊙ (A/r)(W + Δ) + g ⊙ b/r``. So each round
    solves the ridge (:func:`down_refit`'s λ policy) on features ``A/r`` toward ``T/g − (A·W + b)/r``,
    ``T = u + R`` the update that would close the residual ``R``, and recomputes ``r`` from the new
    ``d``; the penalty stays on the whole ``Δ``. λ is chosen on the last ``val_rows`` rows by the true
    (normalised) error after one round; None when no λ beats Δ = 0 there. Channels whose gain is ~0
    cannot move ``u`` and keep a zero target."""
    stored = norm.gain.const_value if norm.gain is not None else None
    gain = np.ones(down.shape[1], np.float32) if stored is None else stored.numpy().astype(np.float32).reshape(-1)
    live = np.abs(gain) > 1e-6 * max(float(np.abs(gain).max()), 1e-30)
    safe_gain = np.where(live, gain, 1.0)

    def output(delta):
        return a @ (down if delta is None else down + delta) + bias

    def rms(d):
        return np.sqrt(np.mean(d * d, axis=-1, keepdims=True) + norm.epsilon)

    base = output(None)
    target = gain * (base / rms(base)) + residual  # T = u + R
    scaled_target = np.where(live, target / safe_gain, base / rms(base))  # in units of d / r

    def system(rows: slice, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(FᵀF, FᵀY)`` for features ``F = A/r`` and targets ``Y = T/g − (A·W + b)/r`` on ``rows``."""
        features = a[rows] / r[rows]
        wanted = scaled_target[rows] - (a[rows] @ down + bias) / r[rows]
        return (features.T @ features).astype(np.float64), (features.T @ wanted).astype(np.float64)

    val = slice(len(a) - val_rows, len(a))
    norm_val = float(np.linalg.norm(residual[val])) or 1.0
    r = rms(base)
    gram, cross = system(slice(0, len(a) - val_rows), r)
    best = None
    for lam in ridge.FRONTIER_LAMBDAS:
        d_val = a[val] @ (down + ridge.solve_primal(gram, cross, lam).astype(np.float32)) + bias
        error = float(np.linalg.norm(gain * d_val / rms(d_val) - target[val])) / norm_val
        if best is None or error < best[1]:
            best = (lam, error)
    if best is None or best[1] >= 1.0:
        return None
    delta = np.zeros_like(down)
    for _ in range(POST_NORM_ROUNDS):
        delta = ridge.solve_primal(*system(slice(None), r), best[0]).astype(np.float32)
        r = rms(output(delta))
    return delta, best[0], best[1]
