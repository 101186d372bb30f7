"""Compare a rewritten model with its reference on the same tokens: ``compare_models``.

Reported per token and averaged over all tokens of all windows: perplexity of both models,
top-1 agreement of their next-token predictions, mean ``KL(ref ‖ new)`` of the next-token
distributions, and the cosine between their final hidden states (the residual stream before the
final norm).
"""

from __future__ import annotations

import numpy as np

from ffnfusion.passes.dependency import ProgressBar
from ffnfusion.runtime.calibration import log_softmax, next_token_nll
from ffnfusion.runtime.stream import StreamRunner


def compare_models(reference: str, candidate: str, windows: np.ndarray, threads: int | None = None,
                   progress=None) -> dict:
    progress = progress or ProgressBar("verify")
    runners = {"ref": StreamRunner(reference, threads), "new": StreamRunner(candidate, threads)}
    nll = {"ref": 0.0, "new": 0.0}
    predicted = agree = 0
    tokens = 0
    kl = cosine = 0.0
    for w, input_ids in enumerate(windows):
        ids = input_ids[None]
        outputs = {name: runner.capture(ids) for name, runner in runners.items()}
        for name in runners:
            nll[name] += float(next_token_nll(outputs[name]["logits"], ids).sum())
        predicted += ids.shape[1] - 1
        logp_ref = log_softmax(outputs["ref"]["logits"])
        logp_new = log_softmax(outputs["new"]["logits"])
        kl += float((np.exp(logp_ref) * (logp_ref - logp_new)).sum())
        agree += int((logp_ref.argmax(-1) == logp_new.argmax(-1)).sum())
        final = [outputs[name][runner.units[-1].output].astype(np.float64) for name, runner in runners.items()]
        cosine += float(((final[0] * final[1]).sum(-1)
                         / (np.linalg.norm(final[0], axis=-1) * np.linalg.norm(final[1], axis=-1) + 1e-12)).sum())
        tokens += ids.size
        progress(w + 1, len(windows), tokens)
    return {
        "ref": {"path": str(reference), "ppl": float(np.exp(nll["ref"] / predicted))},
        "new": {"path": str(candidate), "ppl": float(np.exp(nll["new"] / predicted))},
        "top1_agreement": agree / tokens,
        "kl": kl / tokens,
        "hidden_cosine": cosine / tokens,
        "tokens": tokens,
    }
