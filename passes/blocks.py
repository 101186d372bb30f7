"""Find the decoder blocks of a decoder-only ONNX graph: ``find_blocks(model) -> BlockMap``.

A pre-norm decoder is a *residual stream*: the token embedding ``x0`` followed by residual Adds
``x_{k+1} = x_k + branch_k(x_k)``. We walk that chain from the embedding Gather and classify each
branch (the nodes that depend on ``x_k`` and feed the Add):

* attention: contains a Softmax or an attention op;
* FFN (:func:`~.ffn_branch.match_ffn`): gated ``down(act(gate(n(x))) ⊙ up(n(x)))`` or plain
  ``down(act(up(n(x))))``, ``n`` an RMSNorm or LayerNorm, projections optionally biased or 4-bit
  (``MatMulNBits``), and nothing else; a fused group (ffnfusion's own) is one wide FFN;
* parallel: ``attn(n1(x)) + ffn(n2(x))`` in one branch (GPT-J / Phi-2 style);
* unknown: anything else, reported with what did not match.

Decoder-layer indices come from the order along the stream: a layer is an optional attention branch
followed by an FFN branch; the metadata ffnfusion writes (fused spans, layers emptied or left with
attention only) keeps the original ``model.layers.N`` numbering after a rewrite. Names are never
consulted, so every exporter's encoding works. The walk reads the canonical form
(:mod:`~ffnfusion.passes.canonical`) and never changes the model it is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import onnx_ir as ir

from ffnfusion.core.errors import BlockRecognitionError, InvalidPlanError, UnknownLayerError
from ffnfusion.passes import norm_matchers, op_matchers
from ffnfusion.passes.canonical import canonical_view
from ffnfusion.passes.embedding import find_embedding_output
from ffnfusion.passes.ffn_branch import match_ffn

ATTENTION_OP_TYPES = {
    "Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
    "PagedAttention", "SparseAttention", "DecoderMaskedMultiHeadAttention",
}
# Model metadata listing the groups ffnfusion fused, e.g. "10-13,14-16" (original layer indices).
FUSED_GROUPS_METADATA = "ffnfusion.fused_groups"
# Model metadata listing decoder layers that left the stream entirely (attention-free layers
# whose FFN was removed), e.g. "12,15", so the layers after them keep their numbers.
EMPTY_LAYERS_METADATA = "ffnfusion.empty_layers"
# ... and layers that kept their attention but lost their FFN.
ATTENTION_ONLY_METADATA = "ffnfusion.attention_only_layers"
# ... and windows of whole blocks that run side by side (block_parallel), e.g. "1-3,6-7".
PARALLEL_WINDOWS_METADATA = "ffnfusion.parallel_windows"
# Why a layer with attention has no FFN, when nothing is wrong with it (DecoderLayer.unknown); any
# other reason is a branch of a kind ffnfusion does not know.
NO_FFN_BRANCH, FFN_REMOVED = "no FFN branch", "FFN removed"


@dataclasses.dataclass(frozen=True)
class FFNBlock:
    """One FFN residual branch: gated ``y = x + down(act(gate(n(x))) * up(n(x)))`` (SwiGLU,
    GeGLU) or plain ``y = x + down(act(up(n(x))))``; every projection may carry a bias."""

    layer: int
    input: ir.Value  # residual stream value x
    output: ir.Value  # y, the residual Add's output
    residual_add: ir.Node
    norm: norm_matchers.Norm
    gate: op_matchers.Weight | None  # None for a plain two-matrix MLP
    up: op_matchers.Weight
    down: op_matchers.Weight
    activation: str  # "silu" | "gelu" | "gelu_tanh"
    nodes: tuple[ir.Node, ...]  # every node of the branch, residual Add included
    gate_bias: ir.Value | None = None
    up_bias: ir.Value | None = None
    down_bias: ir.Value | None = None
    # Gemma 2/3 sandwich layers normalise the FFN's output too: y = x + post(down(...)). A fused group
    # of them (post_norm_fusion's grouped form) has its members' post-norm gains stacked [k, 1, H].
    post_norm: norm_matchers.Norm | None = None

    @property
    def norm_description(self) -> str:
        """The norm kind, ``+post`` when the output is normalised too."""
        return self.norm.kind + ("+post" if self.post_norm is not None else "")

    @property
    def kind(self) -> str:
        return "gated" if self.gate is not None else "plain"

    @property
    def width(self) -> int:
        return self.up.shape_in_out[1]

    @property
    def hidden(self) -> int:
        return self.up.shape_in_out[0]

    @property
    def dtype(self) -> ir.DataType:
        return self.up.tensor.dtype

    def to_dict(self) -> dict:
        return {
            "width": self.width,
            "hidden": self.hidden,
            "norm": self.norm_description,
            "epsilon": self.norm.epsilon,
            "activation": self.activation,
            "dtype": self.dtype.name.lower(),
            "kind": self.kind,
            "weights": {
                "gain": self.norm.gain.name if self.norm.gain is not None else None,
                "gate": self.gate.name if self.gate is not None else None, "up": self.up.name,
                "down": self.down.name, "layout": "[out,in]" if self.up.transposed else "[in,out]",
                "biases": [b.name for b in (self.norm.bias, self.gate_bias, self.up_bias, self.down_bias) if b is not None],
            },
        }


@dataclasses.dataclass(frozen=True)
class AttentionBlock:
    """One attention residual branch ``y = x + attn(n(x))`` (whatever its internals).

    In a parallel-residual layer (GPT-NeoX, GPT-J, Phi: ``y = x + attn(n1(x)) + mlp(n2(x))``)
    ``output`` is the sum ``attn(..) + mlp(..)``, ``residual_add`` that Add, and ``bypass`` the FFN's
    update: removing the attention makes the layer an ordinary FFN layer ``x + mlp(n2(x))``."""

    input: ir.Value
    output: ir.Value
    residual_add: ir.Node
    nodes: tuple[ir.Node, ...]  # nodes that depend on x and feed the Add (not the Add itself)
    bypass: ir.Value | None = None  # parallel residual: what replaces ``output`` when attention goes

    @property
    def passes_through(self) -> ir.Value:
        """The value that stands for ``output`` once the attention is removed."""
        return self.bypass if self.bypass is not None else self.input


@dataclasses.dataclass(frozen=True)
class WindowBlock:
    """Whole blocks ffnfusion runs side by side (:mod:`.block_parallel`): ``y = x + branch(x)``,
    the branch holding every member's attention and FFN. Opaque to the other passes."""

    input: ir.Value
    output: ir.Value
    residual_add: ir.Node
    nodes: tuple[ir.Node, ...]


