"""Run windows of whole decoder blocks side by side: ``BlockParallelPass(windows)``.

FFN Fusion's last section parallelises whole blocks, attention included. A window of blocks
``j = 1..k`` on the stream ``x``, block ``j`` being ``b_j(x) = h_j + f_j(h_j)`` with
``h_j = x + a_j(x)`` (``a_j`` its attention branch; ``h_j = x`` in an attention-free block), is
replaced by its parallel form

    y = x + Σ_j (b_j(x) − x) = x + Σ_j ( a_j(x) + f_j(x + a_j(x)) )

which this pass writes exactly, in two sequential steps instead of up to ``2k``:

1. **attention**: every member's attention branch reads ``x``. Their q/k/v projections become one
   GEMM on the unit-gain norm ``u = x / rms(x)`` they share (RMSNorms of one epsilon):
   ``u · [diag(s_1)·Q_1 | diag(s_1)·K_1 | diag(s_1)·V_1 | … | diag(s_k)·V_k]`` (plus the members'
   q/k/v biases side by side, Qwen2's), split back into the members' q, k and v. Each member keeps
   its RoPE, its GQA grouping and its KV cache as exported; then the members' attention *cores*
   (``softmax(Q·Kᵀ + mask)·V``: ONNX's ``Attention`` op, or the exporter's decomposed MatMul/Softmax)
   become **one** core with ``k×`` the heads: their Q, K, V concatenated along the head axis, one
   mask, the output split back per member (:mod:`.attention_cores`). Each member keeps its own output
   projection: each block's FFN needs its own ``h_j``.
2. **FFN**: the members' FFNs on their inputs ``h_j`` as one batched chain: the unit norms of the
   ``h_j`` stacked ``[k, tokens, H]``; gate/up (each member's gain folded) and down stacked
   ``[k, H, F]`` / ``[k, F, H]`` (narrower members padded with zero columns and rows: exact);
   batched MatMuls, the activation, one ReduceSum over ``k``, reshaped back to the stream's shape.

Then one Sum of the attention outputs and the FFN sum, and one residual Add. Where a layout does not
apply (projections the matcher cannot tell apart, QK-norm, biased FFNs, LayerNorms, post-normed FFNs,
4-bit weights; cores with different masks, like Gemma's sliding and global layers, or ORT GenAI's
GroupQueryAttention, which writes each layer's KV buffer in place), the members keep their own
projections, cores or FFNs: still reading ``x`` or ``h_j``, still two steps, still exact;
:class:`BlockParallelResult` says which layout each window got and why.

The parallel form approximates the sequential blocks (the paper: it degrades faster than FFN
Fusion); where it pays is for measurement to decide, not this pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from ffnfusion.core.errors import InvalidArgumentError, InvalidPlanError
from ffnfusion.passes import nbits
from ffnfusion.passes.attention_branch import AttentionWeights, match_attention
from ffnfusion.passes.attention_cores import AttentionCore, match_core, merge_cores, mergeable
from ffnfusion.passes.block_map import PARALLEL_WINDOWS_METADATA, BlockMap, DecoderLayer, layer_groups_in_metadata
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.canonical import RewritePass
from ffnfusion.passes.ffn_emission import Emitter, pre_norm_gain, register, unit_norm
from ffnfusion.passes.layer_ranges import format_ranges, parse_groups
from ffnfusion.passes.op_matchers import Weight
from ffnfusion.passes.streaming import FoldedColumns, StackedMatrices

WIDE_QKV = "one q/k/v GEMM"
WIDE_CORE = "one attention core with k× the heads"
SEPARATE_CORES = "each member's own (asked: merge_cores=False)"
BATCHED_FFN = "one batched FFN chain"
MIN_OPSET = 13


@dataclasses.dataclass(frozen=True)
class WindowLayout:
    """What one window became: its layers, which members kept attention, and the layout of each step
    (``WIDE_QKV`` / ``WIDE_CORE`` / ``BATCHED_FFN``, or why the members kept their own)."""

    first: int
    last: int
    attention_layers: tuple[int, ...]
    attention: str
    ffn: str
    core: str  # the attention cores: WIDE_CORE or why each member kept its own

    @property
    def saved_steps(self) -> int:
        """Sequential steps saved: the window's blocks ran ``attention + k`` steps, now 2."""
        return len(self.attention_layers) + (self.last - self.first + 1) - 2

    def to_dict(self) -> dict:
        return {"layers": [self.first, self.last], "attention_layers": list(self.attention_layers),
                "attention": self.attention, "attention_core": self.core, "ffn": self.ffn,
                "saved_steps": self.saved_steps}


