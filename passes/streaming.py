"""Tensors written chunk by chunk, so that fusing a model larger than RAM stays within a few
hundred MB: ``ir.save`` calls ``tofile`` and each chunk is computed, written and dropped.

Rows of ``[in, out]`` weights stored as external data are read with plain file reads (not a
memory map), so the pages read do not stay resident in the process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import onnx_ir as ir

from ffnfusion.passes.patterns import Weight

CHUNK_BYTES = 64 * 2**20


class ChunkedTensor(ir.LazyTensor):
    """A lazy tensor whose bytes are produced by ``chunks()`` in row order (C layout)."""

    __slots__ = ("_chunks",)

    def __init__(self, chunks: Callable[[], Iterator[np.ndarray]], dtype: ir.DataType, shape: tuple[int, ...],
                 name: str):
        np_dtype = dtype.numpy()
        super().__init__(lambda: ir.tensor(np.concatenate([c.astype(np_dtype, copy=False) for c in chunks()], 0)),
                         dtype=dtype, shape=ir.Shape(shape), name=name)
        self._chunks = chunks

    def tofile(self, file) -> None:
        np_dtype = self.dtype.numpy()
        for chunk in self._chunks():
            file.write(np.ascontiguousarray(chunk, dtype=np_dtype).tobytes())


def rows_per_chunk(row_bytes: int) -> int:
    return max(1, CHUNK_BYTES // max(row_bytes, 1))


def read_rows(weight: Weight, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of the weight as ``[in, out]``, without mapping the whole file."""
    tensor = weight.value.const_value
    rows, cols = weight.shape_in_out
    if isinstance(tensor, ir.ExternalTensor) and not weight.transposed:
        np_dtype = tensor.dtype.numpy()
        offset = (tensor.offset or 0) + start * cols * np_dtype.itemsize
        data = np.fromfile(tensor.path, dtype=np_dtype, count=(stop - start) * cols, offset=offset)
        return data.reshape(stop - start, cols)
    return np.asarray(weight.numpy_in_out()[start:stop])


def folded_columns(weights: list[Weight], gains: list[np.ndarray], dtype: ir.DataType, name: str) -> ChunkedTensor:
    """``[diag(s_1)·W_1 | … | diag(s_k)·W_k]`` (gate/up of a fused group), folded in float32 and
    produced a block of input rows at a time."""
    rows = weights[0].shape_in_out[0]
    width = sum(w.shape_in_out[1] for w in weights)

    def chunks() -> Iterator[np.ndarray]:
        step = rows_per_chunk(width * 4)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            yield np.concatenate([gain[start:stop, None] * read_rows(weight, start, stop).astype(np.float32)
                                  for weight, gain in zip(weights, gains)], axis=1)

    return ChunkedTensor(chunks, dtype, (rows, width), name)


def stacked_rows(weights: list[Weight], dtype: ir.DataType, name: str) -> ChunkedTensor:
    """``[D_1; …; D_k]`` (down of a fused group): each member's rows in turn, no arithmetic."""
    cols = weights[0].shape_in_out[1]
    total = sum(w.shape_in_out[0] for w in weights)

    def chunks() -> Iterator[np.ndarray]:
        step = rows_per_chunk(cols * dtype.numpy().itemsize)
        for weight in weights:
            rows = weight.shape_in_out[0]
            for start in range(0, rows, step):
                yield read_rows(weight, start, min(rows, start + step))

    return ChunkedTensor(chunks, dtype, (total, cols), name)
