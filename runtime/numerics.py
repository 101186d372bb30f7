"""Next-token numerics shared by every stage that runs models (verify, repair, the frontier's
evaluator): log-probabilities, ``KL(reference ‖ candidate)``, negative log-likelihood, perplexity.

Two forms of the same KL, one per need:

* :func:`kl_sum` from two float64 log-probability arrays: exact to rounding (a model and itself give
  0 to ~1e-15), for verify and the repair's held-out checks;
* :class:`CachedReference` for the frontier's inner loop, where one reference is compared with
  hundreds of candidates: it keeps ``p`` and ``Σ p log p`` once and needs from each candidate only
  its logits and their log-sum-exp, ``KL = Σ p log p − Σ p·z + Σ lse(z)`` (each row of ``p`` sums to
  1): no float64 ``[rows, vocab]`` array per candidate, agreement with :func:`kl_sum` ~1e-6.
"""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Float64 log-probabilities over the last axis."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def logsumexp(logits: np.ndarray) -> np.ndarray:
    """``log Σ_v exp(z_v)`` per row of ``[rows, vocab]`` logits, float32, with one float32 copy of
    the logits (a 128k vocabulary makes float64 copies the memory peak)."""
    top = logits.max(-1)
    shifted = np.subtract(logits, top[:, None], dtype=np.float32)
    np.exp(shifted, out=shifted)
    return top + np.log(shifted.sum(-1, dtype=np.float64)).astype(np.float32)


def kl_sum(reference_logp: np.ndarray, logp: np.ndarray) -> float:
    """``Σ_rows KL(reference ‖ candidate)`` from float64 log-probabilities ``[rows, vocab]``."""
    return float((np.exp(reference_logp) * (reference_logp - logp)).sum())


def target_nll(logp: np.ndarray, targets: np.ndarray) -> float:
    """``Σ −log p(target)`` over the rows whose target is not negative (-1: nothing to predict)."""
    rows = np.flatnonzero(targets >= 0)
    return float(-logp[rows, targets[rows]].sum())


class CachedReference:
    """A reference's next-token distributions on fixed rows, for many ``kl`` calls (see the module)."""

    def __init__(self, logits: np.ndarray):
        logp = logits - logsumexp(logits)[:, None]
        self.p = np.exp(logp)
        self.neg_entropy = float(np.sum(self.p * logp, dtype=np.float64))
        self.rows = len(logits)

    def kl(self, logits: np.ndarray) -> float:
        """Mean ``KL(reference ‖ candidate)`` over the rows, from the candidate's logits."""
        cross = float(np.sum(self.p * logits, dtype=np.float64)) - float(np.sum(logsumexp(logits), dtype=np.float64))
        return (self.neg_entropy - cross) / self.rows


def windowed_perplexity(final: np.ndarray, windows: np.ndarray, head) -> float:
    """exp(mean NLL of ``windows[:, 1:]``) from final streams ``[n, window, hidden]`` and a head
    ``head(rows) -> logits``, one window of logits at a time (a 49k-128k vocabulary)."""
    nll = []
    for window, rows in zip(windows, final):
        logits = head(rows[:-1]).astype(np.float32, copy=False)
        nll.append(logsumexp(logits) - logits[np.arange(len(logits)), window[1:]])
    return float(np.exp(np.mean(np.concatenate(nll), dtype=np.float64)))