@dataclasses.dataclass
class BlockParallelResult(ir.passes.PassResult):
    windows: list[WindowLayout] = dataclasses.field(default_factory=list)


def coerce_windows(windows: Sequence[Sequence[int]] | str) -> list[list[int]]:
    """``"1-3,6-7"`` or lists of layer indices, as sorted lists; each a run of at least two layers."""
    parsed = parse_groups(windows) if isinstance(windows, str) else [list(w) for w in windows]
    for window in parsed:
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in window):
            raise InvalidArgumentError(f"window {window!r} must be a list of integer layer indices")
        if len(window) < 2 or window != list(range(window[0], window[0] + len(window))):
            raise InvalidArgumentError(f"window {format_ranges(window) if window else window!r}: a window is "
                                       "two or more consecutive layers, e.g. 1-3")
    ordered = sorted(parsed)
    for before, after in zip(ordered, ordered[1:]):
        if after[0] <= before[-1]:
            raise InvalidArgumentError(f"windows {format_ranges(before)} and {format_ranges(after)} overlap")
    return ordered


def resolve_windows(block_map: BlockMap, windows: list[list[int]]) -> list[list[DecoderLayer]]:
    """Each window's decoder layers, checked: whole single blocks (attention optional, an FFN of their
    own, sequential residuals), at least one attention among them."""
    resolved = []
    for window in windows:
        label = format_ranges(window)
        members = []
        for index in window:
            layer = block_map.layer(index)
            if layer.window is not None:
                raise InvalidPlanError(f"window {label}: layer {index} already runs in window "
                                       f"{layer.index}-{layer.last}")
            if layer.ffn is None:
                block_map.ffn(index)  # raises the precise reason (unknown kind, FFN removed, ...)
            if layer.span != range(index, index + 1):
                raise InvalidPlanError(f"window {label}: layer {index} is part of the fused FFN "
                                       f"{format_ranges(layer.span)}; windows take whole single blocks")
            if layer.parallel:
                raise InvalidPlanError(f"window {label}: layer {index} is parallel-residual already (attention "
                                       "and FFN read the same input)")
            members.append(layer)
        if not any(m.attention for m in members):
            raise InvalidPlanError(f"window {label}: no member keeps its attention; running attention-free "
                                   f"FFNs side by side is FFN fusion (ffnfusion fuse --groups {label})")
        resolved.append(members)
    return resolved


def _stream_input(layer: DecoderLayer) -> ir.Value:
    assert layer.ffn is not None
    return layer.attention_block.input if layer.attention_block is not None else layer.ffn.input


def _branch_output(add: ir.Node, stream: ir.Value) -> ir.Value:
    """The residual Add's operand that is not the stream."""
    other = next(v for v in add.inputs if v is not stream)
    assert other is not None
    return other


def _member_nodes(layer: DecoderLayer) -> set[ir.Node]:
    assert layer.ffn is not None
    nodes = set(layer.ffn.nodes) | set(layer.ffn.norm.nodes)
    if layer.attention_block is not None:
        nodes |= set(layer.attention_block.nodes) | {layer.attention_block.residual_add}
    return nodes


def _alias_nodes(value: ir.Value, target: ir.Value) -> list[ir.Node]:
    """No-op Casts/Identities from ``value`` up to ``target`` (legacy exports cast the stream)."""
    nodes = []
    current: ir.Value | None = value
    while current is not target:
        node = current.producer() if current is not None else None
        if node is None or node.op_type not in ("Cast", "Identity"):
            return []
        nodes.append(node)
        current = node.inputs[0]
    return nodes


def check_window_boundaries(label: str, members: Sequence[DecoderLayer]) -> None:
    """The streams between members must be read by the next member alone (not a graph output)."""
    for before, after in zip(members, members[1:]):
        assert before.ffn is not None
        inside = _member_nodes(after) | set(_alias_nodes(_stream_input(after), before.ffn.output))
        if before.ffn.output.is_graph_output():
            raise InvalidPlanError(f"window {label}: the hidden state after layer {before.index} is a graph output; "
                                   "running the window in parallel would remove it")
        outside = [use.node for use in before.ffn.output.uses() if use.node not in inside]
        if outside:
            raise InvalidPlanError(f"window {label}: the hidden state after layer {before.index} is also read by "
                                   f"{outside[0].op_type} node {outside[0].name!r}; the parallel form would change it")