@dataclasses.dataclass(frozen=True)
class DecoderLayer:
    """One position on the residual stream: optional attention, then an FFN.

    A wide FFN that ffnfusion made from layers ``index..last`` keeps their original numbering.
    """

    index: int
    attention: bool
    ffn: FFNBlock | None
    unknown: str | None = None  # why a branch was not recognised
    last: int | None = None  # set when this FFN is an earlier fusion of layers index..last
    attention_block: AttentionBlock | None = None
    parallel: bool = False  # attention and FFN read the same input (GPT-NeoX style)
    window: WindowBlock | None = None  # layers index..last run side by side as whole blocks

    @property
    def span(self) -> range:
        return range(self.index, (self.index if self.last is None else self.last) + 1)

    def to_dict(self) -> dict:
        entry: dict = {"layer": self.index, "attention": self.attention,
                 "ffn": self.ffn.to_dict() if self.ffn else None}
        if self.window is not None:
            entry["parallel_window"] = [self.index, self.last]
        elif self.last is not None:
            entry["fused_layers"] = [self.index, self.last]
        if self.parallel:
            entry["parallel_residual"] = True
        if self.unknown:
            entry["unknown"] = self.unknown
        return entry


@dataclasses.dataclass(frozen=True)
class BlockMap:
    """What the graph contains: decoder layers in stream order and the attention-free runs."""

    layers: tuple[DecoderLayer, ...]

    @property
    def runs(self) -> list[tuple[int, int]]:
        """Maximal ranges ``(first, last)`` of consecutive layers that have an FFN and no attention."""
        runs: list[tuple[int, int]] = []
        for layer in self.layers:
            if layer.attention or layer.ffn is None:
                continue
            if runs and runs[-1][1] == layer.index - 1:
                runs[-1] = (runs[-1][0], layer.span[-1])
            else:
                runs.append((layer.index, layer.span[-1]))
        return runs

    @property
    def num_layers(self) -> int:
        return self.layers[-1].span[-1] + 1

    def run_of(self, index: int) -> tuple[int, int] | None:
        return next((run for run in self.runs if run[0] <= index <= run[1]), None)

    def layer(self, index: int) -> DecoderLayer:
        """The stream position holding decoder layer ``index`` (a fused FFN holds several)."""
        for layer in self.layers:
            if index in layer.span:
                return layer
        raise InvalidPlanError(f"layer {index} does not exist: the model has layers 0-{self.num_layers - 1}")

    def ffn(self, index: int) -> FFNBlock:
        layer = self.layer(index)
        if layer.window is not None:
            raise InvalidPlanError(f"layer {index} runs in the block-parallel window {layer.index}-{layer.last}: "
                                   "its FFN is not a block of its own")
        if layer.ffn is None and layer.unknown not in (None, NO_FFN_BRANCH, FFN_REMOVED):
            raise UnknownLayerError(f"layer {index} is of a kind ffnfusion does not know ({layer.unknown})")
        if layer.ffn is None:
            raise InvalidPlanError(f"layer {index} has no recognised FFN ({layer.unknown or 'none found'})")
        return layer.ffn

    @property
    def sequential_steps(self) -> int:
        """Sublayer steps a forward pass runs one after another: attention branches plus FFNs (a
        fused group is one FFN, a block-parallel window one attention step and one FFN step)."""
        return sum(2 if layer.window is not None else int(layer.attention) + int(layer.ffn is not None)
                   for layer in self.layers)

    def to_dict(self) -> dict:
        return {"sequential_steps": self.sequential_steps, "blocks": [layer.to_dict() for layer in self.layers],
                "runs": [list(run) for run in self.runs]}


