"""Write files atomically: a temporary name in the target directory, then ``os.replace``."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path beside ``path``; renamed onto it only if the block succeeds."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomically(path: str | os.PathLike, data) -> None:
    write_text_atomically(path, json.dumps(data, indent=2, default=str) + "\n")