class BlockParallelPass(RewritePass):
    """Rewrite each window of whole blocks into its parallel form (see the module docstring)."""

    def __init__(self, windows: Sequence[Sequence[int]] | str, merge_cores: bool = True):
        super().__init__()
        self.windows = coerce_windows(windows)
        self.merge_cores = merge_cores  # False: each member's attention core stays its own op(s)

    def rewrite(self, model: ir.Model) -> BlockParallelResult:
        opset = model.graph.opset_imports.get("", 0)
        if opset < MIN_OPSET:
            raise InvalidPlanError(f"the model is opset {opset}; the parallel form is written with opset "
                                   f"{MIN_OPSET} ops (Split and ReduceSum taking their sizes and axes as inputs)")
        block_map = find_blocks(model)
        resolved = resolve_windows(block_map, self.windows)
        for window, members in zip(self.windows, resolved):
            check_window_boundaries(format_ranges(window), members)
        read = [_read_window(members, self.merge_cores) for members in resolved]
        replaced: dict[ir.Value, ir.Value] = {}  # adjacent windows: one's output is the next's input
        layouts = [_parallelize(model.graph, window, replaced) for window in read]
        RemoveUnusedNodesPass()(model)  # the members' residual Adds, q/k/v products, FFNs now unused
        model.graph.sort()
        recorded = layer_groups_in_metadata(model, PARALLEL_WINDOWS_METADATA)
        spans = sorted(recorded + [[layout.first, layout.last] for layout in layouts])
        model.metadata_props[PARALLEL_WINDOWS_METADATA] = ",".join(f"{w[0]}-{w[-1]}" for w in spans)
        return BlockParallelResult(model, modified=True, windows=layouts)


def parallelize_windows(model: ir.Model, windows: Sequence[Sequence[int]] | str,
                        merge_cores: bool = True) -> BlockParallelResult:
    """Plain-function form of :class:`BlockParallelPass` (rewrites ``model`` in place)."""
    result = BlockParallelPass(windows, merge_cores)(model)
    assert isinstance(result, BlockParallelResult)
    return result


@dataclasses.dataclass(frozen=True)
class _Window:
    """What a window's rewrite reads from the graph as it was: every window is read before any is
    rewritten (an adjacent window's rewrite moves the uses of the stream between them)."""

    members: tuple[DecoderLayer, ...]
    attention_outputs: tuple[ir.Value, ...]  # a_j, the members' attention branch outputs
    ffn_outputs: tuple[ir.Value, ...]  # f_j(h_j), the members' FFN branch outputs
    qkv: list[AttentionWeights] | str  # the members' q/k/v weights, or why they stay apart
    cores: list[AttentionCore] | str  # the members' attention cores, or why they stay apart


def _read_window(members: Sequence[DecoderLayer], merge_cores: bool) -> _Window:
    attention_outputs = tuple(_branch_output(m.attention_block.residual_add, m.attention_block.input)
                              for m in members if m.attention_block is not None)
    ffn_outputs = tuple(_branch_output(m.ffn.residual_add, m.ffn.input) for m in members if m.ffn is not None)
    attending = [m for m in members if m.attention_block is not None]
    cores = _match_cores(attending) if merge_cores else SEPARATE_CORES
    return _Window(tuple(members), attention_outputs, ffn_outputs, _match_qkv(attending), cores)


def _parallelize(graph: ir.Graph, window: _Window, replaced: dict[ir.Value, ir.Value]) -> WindowLayout:
    members, qkv = window.members, window.qkv
    first, last = members[0], members[-1]
    label = format_ranges([first.index, last.index])
    prefix = f"ffnfusion.window.{label}"
    x = replaced.get(_stream_input(first), _stream_input(first))
    assert first.ffn is not None
    dtype = first.ffn.dtype
    for member in members[1:]:  # every member reads the window's input
        ir.convenience.replace_all_uses_with(_stream_input(member), x)
    nodes: list[ir.Node] = []
    if not isinstance(qkv, str):
        _wide_qkv(graph, prefix, qkv, nodes)
    if not isinstance(window.cores, str):
        nodes += merge_cores(graph, f"{prefix}.attention.core", window.cores)
    ffn = _batched_ffn(graph, prefix, members, x, nodes)
    emit = Emitter(graph, prefix, dtype)
    updates = [*window.attention_outputs, *([ffn.outputs] if isinstance(ffn, _Batched) else window.ffn_outputs)]
    total = emit.add("Sum", updates, "sum")
    residual = emit.add("Add", [x, total], "residual_add")
    nodes += emit.nodes
    assert last.ffn is not None
    old_output = last.ffn.output
    residual.type, residual.shape = old_output.type, old_output.shape
    graph.insert_before(last.ffn.residual_add, nodes)
    output_name = old_output.name if old_output.is_graph_output() else None
    ir.convenience.replace_all_uses_with(old_output, residual, replace_graph_outputs=True)
    if output_name is not None:
        old_output.name = None
        residual.name = output_name
    replaced[old_output] = residual
    return WindowLayout(first.index, last.index, tuple(m.index for m in members if m.attention),
                        qkv if isinstance(qkv, str) else WIDE_QKV,
                        ffn if isinstance(ffn, str) else BATCHED_FFN,
                        window.cores if isinstance(window.cores, str) else WIDE_CORE)


