"""Real English text available offline, and token windows cut from it."""

from __future__ import annotations

import numpy as np


def python_docs_text() -> str:
    """Python's documentation topics (``pydoc_data.topics``): ships with every CPython."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def token_windows(tokenizer, text: str, window: int, count: int) -> np.ndarray:
    """``count`` consecutive non-overlapping windows of ``window`` tokens, shape [count, window]."""
    ids = tokenizer(text, return_tensors="np")["input_ids"][0]
    needed = window * count
    if len(ids) < needed:
        raise ValueError(f"text has {len(ids)} tokens, need {needed}")
    return ids[:needed].reshape(count, window).astype(np.int64)


def perplexity(logits: np.ndarray, input_ids: np.ndarray) -> float:
    """exp(mean next-token cross-entropy) for logits [b, s, vocab] predicting input_ids[:, 1:]."""
    logits = logits[:, :-1].astype(np.float64)
    targets = input_ids[:, 1:]
    log_norm = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return float(np.exp(np.mean(log_norm - picked)))
