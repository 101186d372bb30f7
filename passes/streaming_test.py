"""Fused weights read in slices equal the same slices of the whole tensor as it is saved."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from ffnfusion.passes.op_matchers import Weight
from ffnfusion.passes.streaming import FoldedColumns, StackedMatrices, StackedRows, read_columns, read_rows


def _weight(array: np.ndarray, transposed: bool = False, *, external: str | None = None) -> Weight:
    stored = array.T.copy() if transposed else array
    tensor: ir.TensorProtocol = ir.tensor(stored, name="w")
    if external is not None:  # after 10 bytes of something else: offsets are honoured
        with open(external, "wb") as file:
            file.write(b"x" * 10 + stored.tobytes())
        tensor = ir.ExternalTensor(external, 10, stored.nbytes, ir.DataType.from_numpy(stored.dtype),
                                   shape=ir.Shape(stored.shape), name="w")
    return Weight(ir.Value(name="w", const_value=tensor), transposed)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("external", [False, True])
def test_columns_and_rows_of_stored_weights(tmp_path, transposed, external):
    array = np.random.default_rng(0).standard_normal((5, 9)).astype(np.float16)
    weight = _weight(array, transposed, external=str(tmp_path / "w.bin") if external else None)
    np.testing.assert_array_equal(read_columns(weight, 2, 7), array[:, 2:7].astype(np.float32))  # a slice
    np.testing.assert_array_equal(read_columns(weight, 0, 9), array.astype(np.float32))  # every column
    np.testing.assert_array_equal(read_rows(weight, 1, 4), array[1:4])


def test_folded_columns_and_stacked_rows_read_in_slices_equal_the_saved_tensor():
    rng = np.random.default_rng(1)
    members = [rng.standard_normal((4, width)).astype(np.float16) for width in (3, 5)]
    gains = [rng.standard_normal(4).astype(np.float32) for _ in members]
    folded = FoldedColumns([_weight(m) for m in members], gains, ir.DataType.FLOAT16, "g", pad=2)
    whole = folded.numpy()
    assert whole.shape == (4, 10) and not whole[:, 8:].any()
    for start, stop in [(0, 10), (2, 6), (3, 8), (7, 10)]:  # inside, across members, into the pad
        np.testing.assert_array_equal(folded.columns(start, stop), whole[:, start:stop].astype(np.float32))

    downs = [rng.standard_normal((width, 4)).astype(np.float16) for width in (3, 5)]
    stacked = StackedRows([_weight(d) for d in downs], ir.DataType.FLOAT16, "d", pad=2)
    whole = stacked.numpy()
    assert whole.shape == (10, 4) and not whole[8:].any()
    for start, stop in [(0, 10), (2, 6), (7, 10)]:
        np.testing.assert_array_equal(stacked.rows(start, stop), whole[start:stop])


@pytest.mark.parametrize("folded", [True, False])
def test_stacked_matrices_pad_each_member_and_fold_its_gain(tmp_path, folded):
    """Members of widths 3 and 5 (one stored transposed, one in a file) stacked [2, 4, 5] (columns
    padded) and [2, 5, 4] (rows padded); gains multiply in float32 and round once."""
    rng = np.random.default_rng(2)
    members = [rng.standard_normal((4, width)).astype(np.float16) for width in (3, 5)]
    gains = [rng.uniform(0.5, 1.5, 4).astype(np.float32) for _ in members]
    weights = [_weight(members[0], transposed=True), _weight(members[1], external=str(tmp_path / "w.bin"))]
    stacked = StackedMatrices(weights, gains if folded else None, ir.DataType.FLOAT16, "s", (2, 4, 5)).numpy()
    for j, member in enumerate(members):
        scaled = member.astype(np.float32) * gains[j][:, None] if folded else member
        np.testing.assert_array_equal(stacked[j, :, :member.shape[1]], scaled.astype(np.float16))
        assert not stacked[j, :, member.shape[1]:].any()
    downs = [_weight(m.T.copy()) for m in members]  # [width, 4]: rows padded
    rows = StackedMatrices(downs, None, ir.DataType.FLOAT16, "d", (2, 5, 4)).numpy()
    np.testing.assert_array_equal(rows[0, :3], members[0].T)
    assert not rows[0, 3:].any()
    np.testing.assert_array_equal(rows[1], members[1].T)
