"""Fused weights produced chunk by chunk (:class:`~ffnfusion.core.chunked_tensor.ChunkedTensor`), so
that fusing a model larger than RAM stays within a few hundred MB.

Rows of ``[in, out]`` weights stored as external data are read with plain file reads (not a
memory map), so the pages read do not stay resident in the process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx_ir as ir

from ffnfusion.core.chunked_tensor import ChunkedTensor, FileRange, rows_per_chunk
from ffnfusion.passes.op_matchers import Weight


def _row_range(weight: Weight, start: int, stop: int) -> FileRange | None:
    """Rows ``start:stop`` as a byte range of the weight's data file, if stored that way."""
    tensor = weight.value.const_value
    if not isinstance(tensor, ir.ExternalTensor) or weight.transposed:
        return None
    row_bytes = weight.shape_in_out[1] * tensor.dtype.numpy().itemsize
    return FileRange(str(tensor.path), (tensor.offset or 0) + start * row_bytes, (stop - start) * row_bytes)


def read_rows(weight: Weight, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of the weight as ``[in, out]``, without mapping the whole file."""
    tensor = weight.value.const_value
    rows, cols = weight.shape_in_out
    if isinstance(tensor, StackedRows) and not weight.transposed:
        return tensor.rows(start, stop)
    if isinstance(tensor, ir.ExternalTensor) and not weight.transposed:
        np_dtype = tensor.dtype.numpy()
        offset = (tensor.offset or 0) + start * cols * np_dtype.itemsize
        data = np.fromfile(tensor.path, dtype=np_dtype, count=(stop - start) * cols, offset=offset)
        return data.reshape(stop - start, cols)
    return np.asarray(weight.numpy_in_out()[start:stop])


def read_columns(weight: Weight, start: int, stop: int) -> np.ndarray:
    """Columns ``start:stop`` of the weight as ``[in, out]`` float32, reading only what they need:
    a fused group's folded columns from its members; from a file, all columns by plain reads of
    rows (a memory map would leave every page it touched resident), a slice of them through a
    memory map dropped right after the copy (only the slice's pages are touched: reading every row
    whole for each block of columns of a fused 8B group read its 1.9 GB again per block, 18× slower)."""
    tensor = weight.value.const_value
    rows, cols = weight.shape_in_out
    if isinstance(tensor, FoldedColumns) and not weight.transposed:
        return tensor.columns(start, stop)
    if isinstance(tensor, ir.ExternalTensor):
        np_dtype = tensor.dtype.numpy()
        if weight.transposed:  # stored [out, in]: the columns wanted are contiguous stored rows
            offset = (tensor.offset or 0) + start * rows * np_dtype.itemsize
            data = np.fromfile(tensor.path, dtype=np_dtype, count=(stop - start) * rows, offset=offset)
            return data.reshape(stop - start, rows).T.astype(np.float32)
        if stop - start < cols:
            mapped = np.memmap(tensor.path, dtype=np_dtype, mode="r", offset=tensor.offset or 0, shape=(rows, cols))
            try:
                return mapped[:, start:stop].astype(np.float32)
            finally:
                del mapped
        out = np.empty((rows, stop - start), np.float32)
        step = rows_per_chunk(cols * np_dtype.itemsize)
        for first in range(0, rows, step):
            last = min(rows, first + step)
            out[first:last] = read_rows(weight, first, last)[:, start:stop]
        return out
    return np.asarray(weight.numpy_in_out()[:, start:stop], dtype=np.float32)


class FoldedColumns(ChunkedTensor):
    """``[diag(s_1)·W_1 | … | diag(s_k)·W_k | 0]`` (gate/up of a fused group, ``pad`` zero columns),
    folded in float32 and produced a block of input rows at a time; :meth:`columns` reads a slice of
    columns from the members alone."""

    __slots__ = ("_members", "_gains", "_offsets", "_rows")

    def __init__(self, weights: list[Weight], gains: list[np.ndarray], dtype: ir.DataType, name: str,
                 pad: int = 0):
        rows = weights[0].shape_in_out[0]
        offsets = np.cumsum([0] + [w.shape_in_out[1] for w in weights])
        width = int(offsets[-1]) + pad
        np_dtype = dtype.numpy()

        def chunks() -> Iterator[np.ndarray]:
            step = rows_per_chunk(width * 4)
            # numpy releases the GIL in ufuncs: members' slices of a block are filled in parallel
            with ThreadPoolExecutor(max_workers=min(len(weights), os.cpu_count() or 1)) as pool:
                for start in range(0, rows, step):
                    stop = min(rows, start + step)
                    block = np.empty((stop - start, width), np_dtype)
                    block[:, offsets[-1]:] = 0

                    def fill(member: int, block=block, start=start, stop=stop) -> None:
                        source = read_rows(weights[member], start, stop)
                        # float32 product of the stored weight and its gain, cast once into the block
                        block[:, offsets[member]:offsets[member + 1]] = np.multiply(
                            source, gains[member][start:stop, None], dtype=np.float32)

                    list(pool.map(fill, range(len(weights))))
                    yield block

        super().__init__(chunks, dtype, (rows, width), name)
        self._members, self._gains, self._offsets, self._rows = weights, gains, offsets, rows

    def columns(self, start: int, stop: int) -> np.ndarray:
        """Columns ``start:stop`` as float32, rounded to the tensor's dtype as when saved."""
        out = np.zeros((self._rows, stop - start), np.float32)
        np_dtype = self.dtype.numpy()
        for weight, gain, lo, hi in zip(self._members, self._gains, self._offsets, self._offsets[1:]):
            first, last = max(start, int(lo)), min(stop, int(hi))
            if first < last:
                folded = read_columns(weight, first - lo, last - lo) * gain[:, None]
                out[:, first - start:last - start] = folded.astype(np_dtype).astype(np.float32)
        return out


class StackedRows(ChunkedTensor):
    """``[D_1; …; D_k; 0]`` (down of a fused group, ``pad`` zero rows): each member's rows in turn,
    no arithmetic; :meth:`rows` reads a slice of rows from the members alone."""

    __slots__ = ("_members", "_offsets", "_cols")

    def __init__(self, weights: list[Weight], dtype: ir.DataType, name: str, pad: int = 0):
        cols = weights[0].shape_in_out[1]
        offsets = np.cumsum([0] + [w.shape_in_out[0] for w in weights])

        def chunks() -> Iterator[np.ndarray | FileRange]:
            step = rows_per_chunk(cols * dtype.numpy().itemsize)
            for weight in weights:
                rows = weight.shape_in_out[0]
                whole = _row_range(weight, 0, rows)
                if whole is not None and weight.tensor.dtype == dtype:
                    yield whole  # stored [in, out] in the right dtype: copy the bytes as they are
                    continue
                for start in range(0, rows, step):
                    yield read_rows(weight, start, min(rows, start + step))
            if pad:
                yield np.zeros((pad, cols), dtype.numpy())

        super().__init__(chunks, dtype, (int(offsets[-1]) + pad, cols), name)
        self._members, self._offsets, self._cols = weights, offsets, cols

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` in the tensor's dtype."""
        out = np.zeros((stop - start, self._cols), self.dtype.numpy())
        for weight, lo, hi in zip(self._members, self._offsets, self._offsets[1:]):
            first, last = max(start, int(lo)), min(stop, int(hi))
            if first < last:
                out[first - start:last - start] = read_rows(weight, first - lo, last - lo)
        return out



class StackedMatrices(ChunkedTensor):
    """``[diag(s_1)·W_1, …, diag(s_k)·W_k]`` stacked on a new leading axis, ``shape`` ``[k, …, rows,
    cols]`` (a block-parallel window's batched projections): each member's ``[in, out]`` weight, its
    rows scaled by its gain when ``gains`` are given (float32 product, cast once), zero-padded to
    ``rows × cols``, produced a block of rows at a time."""

    __slots__ = ()

    def __init__(self, weights: list[Weight], gains: list[np.ndarray] | None, dtype: ir.DataType, name: str,
                 shape: tuple[int, ...]):
        rows, cols = shape[-2:]
        np_dtype = dtype.numpy()

        def chunks() -> Iterator[np.ndarray]:
            step = rows_per_chunk(cols * 4)
            for member, weight in enumerate(weights):
                own_rows, own_cols = weight.shape_in_out
                for start in range(0, rows, step):
                    stop = min(rows, start + step)
                    block = np.zeros((stop - start, cols), np_dtype)
                    last = min(stop, own_rows)
                    if start < last:
                        source = read_rows(weight, start, last)
                        if gains is not None:
                            source = np.multiply(source, gains[member][start:last, None], dtype=np.float32)
                        block[:last - start, :own_cols] = source
                    yield block

        super().__init__(chunks, dtype, tuple(shape), name)
