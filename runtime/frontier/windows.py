"""The frontier's token windows: refits fit on some texts, candidates are scored on another, and
perplexity is measured on a third that chooses nothing."""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Sequence

import numpy as np

from ffnfusion.core.errors import InvalidArgumentError
from ffnfusion.runtime import calibration

logger = logging.getLogger(__name__)

DEFAULT_FIT_TOKENS = 4096
DEFAULT_SELECT_TOKENS = 512
DEFAULT_EVAL_TOKENS = 4096
# The refits fit on Python's docs, candidates are scored on license texts, perplexity is measured on
# IDLE's release notes. Measured against the broad mix (README: "Calibration data"): fitting on Brown,
# Wikipedia and the docs and selecting on State of the Union gave points that are better only on
# State of the Union and worse on every other text, Moby Dick included: the 512 selection tokens
# steer the search more than the fitting text does.
DEFAULT_CALIB = ("python-docs", "licenses")
DEFAULT_EVAL = "idle-news"


def fit_and_select_windows(model_dir: pathlib.Path, specs: Sequence[str] = DEFAULT_CALIB, *,
                           ids_files: Sequence[str] = (), tokens: int = DEFAULT_FIT_TOKENS,
                           select_tokens: int = DEFAULT_SELECT_TOKENS,
                           window: int = calibration.DEFAULT_WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """(fitting windows, selection windows): all sources but the last fit, in equal shares from each
    source's start (one source: its first windows, as always), the last scores. Sources are text
    names or files (``specs``), or token-id files (``ids_files``) instead."""
    if ids_files:
        named = [calibration.load_token_ids(p).reshape(-1) for p in ids_files]
    else:
        tokenizer = calibration.load_tokenizer(model_dir)
        budget = (tokens + select_tokens) * calibration.CHARS_PER_TOKEN * 2
        named = [tokenizer(calibration.read_text(spec, budget), return_tensors="np")["input_ids"][0] for spec in specs]
    if len(named) == 1:
        logger.warning("frontier: one calibration source: its last windows score candidates (a second, different "
                       "text is better: the selection should not be the kind of text the refits fit)")
        ids = named[0]
        cut = max(0, len(ids) - select_tokens)
        named = [ids[:cut], ids[cut:]]
    sources = named[:-1]
    total = max(len(sources), tokens // window)  # windows, shared out evenly (the first get the rest)
    counts = [total // len(sources) + (i < total % len(sources)) for i in range(len(sources))]
    fit = np.concatenate([calibration.windows_from_ids(ids, count * window, window)
                          for ids, count in zip(sources, counts)])
    select = calibration.windows_from_ids(named[-1], select_tokens, window)
    if len(fit) < 2:
        raise InvalidArgumentError(f"--tokens {tokens} gives {len(fit)} window(s); the refits need at least "
                                   f"2 (one held out to choose their strength): use --tokens >= {2 * window}")
    return fit, select


def evaluation_windows(model_dir: pathlib.Path, specs: Sequence[str] = (DEFAULT_EVAL,), *,
                       ids_file: str | None = None, tokens: int = DEFAULT_EVAL_TOKENS,
                       window: int = calibration.DEFAULT_WINDOW) -> np.ndarray:
    """Held-out windows for perplexity: ``tokens`` of the texts ``specs`` (or of ``ids_file``)."""
    if ids_file:
        return calibration.windows_from_ids(calibration.load_token_ids(ids_file), tokens, window)
    budget = tokens * calibration.CHARS_PER_TOKEN * 2
    text = "\n\n".join(calibration.read_text(spec, budget) for spec in specs)
    ids = calibration.load_tokenizer(model_dir)(text, return_tensors="np")["input_ids"][0]
    return calibration.windows_from_ids(ids, tokens, window)
