"""Next-token numerics, checked once against the definitions written out in float64."""

from __future__ import annotations

import numpy as np
import pytest

from ffnfusion.runtime import numerics


def _logits(seed: int, rows: int = 12, vocab: int = 300, scale: float = 4.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal((rows, vocab))).astype(np.float32)


def _definition_kl(p_logits, q_logits) -> float:
    p = np.exp(p_logits.astype(np.float64))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(q_logits.astype(np.float64))
    q /= q.sum(-1, keepdims=True)
    return float((p * np.log(p / q)).sum())


def test_log_softmax_and_logsumexp():
    z = _logits(1) + 80  # large logits: no overflow
    logp = numerics.log_softmax(z)
    assert logp.dtype == np.float64
    np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(numerics.logsumexp(z), z.astype(np.float64).max(-1) + np.log(
        np.exp(z.astype(np.float64) - z.astype(np.float64).max(-1, keepdims=True)).sum(-1)), rtol=1e-6)


def test_both_kl_forms_equal_the_definition_and_vanish_on_the_same_model():
    p, q = _logits(2), _logits(3)
    exact = _definition_kl(p, q)
    assert numerics.kl_sum(numerics.log_softmax(p), numerics.log_softmax(q)) == pytest.approx(exact, rel=1e-10)
    assert numerics.CachedReference(p).kl(q) * len(p) == pytest.approx(exact, rel=1e-5)
    assert numerics.kl_sum(numerics.log_softmax(p), numerics.log_softmax(p)) == pytest.approx(0, abs=1e-12)
    assert abs(numerics.CachedReference(p).kl(p)) < 1e-5
    assert numerics.kl_sum(numerics.log_softmax(p), numerics.log_softmax(q)) > 0  # and not symmetric
    assert numerics.kl_sum(numerics.log_softmax(q), numerics.log_softmax(p)) != pytest.approx(exact, rel=1e-3)


def test_nll_skips_untargeted_rows_and_perplexity_is_its_exponent():
    z = _logits(4, rows=6, vocab=10)
    logp = numerics.log_softmax(z)
    targets = np.array([3, -1, 0, 9, -1, 2])
    assert numerics.target_nll(logp, targets) == pytest.approx(-(logp[0, 3] + logp[2, 0] + logp[3, 9] + logp[5, 2]))
    windows = np.array([[1, 3, 0, 9], [2, 2, 5, 1]])
    final = np.random.default_rng(5).standard_normal((2, 4, 8)).astype(np.float32)
    head_weight = np.random.default_rng(6).standard_normal((8, 10)).astype(np.float32)

    def head(rows):
        return rows @ head_weight

    logp_all = numerics.log_softmax(head(final.reshape(-1, 8))).reshape(2, 4, 10)
    nll = -np.mean([logp_all[w, t, windows[w, t + 1]] for w in range(2) for t in range(3)])
    assert numerics.windowed_perplexity(final, windows, head) == pytest.approx(float(np.exp(nll)), rel=1e-6)