def _branch_nodes(branch_output: ir.Value, stream_value: ir.Value, stops: set[ir.Value]) -> list[ir.Node] | None:
    """Nodes that depend on ``stream_value`` and feed ``branch_output``; None if it does not depend."""
    ancestors: dict[ir.Node, None] = {}
    pending = [branch_output]
    seen_values: set[ir.Value] = set()
    while pending:
        value = pending.pop()
        if value in seen_values or value in stops or value is stream_value:
            continue
        seen_values.add(value)
        node = value.producer()
        if node is None or node in ancestors:
            continue
        ancestors[node] = None
        pending.extend(v for v in node.inputs if v is not None)
    # Which ancestors depend on the stream value: memoised post-order DFS over the ancestor set.
    depends: dict[ir.Value, bool] = {stream_value: True}
    for root in ancestors:
        stack = [(root, False)]
        while stack:
            node, inputs_done = stack.pop()
            if node.outputs[0] in depends:
                continue
            inputs = [v for v in node.inputs if v is not None and v not in depends]
            producers = [v.producer() for v in inputs]
            if not inputs_done and any(p in ancestors for p in producers):
                stack.append((node, True))
                stack.extend((p, False) for p in producers if p in ancestors)
                continue
            result = any(depends.get(v, False) for v in node.inputs if v is not None)
            for out in node.outputs:
                depends[out] = result
    branch = [node for node in ancestors if depends.get(node.outputs[0], False)]
    return branch if depends.get(branch_output, False) else None


def _stream_aliases(x: ir.Value) -> list[ir.Value]:
    """``x`` and no-op Casts/Identities of it (the TorchScript exporter reuses the norm's
    float32 Cast of ``x`` as the residual)."""
    aliases = [x]
    for value in aliases:  # grows while iterating: chains of casts (e.g. after a branch was removed)
        for use in list(value.uses()):
            node = use.node
            # Without type information (legacy exports) a Cast that feeds a residual Add can only
            # be a no-op: a real cast would change the stream's dtype.
            to = node.attributes.get("to")
            if node.op_type == "Identity" or (
                node.op_type == "Cast" and (x.dtype is None or (to is not None and to.value == x.dtype))
            ):
                if node.outputs[0] not in aliases:
                    aliases.append(node.outputs[0])
    return aliases


