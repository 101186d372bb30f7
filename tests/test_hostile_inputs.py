"""Hostile and broken inputs: each gets a one-line error naming the problem, exit 1 (2 for usage
errors), no traceback, no output left behind, and input files byte-identical afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from ffnfusion.cli import main
from ffnfusion.exporters.synthetic import write_synthetic
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.ffn_removal import FFNRemovalPass


@pytest.fixture(scope="module")
def synth_tiny(tmp_path_factory):
    """Tiny synthetic decoder with external data; attention-free layers 2-4."""
    return write_synthetic("tiny", tmp_path_factory.mktemp("synth"))


def _copy_model(src: pathlib.Path, dst_dir: pathlib.Path) -> pathlib.Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    for f in src.parent.iterdir():
        shutil.copy(f, dst_dir / f.name)
    return dst_dir / src.name


def _retarget_external(model_path: pathlib.Path, location: str) -> None:
    """Point every external tensor at ``location`` (a hostile edit of the graph file)."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, str(model_path))


def _edit(model_path: pathlib.Path, edit) -> None:
    """Rewrite the model in place (for building test inputs only)."""
    staging = model_path.parent / "staging"
    staging.mkdir()
    model = ir.load(model_path)
    edit(model)
    ir.save(model, staging / model_path.name, external_data=model_path.name + ".data")
    for produced in staging.iterdir():
        produced.replace(model_path.parent / produced.name)
    staging.rmdir()


def _case_empty(d, synth):
    (d / "m.onnx").write_bytes(b"")
    return d / "m.onnx", "is empty"


def _case_truncated(d, synth):
    data = synth.read_bytes()
    (d / "m.onnx").write_bytes(data[: len(data) // 2])
    return d / "m.onnx", "not a readable ONNX model"


def _case_random(d, synth):
    (d / "m.onnx").write_bytes(np.random.default_rng(1).bytes(10_000))
    return d / "m.onnx", "not a readable ONNX model"


def _case_conv(d, synth):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 1, 1], [1.0])
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    (d / "m.onnx").write_bytes(model.SerializeToString())
    return d / "m.onnx", "no token embedding found"


def _case_missing_data(d, synth):
    path = _copy_model(synth, d)
    (d / "model.onnx.data").unlink()
    return path, "is missing"


def _case_short_data(d, synth):
    path = _copy_model(synth, d)
    data = d / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    return path, "the tensor needs bytes up to"


def _case_absolute(d, synth):
    path = _copy_model(synth, d)
    _retarget_external(path, str((d / "model.onnx.data").resolve()))
    return path, "is not a relative path inside the model directory"


def _case_dotdot(d, synth):
    path = _copy_model(synth, d / "inner")
    _retarget_external(path, "../inner/model.onnx.data")
    return path, "is not a relative path inside the model directory"


def _case_symlink(d, synth):
    outside = _copy_model(synth, d / "outside")
    inside = d / "inside"
    inside.mkdir()
    shutil.copy(outside, inside / "model.onnx")
    os.symlink(outside.parent / "model.onnx.data", inside / "model.onnx.data")
    return inside / "model.onnx", "resolves outside"


def _case_no_ffn(d, synth):
    path = _copy_model(synth, d)
    _edit(path, lambda m: FFNRemovalPass([0, 1, 5])(m))  # attention layers keep only attention
    _edit(path, lambda m: FFNRemovalPass([2, 3, 4])(m))
    return path, "no gated FFN"


def _case_epsilon(d, synth):
    path = _copy_model(synth, d)

    def change_epsilon(model):
        add = next(n for n in find_blocks(model).ffn(3).norm.nodes if n.op_type == "Add")
        eps = ir.Value(name="eps_other", const_value=ir.tensor(np.array(1e-3, np.float32)))
        model.graph.register_initializer(eps)
        add.replace_input_with(1, eps)

    _edit(path, change_epsilon)
    return path, "layer 3 has norm epsilon 0.001, layer 2 has 1e-05"


def _case_activation(d, synth):
    path = _copy_model(synth, d)

    def tanh_gate(model):
        block = find_blocks(model).ffn(3)
        sigmoid = next(n for n in block.nodes if n.op_type == "Sigmoid")
        sigmoid.op_type = "Tanh"

    _edit(path, tanh_gate)
    return path, "layer 3 is of a kind ffnfusion does not know (no SiLU/GELU-gated product"


CORPUS = {  # name: (builder, command after the model path, exit code)
    "empty file": (_case_empty, ["--groups", "2-3"], 1),
    "truncated protobuf": (_case_truncated, ["--groups", "2-3"], 1),
    "random bytes": (_case_random, ["--groups", "2-3"], 1),
    "a single Conv": (_case_conv, ["--groups", "2-3"], 1),
    "missing external data": (_case_missing_data, ["--groups", "2-3"], 1),
    "external data too short": (_case_short_data, ["--groups", "2-3"], 1),
    "absolute external path": (_case_absolute, ["--groups", "2-3"], 1),
    "external path with ..": (_case_dotdot, ["--groups", "2-3"], 1),
    "external data symlinked out": (_case_symlink, ["--groups", "2-3"], 1),
    "no FFN blocks": (_case_no_ffn, ["--groups", "2-3"], 1),
    "mismatched epsilons": (_case_epsilon, ["--groups", "2-3"], 1),
    "different activation": (_case_activation, ["--groups", "2-3"], 2),  # a layer kind it does not know
}

