"""The grouped form of post-normed FFN groups, on hand-built sandwich-norm graphs: exact against a
numpy parallel form, read back as one block, and the groups it cannot write refused by name."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx.reference import ReferenceEvaluator

from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.ffn_fusion import FFNFusionPass
from ffnfusion.passes.plan import InvalidPlanError

HIDDEN, VOCAB = 8, 16
IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 5))


def _layers(count=4, width=6, post=True, seed=1):
    rng = np.random.default_rng(seed)
    return [{"pre": rng.uniform(0.5, 1.5, HIDDEN), "gate": rng.normal(0, 0.5, (HIDDEN, width)),
             "up": rng.normal(0, 0.5, (HIDDEN, width)), "down": rng.normal(0, 0.5, (width, HIDDEN)),
             "post": rng.uniform(0.5, 1.5, HIDDEN) if post else None, "post_eps": 1e-6}
            for _ in range(count)]


def _model(layers, embedding) -> ir.Model:
    """ids → Gather → per layer ``x + post(down(silu(n(x)·G) ⊙ n(x)·U))`` (decomposed RMS norms,
    ``post`` only where given) → the stream as the output."""
    nodes: list[ir.Node] = []
    initializers: list[ir.Value] = []

    def const(array, name):
        value = ir.Value(name=name, const_value=ir.tensor(np.asarray(array, np.float32) if np.asarray(array).dtype.kind == "f"
                                                          else np.asarray(array), name=name))
        initializers.append(value)
        return value

    def op(op_type, inputs, name, **attributes):
        nodes.append(ir.node(op_type, inputs, attributes or None, name=name))
        return nodes[-1].outputs[0]

    def rms(x, gain, eps, name):
        mean = op("ReduceMean", [op("Mul", [x, x], f"{name}/square"), const([-1], f"{name}.axes")], f"{name}/mean")
        rms_value = op("Sqrt", [op("Add", [mean, const(eps, f"{name}.eps")], f"{name}/add_eps")], f"{name}/sqrt")
        return op("Mul", [op("Div", [x, rms_value], f"{name}/unit"), const(gain, f"{name}.weight")], f"{name}/gain")

    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "seq"]))
    x = op("Gather", [const(embedding, "embed.weight"), ids], "embed")
    for index, layer in enumerate(layers):
        name = f"layers.{index}"
        n = rms(x, layer["pre"], 1e-6, f"{name}.pre_norm")
        gate = op("MatMul", [n, const(layer["gate"], f"{name}.gate.weight")], f"{name}/gate")
        up = op("MatMul", [n, const(layer["up"], f"{name}.up.weight")], f"{name}/up")
        silu = op("Mul", [gate, op("Sigmoid", [gate], f"{name}/sigmoid")], f"{name}/silu")
        down = op("MatMul", [op("Mul", [silu, up], f"{name}/gated"), const(layer["down"], f"{name}.down.weight")],
                  f"{name}/down")
        if layer["post"] is not None:
            down = rms(down, layer["post"], layer["post_eps"], f"{name}.post_norm")
        x = op("Add", [x, down], f"{name}/residual")
    x.name = "hidden_states"
    graph = ir.Graph([ids], [x], nodes=nodes, initializers=initializers, opset_imports={"": 20})
    return ir.Model(graph, ir_version=10)


def _numpy(layers, embedding, groups=()) -> np.ndarray:
    def rms(v, gain, eps):
        return v / np.sqrt(np.mean(v * v, -1, keepdims=True) + eps) * gain

    def update(layer, x):
        n = rms(x, layer["pre"], 1e-6)
        gate = n @ layer["gate"]
        out = (gate / (1 + np.exp(-gate)) * (n @ layer["up"])) @ layer["down"]
        return out if layer["post"] is None else rms(out, layer["post"], layer["post_eps"])

    x = embedding[IDS].astype(np.float64)
    firsts = {group[0]: group for group in groups}
    index = 0
    while index < len(layers):
        group = firsts.get(index, [index])
        x = x + sum(update(layers[j], x) for j in group)  # a group: every member reads the same x
        index = group[-1] + 1
    return x


def _run(model: ir.Model, tmp_path, name="model.onnx") -> np.ndarray:
    ir.save(model, tmp_path / name)  # onnx's reference evaluator: passes run no ONNX Runtime
    return ReferenceEvaluator(str(tmp_path / name)).run(None, {"input_ids": IDS})[0]


@pytest.mark.parametrize("groups", [[[0, 1]], [[1, 2, 3]], [[0, 1], [2, 3]], [[0, 1, 2, 3]]])
def test_grouped_form_equals_the_parallel_form(groups, tmp_path):
    embedding = np.random.default_rng(2).normal(0, 1, (VOCAB, HIDDEN))
    layers = _layers()
    model = _model(layers, embedding)
    assert np.abs(_run(model, tmp_path, "sequential.onnx") - _numpy(layers, embedding)).max() < 1e-5
    FFNFusionPass(groups)(model)
    fused = _run(model, tmp_path)
    reference = _numpy(layers, embedding, groups)
    assert np.abs(fused - reference).max() <= 1e-5 * np.abs(reference).max()
    assert np.abs(fused - _numpy(layers, embedding)).max() > 1e-3  # the parallel form, not the sequential one
    block_map = find_blocks(ir.load(tmp_path / "model.onnx"))
    for group in groups:
        block = block_map.layer(group[0])
        assert block.span == range(group[0], group[-1] + 1) and block.ffn.width == 6 * len(group)
        assert block.ffn.post_norm.gain.const_value.shape.numpy() == (len(group), 1, HIDDEN)


def test_one_wide_ffn_would_be_wrong_here():
    """Why the grouped form: normalising the summed down projections is not the sum of the
    members' normalised outputs."""
    layers, x = _layers(2), np.random.default_rng(3).normal(0, 1, (4, HIDDEN))

    def rms(v):
        return v / np.sqrt(np.mean(v * v, -1, keepdims=True) + 1e-6)

    outputs = [(x @ layer["gate"]) * (x @ layer["up"]) @ layer["down"] for layer in layers]
    assert np.abs(rms(outputs[0] + outputs[1]) - (rms(outputs[0]) + rms(outputs[1]))).max() > 0.1


@pytest.mark.parametrize("change, message", [
    (lambda layers: layers[2].update(post=None), "layer 2's FFN has no post-norm and layer 1's has one"),
    (lambda layers: layers[2].update(post_eps=1e-5), "layer 2 has post-norm epsilon 1e-05, layer 1 has 1e-06"),
    (lambda layers: layers[2].update(gate=layers[2]["gate"][:, :4], up=layers[2]["up"][:, :4],
                                     down=layers[2]["down"][:4]), "layer 2 has FFN width 4, layer 1 has 6"),
])
def test_groups_the_grouped_form_cannot_write_are_refused(change, message):
    layers = _layers()
    change(layers)
    with pytest.raises(InvalidPlanError, match=f"group 1-2: {message}"):
        FFNFusionPass([[1, 2]])(_model(layers, np.ones((VOCAB, HIDDEN))))


def test_a_fused_group_is_not_fused_again(tmp_path):
    model = _model(_layers(), np.ones((VOCAB, HIDDEN)))
    FFNFusionPass([[0, 1]])(model)
    with pytest.raises(InvalidPlanError, match="layer 0 is already a fused post-normed group"):
        FFNFusionPass([[0, 1, 2]])(model)
