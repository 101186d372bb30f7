"""Tensors written chunk by chunk: ``ir.save`` calls ``tofile`` and each chunk is computed, written
and dropped, so writing a model larger than RAM stays within a few hundred MB."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator

import numpy as np
import onnx_ir as ir

CHUNK_BYTES = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class FileRange:
    """Bytes to copy verbatim from another file (copied in the kernel when possible)."""

    path: str
    offset: int
    length: int

    def read(self) -> bytes:
        with open(self.path, "rb") as source:
            source.seek(self.offset)
            return source.read(self.length)


class ChunkedTensor(ir.LazyTensor):
    """A lazy tensor whose bytes are produced by ``chunks()`` in row order (C layout): arrays
    (cast to the tensor's dtype) or :class:`FileRange` pieces of existing data files."""

    __slots__ = ("_chunks",)

    def __init__(self, chunks: Callable[[], Iterator[np.ndarray | FileRange]], dtype: ir.DataType,
                 shape: tuple[int, ...], name: str):
        super().__init__(self._materialise, dtype=dtype, shape=ir.Shape(shape), name=name)
        self._chunks = chunks

    def _materialise(self) -> ir.TensorProtocol:
        np_dtype = self.dtype.numpy()
        parts = [np.frombuffer(c.read(), np_dtype) if isinstance(c, FileRange) else c.astype(np_dtype, copy=False).ravel()
                 for c in self._chunks()]
        return ir.tensor(np.concatenate(parts).reshape(self.shape.numpy()))

    def tofile(self, file) -> None:
        np_dtype = self.dtype.numpy()
        for chunk in self._chunks():
            if isinstance(chunk, FileRange):
                _copy_range(chunk, file)
            else:
                # as bytes: buffer views of ml_dtypes (bfloat16) arrays are not supported
                file.write(np.ascontiguousarray(chunk, dtype=np_dtype).reshape(-1).view(np.uint8).data)


def _copy_range(piece: FileRange, file) -> None:
    """Kernel-side copy when both ends are regular files, else read and write."""
    try:
        destination = file.fileno()
    except (AttributeError, OSError):
        file.write(piece.read())
        return
    file.flush()
    position = file.tell()  # the raw descriptor is here too once the buffer is flushed
    with open(piece.path, "rb") as source:
        offset, left = piece.offset, piece.length
        while left > 0:
            try:
                done = os.copy_file_range(source.fileno(), destination, left, offset)
            except OSError:
                done = 0
            if done == 0:  # unsupported here, or end of file: finish with plain reads
                source.seek(offset)
                file.write(source.read(left))
                return
            offset, left = offset + done, left - done
        file.seek(position + piece.length)  # tell the buffered writer where the descriptor went


def rows_per_chunk(row_bytes: int) -> int:
    return max(1, CHUNK_BYTES // max(row_bytes, 1))
