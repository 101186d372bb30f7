"""Calibration and evaluation tokens: real English text available offline, cut into windows."""

from __future__ import annotations

import dataclasses
import pathlib
import sysconfig

import numpy as np

from ffnfusion.core.errors import FFNFusionError, InvalidArgumentError

DEFAULT_TOKENS = 16384
DEFAULT_WINDOW = 512
DEFAULT_REPAIR_TOKENS = 8192  # repair: fitting tokens, split evenly over the sources
DEFAULT_SELECT_TOKENS = 1024  # repair: held-out tokens per source for the selection criterion


def python_docs_text() -> str:
    """Python's documentation topics (``pydoc_data.topics``): ships with every CPython."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def license_text() -> str:
    """Legal English, a different domain from the docs: CPython's LICENSE plus the OS's licenses."""
    parts = []
    python_license = pathlib.Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if python_license.is_file():
        parts.append(python_license.read_text(errors="replace"))
    common = pathlib.Path("/usr/share/common-licenses")
    if common.is_dir():
        parts += [p.read_text(errors="replace") for p in sorted(common.iterdir()) if p.is_file()]
    if not parts:
        raise FFNFusionError("no license texts found on this system; pass --text FILE")
    return "\n\n".join(parts)


def release_notes_text() -> str:
    """IDLE's release notes (``idlelib/NEWS.txt``, shipped with CPython): terse change-log English,
    a kind of text neither the docs nor the licenses are. Used to evaluate on unlike text."""
    path = pathlib.Path(sysconfig.get_paths()["stdlib"]) / "idlelib" / "NEWS.txt"
    if not path.is_file():
        raise FFNFusionError(f"{path} is missing (Python installed without IDLE); pass --text FILE")
    return path.read_text(errors="replace")


def load_tokenizer(model_dir: str | pathlib.Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as err:
        raise FFNFusionError(
            f"no tokenizer in {model_dir} ({str(err).splitlines()[0]}); export with ffnfusion, copy the "
            "tokenizer files beside the model, or pass token ids with --calib-ids FILE.npy"
        ) from None


def read_texts(paths) -> str:
    texts = []
    for path in paths:
        try:
            texts.append(pathlib.Path(path).read_text(errors="replace"))
        except OSError as err:
            raise InvalidArgumentError(f"cannot read text {path}: {err.strerror}") from None
    return "\n\n".join(texts)


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


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def next_token_nll(logits: np.ndarray, input_ids: np.ndarray) -> np.ndarray:
    """Per-token negative log-likelihood of input_ids[:, 1:] under logits[:, :-1]."""
    logp = log_softmax(logits[:, :-1])
    return -np.take_along_axis(logp, input_ids[:, 1:, None], -1)[..., 0]


def perplexity(logits: np.ndarray, input_ids: np.ndarray) -> float:
    """exp(mean next-token cross-entropy) for logits [b, s, vocab] predicting input_ids[:, 1:]."""
    return float(np.exp(np.mean(next_token_nll(logits, input_ids))))


# The repair's default calibration: two kinds of English that ship with Python and the OS.
DEFAULT_SOURCES = {"python-docs": python_docs_text, "licenses": license_text}


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
                   select_tokens=DEFAULT_SELECT_TOKENS) -> list[CalibrationSource]:
    """One source per text file or ids file (default: :data:`DEFAULT_SOURCES`), ``tokens`` fitting
    tokens split evenly over them, ``select_tokens`` held out from each."""
    if ids_files:
        named = [(pathlib.Path(path).stem, load_token_ids(path).reshape(-1)) for path in ids_files]
    else:
        tokenizer = load_tokenizer(model_dir)
        pairs = [(pathlib.Path(p).name, lambda p=p: read_texts([p])) for p in texts] or list(DEFAULT_SOURCES.items())
        named = [(name, tokenizer(text(), return_tensors="np")["input_ids"][0]) for name, text in pairs]
    fit_windows = max(1, tokens // len(named) // window)
    select_windows = max(1, select_tokens // window)
    return [CalibrationSource.split(name, windows_from_ids(ids, len(ids), window), fit_windows, select_windows)
            for name, ids in named]