# --- step 1: the members' q/k/v as one GEMM -----------------------------------------------------------

def _match_qkv(members: Sequence[DecoderLayer]) -> list[AttentionWeights] | str:
    """The members' attention weights, when one GEMM can compute their q/k/v; else why not. (Read
    before the members are rewired: the matcher follows each branch from its own input.)"""
    matched: list[AttentionWeights] = []
    for member in members:
        assert member.attention_block is not None
        weights = match_attention(member.attention_block, biases=True)
        if isinstance(weights, str):
            return f"layer {member.index}: {weights}"
        matched.append(weights)
    norms = [w.norm for w in matched]
    if any(n.centered or n.bias is not None for n in norms):
        return "a LayerNorm before the attention (its mean differs from an RMSNorm's unit norm)"
    if len({n.epsilon for n in norms}) > 1 or len({n.kind for n in norms}) > 1:
        return "the members' attention norms differ in kind or epsilon (no shared rms(x))"
    projections = [p for w in matched for p in (w.q, w.k, w.v)]
    if reason := _unfoldable(projections):
        return reason
    return matched


def _wide_qkv(graph: ir.Graph, prefix: str, matched: Sequence[AttentionWeights], nodes: list[ir.Node]) -> None:
    """Replace the members' q/k/v products by slices of one GEMM on the shared unit norm."""
    norms = [w.norm for w in matched]
    projections = [p for w in matched for p in (w.q, w.k, w.v)]
    dtype = projections[0].tensor.dtype
    gains = [_norm_gain(w) for w in matched for _ in range(3)]
    emit = Emitter(graph, f"{prefix}.attention", dtype)
    unit = unit_norm(norms[0], dtype, emit, {})
    weight = register(graph, FoldedColumns(projections, gains, dtype, f"{prefix}.attention.qkv_proj.weight"))
    widths = [p.shape_in_out[1] for p in projections]
    product = emit.linear(unit, weight, _stacked_bias(matched, widths, dtype, f"{prefix}.attention.qkv_proj.bias"),
                          "qkv_proj")
    split = _split(emit, product, widths)
    nodes += emit.nodes
    outputs = [value for w in matched for value in (w.outputs or ())]
    for old, new in zip(outputs, split):
        new.type, new.shape = old.type, old.shape
        ir.convenience.replace_all_uses_with(old, new)


def _stacked_bias(matched: Sequence[AttentionWeights], widths: Sequence[int], dtype: ir.DataType,
                  name: str) -> ir.TensorProtocol | None:
    """``[b_q1 | b_k1 | b_v1 | … | b_vk]`` (zeros for an unbiased projection), None when none has one."""
    biases = [bias for w in matched for bias in w.biases]
    if all(bias is None for bias in biases):
        return None
    parts = [np.zeros(width, np.float32) if bias is None or bias.const_value is None
             else bias.const_value.numpy().astype(np.float32) for bias, width in zip(biases, widths)]
    return ir.tensor(np.concatenate(parts).astype(dtype.numpy()), name=name)


def _norm_gain(weights: AttentionWeights) -> np.ndarray:
    gain = weights.norm.gain
    hidden = weights.q.shape_in_out[0]
    if gain is None or gain.const_value is None:
        return np.ones(hidden, np.float32)
    return gain.const_value.numpy().astype(np.float32)


def _unfoldable(weights: Sequence[Weight]) -> str | None:
    """Why these weights cannot be folded into one float GEMM, if they cannot."""
    if any(w.value.meta.get(nbits.DEQUANTIZED_META) for w in weights):
        return "4-bit weights (MatMulNBits): the members keep their own quantised products"
    if len({w.tensor.dtype for w in weights}) > 1:
        return "the members' weights differ in dtype"
    return None


