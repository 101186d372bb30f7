"""The two ridge forms give the same solution under the one λ policy; the λ grids are its slices."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ffnfusion.core.errors import RepairError
from ffnfusion.runtime import ridge
from ffnfusion.runtime.repair import down_refit


@pytest.mark.parametrize(("tokens", "features"), [(30, 50), (80, 12)])  # fewer tokens than features, and more
def test_kernel_form_equals_the_primal_form(tokens, features):
    rng = np.random.default_rng(4)
    a, t, w0 = (rng.standard_normal((tokens, features)), rng.standard_normal((tokens, 7)),
                rng.standard_normal((features, 7)))
    lam = 0.1
    primal = w0 + ridge.solve_primal(a.T @ a, a.T @ (t - a @ w0), lam)
    # Written out: (AᵀA + λ'I)W = AᵀT + λ'W₀ with λ' = λ·mean(diag(AᵀA)).
    shift = lam * np.trace(a.T @ a) / features
    np.testing.assert_allclose(primal, np.linalg.solve(a.T @ a + shift * np.eye(features), a.T @ t + shift * w0),
                               rtol=1e-9, atol=1e-10)
    k = down_refit.kernel(a, np.arange(tokens), [lambda rows: rows])
    alpha = ridge.solve_kernel(k, t - a @ w0, lam, features)
    kernel_form = down_refit.refit_down(lambda i, j: w0[i:j], a, alpha, [(slice(0, features), lambda rows: rows)])
    np.testing.assert_allclose(kernel_form, primal, rtol=1e-5, atol=1e-6)


def test_the_shifted_system_is_built_in_place_with_the_same_bits():
    rng = np.random.default_rng(5)
    a, residual = rng.standard_normal((40, 9)), rng.standard_normal((40, 3))
    kernel = a @ a.T
    shift = 0.1 * np.trace(kernel) / 9
    written_out = np.linalg.solve(kernel + shift * np.eye(40), residual)
    kept = kernel.copy()
    assert np.array_equal(ridge.solve_kernel(kernel, residual, 0.1, 9), written_out)
    assert np.array_equal(kernel, kept)  # not scratch: the caller's kernel serves the next λ
    scratch = kernel.copy()
    assert np.array_equal(ridge.solve_kernel(scratch, residual, 0.1, 9, scratch=True), written_out)
    assert not np.array_equal(scratch, kept)  # shifted where it lay: no second N×N array
    gram = (a.T @ a).astype(np.float32)
    primal_shift = 0.1 * np.trace(gram.astype(np.float64)) / 9
    assert np.array_equal(ridge.solve_primal(gram, a.T @ residual, 0.1),
                          np.linalg.solve(gram.astype(np.float64) + primal_shift * np.eye(9), a.T @ residual))
    assert gram.dtype == np.float32


def test_infinite_lambda_is_no_update_and_zero_features_are_refused():
    assert not ridge.solve_kernel(np.eye(3), np.ones((3, 2)), math.inf, 4).any()
    with pytest.raises(RepairError, match="features non-zero"):
        ridge.solve_primal(np.zeros((3, 3)), np.ones((3, 2)), 0.1)
    with pytest.raises(RepairError, match="lambda must be positive"):
        ridge.solve_kernel(np.eye(3), np.ones((3, 2)), 0.0, 4)


def test_one_grid_with_the_values_each_stage_always_used():
    assert ridge.REPAIR_LAMBDAS == (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
    assert ridge.FRONTIER_LAMBDAS == (1e-2, 1e-1, 1.0, 10.0)
    assert set(ridge.REPAIR_LAMBDAS) | set(ridge.FRONTIER_LAMBDAS) <= set(ridge.LAMBDAS)
    assert list(ridge.LAMBDAS) == sorted(ridge.LAMBDAS)
