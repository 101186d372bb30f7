"""Loading and saving: refuse unsafe or broken external data before reading it; atomic outputs."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx_ir as ir
import pytest

from ffnfusion.core.errors import FFNFusionError
from ffnfusion.core.model_io import load_model, save_model


def _model_with_external(tmp_path, location="w.bin", data_bytes=16, length=16):
    graph = ir.Graph([], [], nodes=[], name="g")
    tensor = ir.ExternalTensor(location, 0, length, ir.DataType.FLOAT, shape=ir.Shape([length // 4]),
                               name="w", base_dir=tmp_path)
    value = ir.Value(name="w", shape=tensor.shape, type=ir.TensorType(ir.DataType.FLOAT), const_value=tensor)
    graph.register_initializer(value)
    graph.outputs.append(value)
    model = ir.Model(graph, ir_version=10)
    path = tmp_path / "m.onnx"
    ir.save(model, path)
    if data_bytes is not None and not os.path.isabs(location) and ".." not in location:
        (tmp_path / location).write_bytes(b"\0" * data_bytes)
    return path


@pytest.mark.parametrize("location, message", [
    ("/etc/passwd", "is not a relative path inside the model directory"),
    ("../outside.bin", "is not a relative path inside the model directory"),
])
def test_traversal_is_refused(tmp_path, location, message):
    path = _model_with_external(tmp_path, location)
    with pytest.raises(FFNFusionError, match=message):
        load_model(path)


def test_symlink_out_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(b"\0" * 16)
    inside = tmp_path / "model"
    inside.mkdir()
    os.symlink(outside / "secret.bin", inside / "w.bin")
    path = _model_with_external(inside, "w.bin", data_bytes=None)
    with pytest.raises(FFNFusionError, match="resolves outside"):
        load_model(path)


def test_missing_and_short_data_files(tmp_path):
    path = _model_with_external(tmp_path, data_bytes=None)
    with pytest.raises(FFNFusionError, match="external data file .* is missing"):
        load_model(path)
    (tmp_path / "w.bin").write_bytes(b"\0" * 8)
    with pytest.raises(FFNFusionError, match="has 8 bytes, the tensor needs bytes up to 16"):
        load_model(path)


def test_empty_and_garbage_files(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(FFNFusionError, match="is empty"):
        load_model(empty)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(FFNFusionError, match="not a readable ONNX model"):
        load_model(garbage)


def test_save_is_atomic_and_leaves_the_input_alone(tiny_dynamo20, tmp_path):
    before = hashlib.sha256(tiny_dynamo20.read_bytes()).hexdigest()
    model = load_model(tiny_dynamo20)
    out = save_model(model, tmp_path / "copy.onnx", input_path=tiny_dynamo20)
    assert [p.name for p in tmp_path.iterdir()] == ["copy.onnx"]
    assert load_model(out).graph.name == model.graph.name
    assert hashlib.sha256(tiny_dynamo20.read_bytes()).hexdigest() == before