GROUP_ERRORS = {
    "overlapping groups": (["--groups", "2-3,3-4"], 1, "overlap at layer 3"),
    "out-of-range group": (["--groups", "4-7"], 1, "names layer 6, but the model has layers 0-5"),
    "attention-crossing group": (["--groups", "0-1"], 1, "layer 1 has attention, between FFNs 0 and 1"),
    "malformed group": (["--groups", "2-"], 2, "bad layer range"),
}


def _snapshot(directory: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and not p.is_symlink()}


def _assert_clean_failure(capsys, argv, code, message, inputs: pathlib.Path, out: pathlib.Path):
    before = _snapshot(inputs)
    returned = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert returned == code, err
    assert err[-1].startswith("ffnfusion: error: ") and message in err[-1], err[-1]
    assert not any("Traceback" in line for line in err)
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))
    assert _snapshot(inputs) == before


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_hostile_models(name, synth_tiny, tmp_path, capsys):
    build, args, code = CORPUS[name]
    inputs = tmp_path / "in"
    inputs.mkdir()
    model, message = build(inputs, synth_tiny)
    out = tmp_path / "out" / "model.onnx"
    _assert_clean_failure(capsys, ["fuse", model, "-o", out, *args], code, message, inputs, out)


@pytest.mark.parametrize("name", sorted(GROUP_ERRORS))
def test_bad_groups(name, synth_tiny, tmp_path, capsys):
    args, code, message = GROUP_ERRORS[name]
    out = tmp_path / "out" / "model.onnx"
    _assert_clean_failure(capsys, ["fuse", synth_tiny, "-o", out, *args], code, message, synth_tiny.parent, out)


def test_plan_with_wrong_types(synth_tiny, tmp_path, capsys):
    plan = tmp_path / "plan" / "plan.json"
    plan.parent.mkdir()
    plan.write_text(json.dumps({"groups": [["2", "3"]]}))
    out = tmp_path / "out" / "model.onnx"
    _assert_clean_failure(capsys, ["fuse", synth_tiny, "-o", out, "--plan", plan], 2, "integer layer indices",
                          synth_tiny.parent, out)


def test_output_equal_to_input(synth_tiny, tmp_path, capsys):
    model = _copy_model(synth_tiny, tmp_path / "in")
    before = _snapshot(model.parent)
    assert main(["fuse", str(model), "-o", str(model), "--groups", "2-3"]) == 2
    assert "is the input model" in capsys.readouterr().err
    assert _snapshot(model.parent) == before


def test_unwritable_output_directory(synth_tiny, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = blocker / "sub" / "model.onnx"
    _assert_clean_failure(capsys, ["fuse", synth_tiny, "-o", out, "--groups", "2-3"], 1,
                          "cannot create output directory", synth_tiny.parent, out)


def test_sigterm_leaves_nothing_half_written(tmp_path):
    """Interrupt a fuse of a ~0.6 GB model while it writes: no output, no staging folder."""
    source = write_synthetic("smollm2", tmp_path / "src")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "ffnfusion.cli", "fuse", str(source), "-o",
                                str(out_dir / "model.onnx"), "--groups", "10-16"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".ffnfusion-") for p in out_dir.iterdir()):
        time.sleep(0.01)  # wait until the staging folder exists: the write has begun
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "ffnfusion: interrupted" in err
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("layer", [1, 3], ids=["with-attention", "attention-free"])
def test_a_layer_kind_it_does_not_know_is_refused_by_every_command(layer, synth_tiny, tmp_path, capsys):
    """An FFN whose activation ffnfusion does not know (Tanh where SiLU's Sigmoid was): every command
    that reads or rewrites the model exits 2 with one line naming the layer and the node where
    recognition stopped, and writes nothing — the runner never runs a model around the unknown branch
    (a layer with attention would otherwise have been run as attention alone)."""
    inputs = tmp_path / "in"
    path = _copy_model(synth_tiny, inputs)

    def tanh_gate(model):
        layer_nodes = [n for n in model.graph if (n.name or "").startswith(f"model.layers.{layer}/")]
        next(n for n in layer_nodes if n.op_type == "Sigmoid").op_type = "Tanh"

    _edit(path, tanh_gate)
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 128, 1024))
    out = tmp_path / "out" / "x"
    before = _snapshot(inputs)
    for argv in (["fuse", path, "-o", out, "--groups", f"{layer}-{layer + 1}"],
                 ["verify", synth_tiny, path, "--text-ids", ids, "--tokens", 128, "--window", 64],
                 ["frontier", path, "-o", out, "--steps", 2, "--tokens", 256, "--select-tokens", 128, "--window", 64,
                  "--baselines", "none", "--no-latency", "--calib-ids", ids, ids, ids, "--eval-ids", ids]):
        returned = main([str(a) for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert returned == 2 and err[-1].startswith("ffnfusion: error: "), (argv[0], err[-3:])
        assert f"layer {layer} is of a kind ffnfusion does not know (no SiLU/GELU-gated product" in err[-1], err[-1]
        assert f"found Mul node 'model.layers.{layer}/" in err[-1], err[-1]  # where recognition stopped
        assert not any("Traceback" in line for line in err)
        assert not out.parent.exists() and _snapshot(inputs) == before
