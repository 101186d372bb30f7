"""What the CLI shows while it works: log lines on stderr and progress bars."""

from __future__ import annotations

import logging
import sys
import time


class _StderrHandler(logging.Handler):
    """Plain lines on whatever ``sys.stderr`` is when a record is emitted (pytest swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # a closed stream must not turn a log line into an error
            self.handleError(record)


def configure_logging() -> None:
    """Library modules log to ``ffnfusion.*``; the CLI prints those lines (INFO and up) as they are."""
    logger = logging.getLogger("ffnfusion")
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def log(message: str) -> None:
    """A line on stderr from the CLI layer itself (demo steps, benchmark headers)."""
    logging.getLogger("ffnfusion.cli").info(message)


class ProgressBar:
    """Progress on stderr: a bar redrawn in place on a terminal, a line per quarter in a log.

    Called as ``progress(done, total, tokens)`` by the analysis (blocks) and verification (models)."""

    def __init__(self, label: str, what: str = "blocks", note=lambda value: f"{value} tokens"):
        self.label = label
        self.what = what
        self.note = note  # the third argument as shown
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.reported_quarter = 0

    def __call__(self, done: int, total: int, tokens: int) -> None:
        elapsed = time.perf_counter() - self.start
        text = f"{self.label}: {done}/{total} {self.what}, {self.note(tokens)}, {elapsed:.0f} s"
        if self.tty:
            filled = 24 * done // total
            print(f"\r{self.label}: [{'#' * filled}{'.' * (24 - filled)}] {text.split(': ', 1)[1]}",
                  end="\n" if done == total else "", file=sys.stderr, flush=True)
        elif 4 * done // total > self.reported_quarter:
            self.reported_quarter = 4 * done // total
            print(text, file=sys.stderr, flush=True)