def _split(emit: Emitter, value: ir.Value, widths: Sequence[int], axis: int = -1) -> list[ir.Value]:
    sizes = emit.constant(np.array(widths, np.int64), "split_sizes")
    node = ir.Node("", "Split", [value, sizes], attributes=[ir.AttrInt64("axis", axis)],
                   num_outputs=len(widths), name=f"{emit.prefix}/split")
    for i, output in enumerate(node.outputs):
        output.name = f"{emit.prefix}/split_output_{i}"
    emit.nodes.append(node)
    return list(node.outputs)


# --- step 1, the cores: one with all the members' heads (:mod:`.attention_cores`) ---------------------

def _match_cores(members: Sequence[DecoderLayer]) -> list[AttentionCore] | str:
    """The members' attention cores, when one core with all their heads computes them; else why not."""
    if len(members) < 2:
        return "one attention in the window"
    cores = []
    for member in members:
        assert member.attention_block is not None
        core = match_core(member.attention_block)
        if isinstance(core, str):
            return f"layer {member.index}: {core}"
        cores.append(core)
    return mergeable(cores) or cores


# --- step 2: the members' FFNs as one batched chain ---------------------------------------------------

@dataclasses.dataclass
class _Batched:
    outputs: ir.Value  # Σ_j f_j(h_j)


def _batched_ffn(graph: ir.Graph, prefix: str, members: Sequence[DecoderLayer], x: ir.Value,
                 nodes: list[ir.Node]) -> _Batched | str:
    """``Σ_j f_j(h_j)`` as batched MatMuls over the stacked unit norms of the ``h_j``, or why the
    members keep their own FFNs."""
    ffns = [m.ffn for m in members if m.ffn is not None]
    first = ffns[0]
    for ffn in ffns:
        if ffn.post_norm is not None:
            return f"layer {ffn.layer}: a post-normed FFN (Gemma 2/3), not a batched product"
        if ffn.norm.centered or ffn.norm.bias is not None:
            return f"layer {ffn.layer}: a LayerNorm FFN"
        if any(b is not None for b in (ffn.gate_bias, ffn.up_bias, ffn.down_bias)):
            return f"layer {ffn.layer}: biased FFN projections"
        for what, mine, theirs in (("FFN kind", ffn.kind, first.kind), ("activation", ffn.activation, first.activation),
                                   ("hidden size", ffn.hidden, first.hidden)):
            if mine != theirs:
                return f"layer {ffn.layer} has {what} {mine}, layer {first.layer} {theirs}"
    weights = [w for ffn in ffns for w in (ffn.gate, ffn.up, ffn.down) if w is not None]
    if reason := _unfoldable(weights):
        return reason
    weights_dtype = weights[0].tensor.dtype
    k, hidden, width = len(ffns), first.hidden, max(ffn.width for ffn in ffns)
    emit = Emitter(graph, f"{prefix}.ffn", weights_dtype)
    # tokens flattened: [1, tokens, H] per member whatever the stream's rank, [k, tokens, H] stacked
    rows = emit.constant(np.array([1, -1, hidden], np.int64), "rows_shape")
    stacked = []
    for ffn in ffns:  # each member's own unit norm of its own input (its encoding, its casts)
        member_emit = Emitter(graph, f"{prefix}.ffn.{ffn.layer}", weights_dtype)
        unit = unit_norm(ffn.norm, weights_dtype, member_emit, {})
        stacked.append(member_emit.add("Reshape", [unit, rows], "rows"))
        emit.nodes += member_emit.nodes
    units = emit.add("Concat", stacked, "stack", axis=0)
    gains = [pre_norm_gain(ffn) for ffn in ffns]

    def stacked_weight(which: str, folded: bool, rows: int, cols: int) -> ir.Value:
        members = [getattr(ffn, which) for ffn in ffns]
        return register(graph, StackedMatrices(members, gains if folded else None, weights_dtype,
                                               f"{prefix}.ffn.{which}_proj.weight", (k, rows, cols)))

    up = emit.add("MatMul", [units, stacked_weight("up", True, hidden, width)], "up_proj")
    if first.gate is not None:
        gate = emit.add("MatMul", [units, stacked_weight("gate", True, hidden, width)], "gate_proj")
        hidden_value = emit.add("Mul", [emit.activate(gate, first.activation), up], "gated")
    else:
        hidden_value = emit.activate(up, first.activation)
    down = emit.add("MatMul", [hidden_value, stacked_weight("down", False, width, hidden)], "down_proj")
    axes = emit.constant(np.array([0], np.int64), "sum_axes")
    total = emit.add("ReduceSum", [down, axes], "sum_members", keepdims=0)
    update = emit.add("Reshape", [total, emit.add("Shape", [x], "stream_shape")], "update")
    nodes += emit.nodes
    return _Batched(update)
