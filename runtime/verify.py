"""Compare a rewritten model with its reference on the same tokens: ``compare_models``.

Reported per token and averaged over all tokens of all windows: perplexity of both models,
top-1 agreement of their next-token predictions, mean ``KL(ref ‖ new)`` of the next-token
distributions, and the cosine between their final hidden states (the residual stream before the
final norm).
"""

from __future__ import annotations

import numpy as np

from ffnfusion.runtime.calibration import log_softmax, next_token_nll
from ffnfusion.runtime.stream import StreamRunner


def compare_models(reference: str, candidate: str, windows: np.ndarray, threads: int | None = None,
                   progress=None) -> dict:
    """Compare one candidate with the reference (see :func:`compare_many`)."""
    return compare_many(reference, [candidate], windows, threads, progress)[0]


def compare_many(reference: str, candidates: list[str], windows: np.ndarray, threads: int | None = None,
                 progress=None) -> list[dict]:
    """Compare several candidates with one reference; the reference runs once per window.
    ``progress(done_windows, total_windows, tokens)``, if given, is called after each window."""
    ref_runner = StreamRunner(reference, threads)
    runners = [StreamRunner(path, threads) for path in candidates]
    stats = [dict(nll=0.0, agree=0, kl=0.0, cosine=0.0) for _ in candidates]
    ref_nll = 0.0
    predicted = tokens = 0
    for w, input_ids in enumerate(windows):
        ids = input_ids[None]
        ref = ref_runner.capture(ids)
        ref_nll += float(next_token_nll(ref["logits"], ids).sum())
        logp_ref = log_softmax(ref["logits"])
        ref_final = ref[ref_runner.units[-1].output].astype(np.float64)
        for runner, stat in zip(runners, stats):
            out = runner.capture(ids)
            stat["nll"] += float(next_token_nll(out["logits"], ids).sum())
            logp = log_softmax(out["logits"])
            stat["kl"] += float((np.exp(logp_ref) * (logp_ref - logp)).sum())
            stat["agree"] += int((logp_ref.argmax(-1) == logp.argmax(-1)).sum())
            final = out[runner.units[-1].output].astype(np.float64)
            stat["cosine"] += float(((ref_final * final).sum(-1) / (
                np.linalg.norm(ref_final, axis=-1) * np.linalg.norm(final, axis=-1) + 1e-12)).sum())
        predicted += ids.shape[1] - 1
        tokens += ids.size
        if progress is not None:
            progress(w + 1, len(windows), tokens)
    ref_ppl = float(np.exp(ref_nll / predicted))
    return [{
        "ref": {"path": str(reference), "ppl": ref_ppl},
        "new": {"path": str(path), "ppl": float(np.exp(stat["nll"] / predicted))},
        "top1_agreement": stat["agree"] / tokens,
        "kl": stat["kl"] / tokens,
        "hidden_cosine": stat["cosine"] / tokens,
        "tokens": tokens,
    } for path, stat in zip(candidates, stats)]
