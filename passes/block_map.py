"""What :func:`~.blocks.find_blocks` finds, as types the passes and stages share: the decoder layers
of a graph in stream order (:class:`BlockMap`), each with its attention and FFN branches
(:class:`AttentionBlock`, :class:`FFNBlock`) or the block-parallel window it runs in
(:class:`WindowBlock`); and the model metadata ffnfusion writes so that a rewritten model keeps the
original ``model.layers.N`` numbering, with its readers.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from ffnfusion.core.errors import InvalidPlanError, UnknownLayerError
from ffnfusion.passes import norm_matchers, op_matchers

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

    @property
    def of_unknown_kind(self) -> bool:
        """A branch is there that ffnfusion did not recognise (not merely no FFN, or one removed)."""
        return self.ffn is None and self.unknown not in (None, NO_FFN_BRANCH, FFN_REMOVED)

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
        if layer.of_unknown_kind:
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
