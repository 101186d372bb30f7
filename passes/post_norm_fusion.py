"""Fuse a group of attention-free FFN layers whose FFNs normalise their own output (Gemma 2/3's
sandwich layers) into their grouped parallel form.

Each member ``j`` updates the stream by ``post_j(mlp_j(pre_j(x)))`` with RMS norms on both sides;
the parallel form of a group of ``k`` such members is

    y = x + Σ_j post_j(d_j),    d_j = down_j( act(u·G_j') ⊙ (u·U_j') ),    u = x / rms(x)

with each member's input-norm gain folded into its gate/up columns (``G_j' = diag(s_j)·G_j``: every
member sees the same ``rms(x)``). Why not one wide FFN, as :mod:`.ffn_fusion` writes for pre-norm
members: the wide FFN's single down projection returns ``Σ_j d_j``, and ``post_j`` must see ``d_j``
alone, because ``rms(d_1 + d_2) ≠ rms(d_1)`` — the sum of the normalised outputs is not the normalised
sum. So the group is written as

    h = act(u·G*) ⊙ (u·U*)                 one wide gate/up GEMM, [N, k·I]
    d = reshape(h, [N, k, I])ᵀ · D          one batched MatMul, [k, N, I] × [k, I, H] → [k, N, H]
    y = x + Σ_k  d / rms(d) · g             every member's post-norm at once (float32, its own gain g_j), one sum

which is exact (≤ 1e-5 against the parallel form) and runs the group in four sequential steps (norm,
GEMM, batched GEMM, norm + sum) instead of ``4k``. ``D`` is stored as the ``[k·I, H]`` stack of the
members' down projections (the same initializer the wide form writes) and reshaped in the graph, so
:func:`~.blocks.find_blocks` reads the result back as one FFN block of width ``k·I`` with a post-norm.

The post-norm runs in float32 whatever the weights' dtype, as Gemma's ``RMSNorm`` does. Residual
multipliers need nothing here: Granite's are folded into the down projections at export, exact
because Granite has no post-norms (under a post-norm a multiplier belongs in its gain: RMS is
scale-invariant). ``target="cpu"`` padding does not apply (the width is per member).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from ffnfusion.passes import ffn_emission as emission
from ffnfusion.passes import nbits
from ffnfusion.passes.block_map import FFNBlock
from ffnfusion.passes.plan import InvalidPlanError
from ffnfusion.passes.streaming import StackedRows


def check_post_normed(label: str, members: Sequence[FFNBlock]) -> None:
    """What the grouped form needs beyond :func:`~.ffn_fusion.check_fusable`: every member
    post-normed by an RMS norm with one epsilon, one width, no down bias, float weights."""
    plain = [m.layer for m in members if m.post_norm is None]
    if plain:
        raise InvalidPlanError(f"group {label}: layer {plain[0]}'s FFN has no post-norm and layer "
                               f"{next(m.layer for m in members if m.post_norm is not None)}'s has one; a "
                               "fused group is all one or the other")
    first = members[0]
    for member in members:
        post = member.post_norm
        assert post is not None
        if post.centered:
            raise InvalidPlanError(f"group {label}: layer {member.layer}'s post-norm is a LayerNorm; the grouped "
                                   "form is written for RMS post-norms")
        if post.gain is not None and post.gain.const_value is not None and post.gain.const_value.shape.rank() != 1:
            raise InvalidPlanError(f"group {label}: layer {member.layer} is already a fused post-normed group; "
                                   "fuse the original layers together instead")
        if member.down_bias is not None:
            raise InvalidPlanError(f"group {label}: layer {member.layer}'s post-normed FFN has a down-projection "
                                   "bias, which the grouped form does not carry")
        if member.up.value.meta.get(nbits.DEQUANTIZED_META):
            raise InvalidPlanError(f"group {label}: layer {member.layer}'s weights are block-quantized; the "
                                   "grouped post-norm form is written for float weights")
        for what, mine, theirs in (("post-norm epsilon", post.epsilon, first.post_norm.epsilon),  # type: ignore[union-attr]
                                   ("FFN width", member.width, first.width)):
            if mine != theirs:
                raise InvalidPlanError(f"group {label}: layer {member.layer} has {what} {mine}, layer "
                                       f"{first.layer} has {theirs}; the grouped form needs one {what}")


def _post_gain(member: FFNBlock) -> np.ndarray:
    post = member.post_norm
    assert post is not None
    return np.ones(member.hidden, np.float32) if post.gain is None else emission.const_float32(post.gain)


def fuse_post_normed_group(graph: ir.Graph, label: str, members: Sequence[FFNBlock],
                           replaced: dict[ir.Value, ir.Value] | None = None) -> ir.Value:
    """Replace ``members`` (checked by :func:`check_post_normed`) by their grouped parallel form;
    returns the new residual output. ``replaced`` as in :func:`~.ffn_fusion.fuse_group`."""
    first, last = members[0], members[-1]
    stream_input = (replaced or {}).get(first.input, first.input)
    prefix = f"ffnfusion.layers.{label}"
    dtype, count, width, hidden_size = first.dtype, len(members), first.width, first.hidden
    opset = graph.opset_imports.get("", 20)
    doomed = emission.group_nodes(label, members)
    emit = emission.Emitter(graph, prefix, dtype)

    unit_norm = emission.unit_gain_norm(first, emit, doomed)
    hidden = emission.wide_hidden(emit, members, unit_norm, [emission.pre_norm_gain(m) for m in members])

    def int64(values: list[int], name: str) -> ir.Value:
        return emit.constant(np.array(values, np.int64), name)

    rows = emit.add("Reshape", [hidden, int64([-1, count, width], "member_rows_shape")], "member_rows")
    per_member = emit.add("Transpose", [rows], "per_member", perm=[1, 0, 2])
    down = emission.register(graph, StackedRows([m.down for m in members], dtype, f"{prefix}.down_proj.weight"))
    stacked_down = emit.add("Reshape", [down, int64([count, width, hidden_size], "down_proj_shape")], "down_proj_stack")
    outputs = emit.add("MatMul", [per_member, stacked_down], "down_proj")
    if dtype != ir.DataType.FLOAT:
        outputs = emit.add("Cast", [outputs], "down_proj_float", to=ir.DataType.FLOAT)

    last_axis = {"axes": [-1]} if opset < 18 else {}
    mean_inputs = [emit.add("Mul", [outputs, outputs], "post_norm_square")]
    if opset >= 18:
        mean_inputs.append(int64([-1], "last_axis"))
    mean = emit.add("ReduceMean", mean_inputs, "post_norm_mean", keepdims=1, **last_axis)
    epsilon = emit.constant(np.array(first.post_norm.epsilon, np.float32), "post_norm.epsilon")  # type: ignore[union-attr]
    rms = emit.add("Sqrt", [emit.add("Add", [mean, epsilon], "post_norm_add_epsilon")], "post_norm_rms")
    unit = emit.add("Div", [outputs, rms], "post_norm_unit")
    post_gains = emit.constant(np.stack([_post_gain(m) for m in members])[:, None, :], "post_norm.weight")
    normed = emit.add("Mul", [unit, post_gains], "post_norm")
    sum_inputs = [normed] + ([int64([0], "member_axis")] if opset >= 13 else [])
    summed = emit.add("ReduceSum", sum_inputs, "member_sum", keepdims=0, **({"axes": [0]} if opset < 13 else {}))
    if dtype != ir.DataType.FLOAT:
        summed = emit.add("Cast", [summed], "member_sum_cast", to=dtype)
    update = emit.add("Reshape", [summed, emit.add("Shape", [stream_input], "stream_shape")], "update")
    residual = emit.add("Add", [stream_input, update], "residual_add")
    emission.replace_group(graph, last, residual, emit.nodes, doomed)
    return residual
