"""Calibration and evaluation tokens: real English text available offline, cut into windows."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from ffnfusion.core.errors import InvalidArgumentError, ModelFileError
from ffnfusion.runtime.corpora import CORPORA, NAMES, corpus_text, license_text, python_docs_text, release_notes_text

__all__ = ["license_text", "python_docs_text", "release_notes_text"]  # the texts that ship with Python

DEFAULT_TOKENS = 16384
DEFAULT_WINDOW = 512
DEFAULT_REPAIR_TOKENS = 8192  # repair: fitting tokens, split evenly over the sources
DEFAULT_SELECT_TOKENS = 1024  # repair: held-out tokens per source for the selection criterion


def load_tokenizer(model_dir: str | pathlib.Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as err:
        raise ModelFileError(
            f"no tokenizer in {model_dir} ({str(err).splitlines()[0]}); export with ffnfusion, copy the "
            "tokenizer files beside the model, or pass token ids with --calib-ids FILE.npy"
        ) from None


def read_text(spec: str, max_chars: int | None = None) -> str:
    """A text file, or a named source (:data:`~ffnfusion.runtime.corpora.NAMES`: ``brown``,
    ``wikipedia``, ``sotu``, ``moby-dick``, ``python-docs``, ...; a file of that name wins).
    ``max_chars``: at most that many characters of a fetched corpus, taken as 16 pieces spread over
    the whole text (a corpus changes genre, year or topic along the way; only this much is tokenised)."""
    path = pathlib.Path(spec)
    if str(spec) in NAMES and not path.exists():
        text = corpus_text(str(spec))
        return spread_excerpt(text, max_chars) if max_chars and str(spec) in CORPORA else text
    try:
        return path.read_text(errors="replace")
    except OSError as err:
        known = f" (or one of the named sources: {', '.join(NAMES)})" if not path.exists() else ""
        raise InvalidArgumentError(f"cannot read text {spec}: {err.strerror}{known}") from None


def spread_excerpt(text: str, max_chars: int, pieces: int = 16) -> str:
    """``pieces`` equal stretches of ``text`` at evenly spaced offsets, cut at line ends, ``max_chars`` in all."""
    if len(text) <= max_chars:
        return text
    size = max_chars // pieces
    parts = []
    for k in range(pieces):
        start = k * (len(text) - size) // max(1, pieces - 1)
        start = text.find("\n", start) + 1 if start else 0
        end = text.rfind("\n", start, start + size)
        parts.append(text[start:end if end > start else start + size])
    return "\n\n".join(parts)


def read_texts(paths) -> str:
    return "\n\n".join(read_text(path) for path in paths)


def windows_from_ids(ids: np.ndarray, tokens: int, window: int) -> np.ndarray:
    """Up to ``tokens`` tokens as non-overlapping full windows, shape [n, window] (no padding)."""
    ids = np.asarray(ids).reshape(-1)
    if window < 2 or tokens < window:
        raise InvalidArgumentError(f"need window >= 2 and tokens >= window (got window {window}, tokens {tokens})")
    count = min(tokens, len(ids)) // window
    if count == 0:
        raise InvalidArgumentError(f"only {len(ids)} tokens available, fewer than one window of {window}")
    return ids[: count * window].reshape(count, window).astype(np.int64)


def load_token_ids(path) -> np.ndarray:
    """Integer token ids from an ``.npy`` file (``--calib-ids``, ``--text-ids``)."""
    try:
        ids = np.load(path)
    except (OSError, ValueError) as err:
        raise InvalidArgumentError(f"cannot read token ids {path}: {err}") from None
    if not np.issubdtype(ids.dtype, np.integer):
        raise InvalidArgumentError(f"{path} holds {ids.dtype}, expected integer token ids")
    return ids


def calibration_windows(model_dir, *, texts=(), ids_file=None, tokens=DEFAULT_TOKENS,
                        window=DEFAULT_WINDOW, default=python_docs_text) -> np.ndarray:
    """Windows from ``--calib-ids`` (npy), ``--calib`` text files, or the default text."""
    if ids_file is not None:
        return windows_from_ids(load_token_ids(ids_file), tokens, window)
    text = read_texts(texts) if texts else default()
    ids = load_tokenizer(model_dir)(text, return_tensors="np")["input_ids"][0]
    return windows_from_ids(ids, tokens, window)


def token_windows(tokenizer, text: str, window: int, count: int) -> np.ndarray:
    """``count`` consecutive non-overlapping windows of ``window`` tokens, shape [count, window]."""
    ids = tokenizer(text, return_tensors="np")["input_ids"][0]
    if len(ids) < window * count:
        raise InvalidArgumentError(f"text has {len(ids)} tokens, need {window * count}")
    return windows_from_ids(ids, window * count, window)


# The repair's default calibration: two kinds of English that ship with Python and the OS.
DEFAULT_SOURCES = ("python-docs", "licenses")
CHARS_PER_TOKEN = 8  # generous: English is ~4-5 characters a token; only this much of a corpus is tokenised


@dataclasses.dataclass(frozen=True)
class CalibrationSource:
    """One kind of text: windows to fit on and held-out windows to judge on (token ids [n, window])."""

    name: str
    fit: np.ndarray
    select: np.ndarray

    @classmethod
    def split(cls, name: str, windows: np.ndarray, fit_windows: int, select_windows: int) -> CalibrationSource:
        """The last ``select_windows`` are held out; ``fit_windows`` are spread evenly over the rest
        (a long text such as the Python docs changes topic along the way)."""
        if fit_windows < 1 or len(windows) < fit_windows + select_windows:
            raise InvalidArgumentError(f"calibration source {name!r} has {len(windows)} windows of {windows.shape[1]} "
                             f"tokens; repair needs {fit_windows} to fit and {select_windows} held out")
        rest = len(windows) - select_windows
        chosen = np.unique(np.linspace(0, rest - 1, fit_windows).round().astype(int))
        return cls(name, windows[chosen], windows[rest:])


def repair_sources(model_dir, *, texts=(), ids_files=(), tokens=DEFAULT_REPAIR_TOKENS, window=DEFAULT_WINDOW,
                   select_tokens=DEFAULT_SELECT_TOKENS, default=DEFAULT_SOURCES) -> list[CalibrationSource]:
    """One source per text file, named source or ids file (default: ``default``), ``tokens`` fitting
    tokens split evenly over them, ``select_tokens`` held out from each."""
    if ids_files:
        named = [(pathlib.Path(path).stem, load_token_ids(path).reshape(-1)) for path in ids_files]
    else:
        tokenizer = load_tokenizer(model_dir)
        specs = list(texts) or list(default)
        budget = (tokens // len(specs) + select_tokens) * CHARS_PER_TOKEN * 2
        named = [(pathlib.Path(spec).name, tokenizer(read_text(spec, budget), return_tensors="np")["input_ids"][0])
                 for spec in specs]
    fit_windows = max(1, tokens // len(named) // window)
    select_windows = max(1, select_tokens // window)
    return [CalibrationSource.split(name, windows_from_ids(ids, len(ids), window), fit_windows, select_windows)
            for name, ids in named]
