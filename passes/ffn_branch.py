"""Match an FFN residual branch: ``match_ffn(output, x) -> dict | str`` (a string says what did not fit).

* gated (SwiGLU, GeGLU): ``down(act(gate(n(x))) ⊙ up(n(x)))``;
* plain two-matrix MLP (GPT-NeoX style): ``down(act(up(n(x))))``;

with ``n`` an RMSNorm or LayerNorm of the residual stream and any projection optionally biased; or
either one followed by a *post-norm* of its output, ``post(ffn(n(x)))`` (Gemma 2/3's sandwich layers),
recorded as ``post_norm``; or a group of post-normed FFNs in the grouped form
:mod:`.post_norm_fusion` writes, read as one FFN of the members' total width whose post-norm gain is
stacked ``[k, 1, H]``.
"""

from __future__ import annotations

import onnx_ir as ir

from ffnfusion.passes import norm_matchers, op_matchers


def _op_of(value: ir.Value) -> str:
    node = value.producer()
    return "a graph input or constant" if node is None else f"{node.op_type} node '{node.name}'"


def _with_norm(x: ir.Value, first_input: ir.Value, parts: dict) -> dict | str:
    norm = norm_matchers.match_norm(first_input, x)
    if norm is None:
        return (f"FFN input comes from {_op_of(first_input)}; expected a norm of the residual stream "
                "(RMSNorm decomposed, RMSNormalization, SimplifiedLayerNormalization or LayerNormalization)")
    parts["norm"] = norm
    parts["nodes"] = (*norm.nodes, *parts["nodes"])
    return parts


POST_NORM_DEPTH = 16  # nodes searched back from a branch output for the down projection under a post-norm


def match_ffn(output: ir.Value | None, x: ir.Value) -> dict | str:
    parts = _match_pre_norm_ffn(output, x)
    if not isinstance(parts, str) or output is None:
        return parts
    grouped = _match_grouped_post_norm(output, x)
    if grouped is not None:
        return grouped
    post = _post_norm(output)
    if post is None:
        return parts
    norm, inner, casts = post
    inner_parts = _match_pre_norm_ffn(inner, x)
    if isinstance(inner_parts, str):
        return f"post-normed branch: {inner_parts}"
    inner_parts["post_norm"] = norm
    inner_parts["nodes"] = (*inner_parts["nodes"], *norm.nodes, *casts)
    return inner_parts


def _post_norm(output: ir.Value) -> tuple[norm_matchers.Norm, ir.Value, list[ir.Node]] | None:
    """``output = norm(v)`` with ``v`` a linear layer's output (the down projection): the norm,
    ``v`` and the Casts after the norm; the nearest such ``v`` first."""
    casts: list[ir.Node] = []
    normed = op_matchers.skip_casts(output, casts)
    if normed is None:
        return None
    frontier, seen = [normed], set()
    for _ in range(POST_NORM_DEPTH):
        next_values = []
        for value in frontier:
            node = value.producer()
            if node is None or node in seen:
                continue
            seen.add(node)
            for candidate in node.inputs:
                if candidate is None or candidate.const_value is not None:
                    continue
                if op_matchers.match_linear(candidate) is not None:
                    norm = norm_matchers.match_norm(normed, candidate)
                    if norm is not None:
                        return norm, candidate, casts
                next_values.append(candidate)
        frontier = next_values
    return None


def _match_pre_norm_ffn(output: ir.Value | None, x: ir.Value) -> dict | str:
    down = op_matchers.match_linear(op_matchers.skip_casts(output))
    if down is None:
        return "branch output is not a MatMul/Gemm with a constant weight (down projection)"
    return _match_mlp(down, x)


