"""Tensors written chunk by chunk, so that fusing a model larger than RAM stays within a few
hundred MB: ``ir.save`` calls ``tofile`` and each chunk is computed, written and dropped.

Rows of ``[in, out]`` weights stored as external data are read with plain file reads (not a
memory map), so the pages read do not stay resident in the process.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx_ir as ir

from ffnfusion.passes.patterns import Weight

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

    def _materialise(self) -> ir.Tensor:
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
                file.write(memoryview(np.ascontiguousarray(chunk, dtype=np_dtype).reshape(-1).view(np.uint8)))


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
    if isinstance(tensor, ir.ExternalTensor) and not weight.transposed:
        np_dtype = tensor.dtype.numpy()
        offset = (tensor.offset or 0) + start * cols * np_dtype.itemsize
        data = np.fromfile(tensor.path, dtype=np_dtype, count=(stop - start) * cols, offset=offset)
        return data.reshape(stop - start, cols)
    return np.asarray(weight.numpy_in_out()[start:stop])


def folded_columns(weights: list[Weight], gains: list[np.ndarray], dtype: ir.DataType, name: str,
                   pad: int = 0) -> ChunkedTensor:
    """``[diag(s_1)·W_1 | … | diag(s_k)·W_k | 0]`` (gate/up of a fused group, ``pad`` zero columns),
    folded in float32 and produced a block of input rows at a time."""
    rows = weights[0].shape_in_out[0]
    width = sum(w.shape_in_out[1] for w in weights) + pad

    np_dtype = dtype.numpy()

    columns = np.cumsum([0] + [w.shape_in_out[1] for w in weights])

    def chunks() -> Iterator[np.ndarray]:
        step = rows_per_chunk(width * 4)
        # numpy releases the GIL in ufuncs: members' slices of a block are filled in parallel
        with ThreadPoolExecutor(max_workers=min(len(weights), os.cpu_count() or 1)) as pool:
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                block = np.empty((stop - start, width), np_dtype)
                block[:, columns[-1]:] = 0

                def fill(member: int) -> None:
                    source = read_rows(weights[member], start, stop)
                    # float32 product of the stored weight and its gain, cast once into the block
                    block[:, columns[member]:columns[member + 1]] = np.multiply(
                        source, gains[member][start:stop, None], dtype=np.float32)

                list(pool.map(fill, range(len(weights))))
                yield block

    return ChunkedTensor(chunks, dtype, (rows, width), name)


def stacked_rows(weights: list[Weight], dtype: ir.DataType, name: str, pad: int = 0) -> ChunkedTensor:
    """``[D_1; …; D_k; 0]`` (down of a fused group, ``pad`` zero rows): each member's rows in turn,
    no arithmetic."""
    cols = weights[0].shape_in_out[1]
    total = sum(w.shape_in_out[0] for w in weights) + pad

    def chunks() -> Iterator[np.ndarray | FileRange]:
        step = rows_per_chunk(cols * dtype.numpy().itemsize)
        for weight in weights:
            rows = weight.shape_in_out[0]
            whole = _row_range(weight, 0, rows)
            if whole is not None and weight.value.const_value.dtype == dtype:
                yield whole  # stored [in, out] in the right dtype: copy the bytes as they are
                continue
            for start in range(0, rows, step):
                yield read_rows(weight, start, min(rows, start + step))
        if pad:
            yield np.zeros((pad, cols), dtype.numpy())

    return ChunkedTensor(chunks, dtype, (total, cols), name)
