"""Fuse groups of consecutive attention-free FFN layers into one wide FFN.

For a group of layers ``1..k`` reading the residual stream ``x``, the parallel form

    y = x + Σ_j down_j( silu(n_j(x)·G_j) ⊙ (n_j(x)·U_j) ),    n_j(x) = x / rms(x) · s_j

equals one FFN of width ``Σ_j width_j`` on the unit-gain norm ``u = x / rms(x)``:

    y = x + ( silu(u·G*) ⊙ (u·U*) ) · D*,
    G* = [diag(s_1)·G_1 | … | diag(s_k)·G_k],  U* = [diag(s_1)·U_1 | …],  D* = [D_1; …; D_k]

exactly, because every member sees the same ``rms(x)`` (same epsilon). Gains are folded in
float32 and cast back to the weights' dtype. The same holds for GeGLU, for plain two-matrix MLPs
``down(act(n(x)·U + b_u)) + b_d`` (biases: ``b_u*`` concatenates, ``b_d*`` sums) and for LayerNorm
``n(x) = unit(x)·s + β``, whose bias folds into the first projection's: ``b_u* = [β_j·U_j + b_u_j]``. Replacing the *sequential* run by this parallel form
is the approximation FFN Fusion makes; this pass performs the rewrite, analysis decides where.

Members that normalise their own output (post-norms) are not one wide FFN: their groups are written
in the grouped form of :mod:`.post_norm_fusion`.

``target="cpu"`` appends zero columns to ``G*``/``U*`` and zero rows to ``D*`` (still exact: a zero
down row ignores its column) so that the width is an odd multiple of 16 (see :func:`cpu_padding`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from ffnfusion.core.errors import InvalidArgumentError
from ffnfusion.passes.block_map import FUSED_GROUPS_METADATA, FFNBlock, fused_spans_of
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.canonical import RewritePass
from ffnfusion.passes.ffn_emission import (
    Emitter,
    const_float32,
    group_nodes,
    pre_norm_gain,
    register,
    replace_group,
    shared_gain,
    unit_gain_norm,
    wide_hidden,
)
from ffnfusion.passes.layer_ranges import format_ranges
from ffnfusion.passes.plan import FusionPlan, InvalidPlanError
from ffnfusion.passes.post_norm_fusion import check_post_normed, fuse_post_normed_group
from ffnfusion.passes.streaming import StackedRows

# What the emitted layout is tuned for: "gpu" (TensorRT, CUDA; the default) keeps the width, a sum
# of the members' tensor-core friendly widths; "cpu" (ONNX Runtime's MLAS kernels) pads it.
TARGETS = ("gpu", "cpu")


def cpu_padding(width: int) -> int:
    """Zero columns that make ``width`` an odd multiple of 16.

    MLAS packs the down projection's input a few rows at a time; with a row stride that is a multiple
    of 4 KiB (8 × 1536 float32 columns: 48 KiB) those rows share cache sets. Measured on ORT CPU,
    2 threads, B8×S128, 8 fused 576×1536 FFNs: width 12288 5% slower than the unfused layers, width
    12304 4% faster. The 16 extra columns cost 0.13% more FLOPs.
    """
    return (16 - width % 32) % 32


class FFNFusionPass(RewritePass):
    """Rewrite each group of a :class:`FusionPlan` into one wide FFN with one residual Add."""

    def __init__(self, plan: FusionPlan | Sequence[Sequence[int]] | str, target: str = "gpu"):
        super().__init__()
        if target not in TARGETS:
            raise InvalidArgumentError(f"target must be one of {', '.join(TARGETS)}, not {target!r}")
        self.plan = FusionPlan.coerce(plan)
        self.target = target

    def rewrite(self, model: ir.Model) -> ir.passes.PassResult:
        groups = self.plan.resolve(find_blocks(model))
        for group, members in groups:
            check_fusable(format_ranges(group), members)
        replaced: dict[ir.Value, ir.Value] = {}  # adjacent groups: one's output is the next's input
        for group, members in groups:
            label = format_ranges(group)
            if members[0].post_norm is not None:  # Gemma 2/3 sandwich layers: the grouped form
                replaced[members[-1].output] = fuse_post_normed_group(model.graph, label, members, replaced)
                continue
            pad = cpu_padding(sum(m.width for m in members)) if self.target == "cpu" else 0
            replaced[members[-1].output] = fuse_group(model.graph, label, members, replaced, pad)
        RemoveUnusedNodesPass()(model)  # dead gains, weights and their Identity/Constant feeders
        spans = fused_spans_of(model)
        for group in self.plan.groups:  # a group that takes in earlier fused FFNs replaces them
            spans = {a: b for a, b in spans.items() if not group[0] <= a <= group[-1]}
            spans[group[0]] = group[-1]
        model.metadata_props[FUSED_GROUPS_METADATA] = ",".join(f"{a}-{b}" for a, b in sorted(spans.items()))
        return ir.passes.PassResult(model, modified=True)


def fuse_ffn_groups(model: ir.Model, groups: FusionPlan | Sequence[Sequence[int]], target: str = "gpu") -> ir.Model:
    """Plain-function form of :class:`FFNFusionPass` (rewrites ``model`` in place and returns it)."""
    return FFNFusionPass(groups, target)(model).model


def check_fusable(label: str, members: Sequence[FFNBlock]) -> None:
    """Members must share hidden size, dtype, activation and norm kind/epsilon (post-normed members:
    see :func:`~.post_norm_fusion.check_post_normed`)."""
    first = members[0]
    if any(member.post_norm is not None for member in members):
        check_post_normed(label, members)
    for member in members[1:]:
        for what, mine, theirs in (
            ("norm epsilon", member.norm.epsilon, first.norm.epsilon),
            ("norm kind", member.norm.kind, first.norm.kind),
            ("FFN kind", member.kind, first.kind),
            ("activation", member.activation, first.activation),
            ("hidden size", member.hidden, first.hidden),
            ("weight dtype", member.dtype, first.dtype),
        ):
            if mine != theirs:
                raise InvalidPlanError(
                    f"group {label}: layer {member.layer} has {what} {mine}, layer {first.layer} has "
                    f"{theirs}; a fused group needs one {what}"
                )
    for before in members[:-1]:
        if before.output.is_graph_output():
            raise InvalidPlanError(
                f"group {label}: the hidden state after layer {before.layer} is a graph output; "
                "fusing would remove it"
            )


def fuse_group(graph: ir.Graph, label: str, members: Sequence[FFNBlock],
               replaced: dict[ir.Value, ir.Value] | None = None, pad: int = 0) -> ir.Value:
    """Replace ``members`` by one wide FFN (plus ``pad`` zero columns); returns the new residual
    output. ``replaced`` maps stream values removed by earlier groups to their replacements.
    """
    first, last = members[0], members[-1]
    stream_input = (replaced or {}).get(first.input, first.input)
    prefix = f"ffnfusion.layers.{label}"
    dtype = first.dtype
    doomed = group_nodes(label, members)
    emit = Emitter(graph, prefix, dtype)
    gains = [pre_norm_gain(m) for m in members]
    shared = shared_gain(members, gains)
    unit_norm = unit_gain_norm(first, emit, doomed, shared)
    if shared is not None:  # what is folded is each member's gain relative to the one the norm applies
        gains = [gain / shared for gain in gains]
    hidden = wide_hidden(emit, members, unit_norm, gains, pad)
    down = register(graph, StackedRows([m.down for m in members], dtype, f"{prefix}.down_proj.weight", pad))
    down_out = emit.linear(hidden, down, summed_down_bias(members, dtype, f"{prefix}.down_proj.bias"), "down_proj")
    residual = emit.add("Add", [stream_input, down_out], "residual_add")
    replace_group(graph, last, residual, emit.nodes, doomed)
    return residual


def summed_down_bias(members: Sequence[FFNBlock], dtype: ir.DataType, name: str) -> ir.TensorProtocol | None:
    """``b_1 + … + b_k``: the members' down biases all add to the same residual."""
    biases = [const_float32(m.down_bias) for m in members if m.down_bias is not None]
    return ir.tensor(np.sum(biases, axis=0).astype(dtype.numpy()), name=name) if biases else None