def _match_mlp(down: op_matchers.Linear, x: ir.Value) -> dict | str:
    """The FFN whose down projection is ``down``, from its input back to the norm of ``x``."""
    common = {"down": down.weight, "down_bias": down.bias}
    product = op_matchers.producer(down.input, "Mul")
    if product is not None:
        for act_value, up_value in (product.inputs, reversed(product.inputs)):
            activation = op_matchers.match_activation(act_value)
            if activation is None:
                continue
            kind, gate_input, activation_nodes = activation
            gate, up = op_matchers.match_linear(gate_input), op_matchers.match_linear(up_value)
            if gate is None or up is None:
                continue
            if gate.input is not up.input:
                return "gate and up projections read different inputs"
            if gate.weight.shape_in_out != up.weight.shape_in_out or \
                    down.weight.shape_in_out[::-1] != up.weight.shape_in_out:
                return "gate/up/down weight shapes do not form an FFN"
            nodes = (*gate.nodes, *activation_nodes, *up.nodes, product, *down.nodes)
            return _with_norm(x, up.input, {**common, "gate": gate.weight, "gate_bias": gate.bias, "up": up.weight,
                                            "up_bias": up.bias, "activation": kind, "nodes": nodes})
    activation = op_matchers.match_activation(down.input)
    if activation is None:
        return ("no SiLU/GELU-gated product (Mul of act(gate) and up) and no activation before the down "
                f"projection (found {_op_of(down.input)})")
    kind, up_value, activation_nodes = activation
    up = op_matchers.match_linear(up_value)
    if up is None:
        return f"activation input comes from {_op_of(up_value)}, expected the up projection"
    if down.weight.shape_in_out[::-1] != up.weight.shape_in_out:
        return "up/down weight shapes do not form an MLP"
    nodes = (*up.nodes, *activation_nodes, *down.nodes)
    return _with_norm(x, up.input, {**common, "gate": None, "gate_bias": None, "up": up.weight, "up_bias": up.bias,
                                    "activation": kind, "nodes": nodes})


def _int64s(value: ir.Value | None) -> list[int] | None:
    array = op_matchers.const_array(value)
    return None if array is None else [int(v) for v in array.reshape(-1)]


def _match_grouped_post_norm(output: ir.Value, x: ir.Value) -> dict | None:
    """The grouped form of :mod:`.post_norm_fusion`, node for node: ``Reshape(ReduceSum(rms(d)·g, 0),
    Shape(x))`` with ``d = Transpose(Reshape(h, [-1, k, I])) @ Reshape(D, [k, I, H])`` and ``h`` an
    FFN's hidden activations. None when anything differs."""
    producer, casts = op_matchers.producer, list[ir.Node]()
    update = producer(op_matchers.skip_casts(output, casts), "Reshape")
    shape = producer(update.inputs[1], "Shape") if update is not None else None
    if update is None or shape is None or not op_matchers.reaches(shape.inputs[0], x):
        return None
    summed = producer(op_matchers.skip_casts(update.inputs[0], casts), "ReduceSum")
    if summed is None or op_matchers.attribute(summed, "keepdims", 1) != 0:
        return None
    axes = op_matchers.attribute(summed, "axes") or _int64s(summed.inputs[1] if len(summed.inputs) > 1 else None)
    scaled = producer(summed.inputs[0], "Mul")
    if list(axes or ()) != [0] or scaled is None:
        return None
    gain, unit = op_matchers.initializer_of(scaled.inputs[1]), scaled.inputs[0]
    divided = producer(unit, "Div")
    if op_matchers.const_rank(gain) != 3 or unit is None or divided is None:
        return None
    stacked_output = op_matchers.skip_casts(divided.inputs[0], casts)
    core = norm_matchers.match_rms_core(unit, stacked_output) if stacked_output is not None else None
    matmul = producer(stacked_output, "MatMul")
    if core is None or matmul is None:
        return None
    transpose, stack = producer(matmul.inputs[0], "Transpose"), producer(matmul.inputs[1], "Reshape")
    rows = producer(transpose.inputs[0], "Reshape") if transpose is not None else None
    weight = op_matchers.initializer_of(stack.inputs[0]) if stack is not None else None
    if transpose is None or rows is None or stack is None or weight is None or weight.const_value is None or \
            rows.inputs[0] is None or list(op_matchers.attribute(transpose, "perm") or ()) != [1, 0, 2]:
        return None
    count, width, hidden = _int64s(stack.inputs[1]) or [0, 0, 0]
    if _int64s(rows.inputs[1]) != [-1, count, width] or \
            tuple(weight.const_value.shape.numpy()) != (count * width, hidden):
        return None
    down = op_matchers.Linear(rows.inputs[0], op_matchers.Weight(weight, transposed=False),
                              (rows, transpose, stack, matmul))
    parts = _match_mlp(down, x)
    if isinstance(parts, str):
        return None
    epsilon, core_nodes = core
    parts["post_norm"] = norm_matchers.Norm("rms_decomposed", epsilon, gain, scaled.outputs[0], unit,
                                            (*core_nodes, scaled), scaled)
    parts["nodes"] = tuple(dict.fromkeys((*parts["nodes"], *core_nodes, scaled, summed, shape, update, *casts)))
    return parts
