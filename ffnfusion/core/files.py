"""Atomic writes: everything ffnfusion writes appears whole under its final name, or not at all.

* :func:`atomic_path` for one file: a temporary name beside it, then ``os.replace``;
* :func:`staged_model` for a model and its external-data file: both written in a staging folder in
  the target directory, then renamed into place (data first, so a graph never points at a missing
  data file).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
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


@contextlib.contextmanager
def staged_model(path: pathlib.Path, *, external: bool) -> Iterator[pathlib.Path]:
    """Yields ``STAGING/<path.name>`` to write a model to (with its data file ``<path.name>.data``
    beside it when ``external``). On success the data file, then the graph, replace their targets;
    without external data a stale ``<path.name>.data`` from an earlier run is removed."""
    data_path = path.with_name(path.name + ".data")
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".ffnfusion-", dir=path.parent))
    try:
        staged = staging / path.name
        yield staged
        try:
            if external:
                os.replace(staged.with_name(data_path.name), data_path)
            else:
                data_path.unlink(missing_ok=True)
            os.replace(staged, path)
        except BaseException:
            data_path.unlink(missing_ok=True)  # interrupted between the renames: no orphan data
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields an empty staging folder beside ``path``; on success it replaces ``path`` whole (an
    earlier folder there is removed first), on failure it is removed and ``path`` is untouched."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield staging
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