def _next_residual_add(x: ir.Value, stops: set[ir.Value]) -> tuple[ir.Value, ir.Node, ir.Value, list[ir.Node]] | None:
    """The Add consuming ``x`` (or a no-op cast of it) whose other operand is computed from it."""
    for alias in _stream_aliases(x):
        found = _residual_add_on(alias, stops)
        if found is not None:
            return (alias, *found)
    return None


def _residual_add_on(x: ir.Value, stops: set[ir.Value]) -> tuple[ir.Node, ir.Value, list[ir.Node]] | None:
    """The residual Add on ``x``; of several (a block-parallel window adds ``x`` to each member's
    attention output inside its branch), the outermost: the one whose branch is the largest."""
    found = []
    for use in list(x.uses()):
        node = use.node
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        other = node.inputs[1 - use.idx]
        if other is x or other is None:
            continue
        branch = _branch_nodes(other, x, stops)
        if branch:
            found.append((node, other, branch))
    return max(found, key=lambda candidate: len(candidate[2]), default=None)


def _classify(branch: list[ir.Node], branch_output: ir.Value, x: ir.Value, add: ir.Node):
    """Returns ``("attention", None)``, ``("ffn", parts)`` or ``("unknown", reason)``."""
    ops = {node.op_type for node in branch}
    if ops & ATTENTION_OP_TYPES:
        parallel = _parallel_parts(branch, branch_output, x)
        return ("parallel", parallel) if parallel is not None else ("attention", None)
    parts = match_ffn(branch_output, x)
    if isinstance(parts, str):
        return "unknown", parts
    matched = set(parts["nodes"])
    extra = [node for node in branch if node not in matched]
    if extra:
        kinds = ", ".join(sorted({node.op_type for node in extra}))
        return "unknown", f"gated FFN with extra nodes ({kinds}) that ffnfusion cannot fold"
    parts["nodes"] = (*parts["nodes"], add)
    return "ffn", parts


def _parallel_parts(branch: list[ir.Node], branch_output: ir.Value, x: ir.Value) -> dict | None:
    """``branch_output = attn(n1(x)) + ffn(n2(x))``: the FFN's parts plus ``inner_add`` (that sum),
    ``ffn_output`` and ``attention_nodes``; None when the branch is attention alone."""
    inner = op_matchers.producer(op_matchers.skip_casts(branch_output), "Add")
    if inner is None or len(inner.inputs) != 2:
        return None
    inside = set(branch)
    for ffn_value in (inner.inputs[1], inner.inputs[0]):
        parts = match_ffn(ffn_value, x)
        if isinstance(parts, str) or not set(parts["nodes"]) <= inside:
            continue
        ffn_nodes = set(parts["nodes"]) | set(parts["norm"].nodes)
        attention_nodes = [n for n in branch if n not in ffn_nodes and n is not inner]
        if {n.op_type for n in attention_nodes} & ATTENTION_OP_TYPES:
            return {"ffn": parts, "inner_add": inner, "ffn_output": ffn_value, "attention_nodes": tuple(attention_nodes)}
    return None


def iter_residual_branches(graph: ir.Graph) -> Iterator[tuple[ir.Value, ir.Node, ir.Value, list[ir.Node]]]:
    """Yield ``(x, residual_add, branch_output, branch_nodes)`` along the stream."""
    x = find_embedding_output(graph)
    stops = {x}
    while (found := _next_residual_add(x, stops)) is not None:
        x, add, branch_output, branch = found
        yield x, add, branch_output, branch
        x = add.outputs[0]
        stops.add(x)


def fused_spans_of(model: ir.Model) -> dict[int, int]:
    """``{first: last}`` for FFNs that ffnfusion fused earlier (recorded in the model metadata),
    so that a fused model keeps the original ``model.layers.N`` numbering."""
    text = model.metadata_props.get(FUSED_GROUPS_METADATA, "")
    spans = {}
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        if first.isdigit() and last.isdigit():
            spans[int(first)] = int(last)
    return spans


def layers_in_metadata(model: ir.Model, key: str) -> list[int]:
    from ffnfusion.passes.layer_ranges import parse_layers

    text = model.metadata_props.get(key, "")
    return parse_layers(text) if text else []


