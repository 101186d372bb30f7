"""Compare a rewritten model with its reference on the same tokens: ``compare_models``.

Reported per token and averaged over all tokens of all windows: perplexity of both models,
top-1 agreement of their next-token predictions, mean ``KL(ref ‖ new)`` of the next-token
distributions, and the cosine between their final hidden states (the residual stream before the
final norm).

Each model runs block by block (:class:`~ffnfusion.runtime.block_runner.BlockRunner`) to its final
stream; the heads then run on slices of tokens, so neither a whole model nor a whole
``[tokens, vocab]`` logits array need be in memory at once.
"""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np

from ffnfusion.runtime.block_runner import BlockRunner, choose_streamed, forward_equivalents
from ffnfusion.runtime.device import Device, resolve_device
from ffnfusion.runtime.numerics import kl_sum, log_softmax, target_nll

logger = logging.getLogger(__name__)

HEAD_BUDGET_BYTES = 64 * 2**20  # float64 log-probabilities held per slice of tokens


def compare_models(reference: str, candidate: str, windows: np.ndarray, threads: int | None = None,
                   progress=None, stream: bool | None = None, device: str | Device = "auto") -> dict:
    """Compare one candidate with the reference (see :func:`compare_many`)."""
    return compare_many(reference, [candidate], windows, threads, progress, stream, device)[0]


def compare_many(reference: str, candidates: list[str], windows: np.ndarray, threads: int | None = None,
                 progress=None, stream: bool | None = None, device: str | Device = "auto") -> list[dict]:
    """Compare several candidates with one reference. ``stream``: block by block from disk (None:
    when the reference would not fit in memory). ``progress(done, total, tokens)``, if given, is
    called after each model's pass."""
    clock = time.perf_counter()
    streamed = choose_streamed(reference, stream)
    device = resolve_device(device)
    runners = [BlockRunner(path, streamed=streamed, threads=threads, device=device)
               for path in [reference, *candidates]]
    finals = []
    for done, runner in enumerate(runners, 1):
        final = runner.final_stream(windows)
        finals.append(final.reshape(-1, final.shape[-1]))
        if progress is not None:
            progress(done, len(runners), windows.size)
    ids = windows.reshape(-1)
    window = windows.shape[1]
    # Row r predicts ids[r + 1] unless r is the last token of its window.
    targets = np.where((np.arange(ids.size) + 1) % window != 0, np.roll(ids, -1), -1)
    stats = [dict(nll=0.0, agree=0, kl=0.0) for _ in candidates]
    ref_nll = 0.0
    vocab = runners[0].vocab
    start = 0
    with contextlib.ExitStack() as stack:  # every head open once, over all slices of tokens
        heads = [stack.enter_context(runner.head()) for runner in runners]
        while start < ids.size:
            step = window if vocab is None else max(1, HEAD_BUDGET_BYTES // (8 * vocab))
            rows = slice(start, min(ids.size, start + step))
            logp_ref = log_softmax(heads[0](finals[0][rows]))
            vocab = logp_ref.shape[-1]
            ref_nll += target_nll(logp_ref, targets[rows])
            for head, final, stat in zip(heads[1:], finals[1:], stats):
                logp = log_softmax(head(final[rows]))
                stat["nll"] += target_nll(logp, targets[rows])
                stat["kl"] += kl_sum(logp_ref, logp)
                stat["agree"] += int((logp_ref.argmax(-1) == logp.argmax(-1)).sum())
            start = rows.stop
    tokens = int(ids.size)
    predicted = int((targets >= 0).sum())
    ref_final = finals[0].astype(np.float64)
    # The whole comparison's work: every model's pass, in full forwards of the reference.
    cost = {"full_forward_equivalents": round(forward_equivalents(runners, runners[0], tokens), 2),
            "seconds": round(time.perf_counter() - clock, 2)}
    logger.info(f"verify: {len(runners)} models on {tokens} tokens: {cost['full_forward_equivalents']} full-forward "
                f"equivalents, {cost['seconds']} s")
    results = []
    for path, final, stat in zip(candidates, finals[1:], stats):
        final = final.astype(np.float64)
        cosine = (ref_final * final).sum(-1) / (np.linalg.norm(ref_final, axis=-1) * np.linalg.norm(final, axis=-1) + 1e-12)
        results.append({
            "ref": {"path": str(reference), "ppl": float(np.exp(ref_nll / predicted))},
            "new": {"path": str(path), "ppl": float(np.exp(stat["nll"] / predicted))},
            "top1_agreement": stat["agree"] / tokens,
            "kl": stat["kl"] / tokens,
            "hidden_cosine": float(cosine.sum()) / tokens,
            "tokens": tokens,
            "cost": cost,
        })
    return results