def layer_groups_in_metadata(model: ir.Model, key: str) -> list[list[int]]:
    from ffnfusion.passes.layer_ranges import parse_groups

    text = model.metadata_props.get(key, "")
    return parse_groups(text) if text else []


def find_blocks(model: ir.Model) -> BlockMap:
    """Walk the residual stream of ``model`` and return its :class:`BlockMap`; ``model`` is not
    changed. The walk needs the canonical form (:mod:`~ffnfusion.passes.canonical`: Skip norms split,
    small constant arithmetic folded): inside a rewrite (``with rewriting(model)``) the model is in
    it and the map points into ``model``; otherwise a graph that is not canonical is walked as a
    canonical clone, whose values the map then holds (reading and planning need nothing else)."""
    model = canonical_view(model)
    graph = model.graph
    fused_spans = fused_spans_of(model)
    empty_layers = set(layers_in_metadata(model, EMPTY_LAYERS_METADATA))
    attention_only = set(layers_in_metadata(model, ATTENTION_ONLY_METADATA))
    windows = {window[0]: window[-1] for window in layer_groups_in_metadata(model, PARALLEL_WINDOWS_METADATA)}
    layers: list[DecoderLayer] = []
    pending_attention: AttentionBlock | None = None
    count = 0
    index = 0  # original decoder-layer index of the next stream position
    for x, add, branch_output, branch in iter_residual_branches(graph):
        count += 1
        upcoming = next(i for i in range(index, index + len(empty_layers) + 1) if i not in empty_layers)
        if pending_attention is None and upcoming in windows:
            index = upcoming
            layers.append(DecoderLayer(index, True, None, last=windows[index],
                                       window=WindowBlock(x, add.outputs[0], add, tuple(branch))))
            index = windows[index] + 1
            continue
        kind, detail = _classify(branch, branch_output, x, add)
        if kind == "parallel":
            if pending_attention:
                layers.append(DecoderLayer(index, True, None, NO_FFN_BRANCH, attention_block=pending_attention))
                index, pending_attention = index + 1, None
            while index in empty_layers:
                index += 1
            parts = detail["ffn"]
            attention = AttentionBlock(x, detail["inner_add"].outputs[0], detail["inner_add"], detail["attention_nodes"],
                                       bypass=detail["ffn_output"])
            both = FFNBlock(layer=index, input=x, output=add.outputs[0], residual_add=add,
                            **{**parts, "nodes": (*parts["nodes"], detail["inner_add"], add)})
            layers.append(DecoderLayer(index, True, both, attention_block=attention, parallel=True))
            index += 1
            continue
        if kind == "attention":
            if pending_attention:  # two attention branches in a row: a layer without FFN
                why = FFN_REMOVED if index in attention_only else NO_FFN_BRANCH
                layers.append(DecoderLayer(index, True, None, why, attention_block=pending_attention))
                index += 1
            while index in empty_layers:
                index += 1
            pending_attention = AttentionBlock(x, add.outputs[0], add, tuple(branch))
            continue
        if pending_attention is not None and index in attention_only:
            layers.append(DecoderLayer(index, True, None, FFN_REMOVED, attention_block=pending_attention))
            index, pending_attention = index + 1, None
        if pending_attention is None:
            while index in empty_layers:
                index += 1
        last = fused_spans.get(index) if kind == "ffn" else None
        ffn = FFNBlock(layer=index, input=x, output=add.outputs[0], residual_add=add, **detail) \
            if kind == "ffn" else None
        layers.append(DecoderLayer(index, pending_attention is not None, ffn,
                                   None if ffn else detail, last=last, attention_block=pending_attention))
        index = (index if last is None else last) + 1
        pending_attention = None
    if pending_attention:
        layers.append(DecoderLayer(index, True, None, NO_FFN_BRANCH, attention_block=pending_attention))
    if not layers:
        raise BlockRecognitionError(
            f"found {count} residual branches after the embedding; expected a chain of "
            "Add(x, branch(x)) nodes (pre-norm decoder layers)"
        )
    if not any(layer.ffn for layer in layers):
        reasons = sorted({layer.unknown for layer in layers if layer.unknown})
        raise BlockRecognitionError(
            f"found {len(layers)} decoder layers but no gated FFN: {'; '.join(reasons) or 'none'}"
        )
    return BlockMap(tuple(layers))
