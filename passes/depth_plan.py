"""Depth plans: which sublayers of a decoder stay, and the moves a depth search makes.

A decoder of L Llama-style layers runs ``2L`` sequential sublayer steps (attention, then FFN, per
layer). Steps saved, per move:

* remove attention j, or FFN j: 1 (the residual passes straight through);
* remove block j (both): 2;
* fuse: two neighbouring FFNs (or fused groups) with no attention left between them become one wide
  FFN, saving 1 (a group of k FFNs saves k − 1; :mod:`ffnfusion.passes.ffn_fusion` is exact);
* parallel: a window of k whole, untouched blocks (attention and FFN) run side by side
  (:mod:`ffnfusion.passes.block_parallel`), saving 2k − 2; its members take no other move.

:class:`DepthPlan` is the state; :class:`DepthReductionPass` writes it into a model (attention
removal, FFN removal, fusion, and any refitted down projections), so a plan found by the search on
one machine is a model file anywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from ffnfusion.core.errors import InvalidPlanError
from ffnfusion.passes.attention_removal import AttentionRemovalPass
from ffnfusion.passes.block_map import BlockMap, FFNBlock
from ffnfusion.passes.block_parallel import BlockParallelPass
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.canonical import RewritePass
from ffnfusion.passes.ffn_fusion import FFNFusionPass
from ffnfusion.passes.ffn_removal import FFNRemovalPass
from ffnfusion.passes.layer_ranges import format_ranges
from ffnfusion.passes.streaming import read_rows

STEPS_SAVED = {"attention": 1, "ffn": 1, "block": 2, "fuse": 1}


@dataclasses.dataclass(frozen=True, order=True)
class Move:
    """One step of a depth search. ``layers``: the layer removed, or the fused group a ``fuse``
    makes (first..last)."""

    kind: str
    layers: tuple[int, ...]

    @property
    def saved(self) -> int:
        if self.kind == "parallel":  # k attentions and k FFNs become one attention step and one FFN step
            return 2 * len(self.layers) - 2
        return STEPS_SAVED[self.kind]

    def __str__(self) -> str:
        if self.kind in ("fuse", "parallel"):
            return f"{self.kind} {format_ranges(self.layers)}"
        return f"remove {self.kind} {self.layers[0]}"

    def to_dict(self) -> dict:
        return {"move": self.kind, "layers": [self.layers[0], self.layers[-1]] if self.kind in ("fuse", "parallel")
                else self.layers[0], "steps_saved": self.saved}


@dataclasses.dataclass(frozen=True)
class DepthPlan:
    """What stays of a decoder of ``num_layers`` layers. ``groups``: fused FFN runs ``(first, last)``."""

    num_layers: int
    removed_attention: frozenset[int] = frozenset()
    removed_ffn: frozenset[int] = frozenset()
    groups: tuple[tuple[int, int], ...] = ()
    windows: tuple[tuple[int, int], ...] = ()  # whole blocks run side by side, (first, last)

    @classmethod
    def of(cls, block_map: BlockMap) -> DepthPlan:
        """The plan a model already is. A depth search starts from an unfused model in which every
        layer has a recognised FFN (attention may be missing)."""
        for layer in block_map.layers:
            if layer.ffn is None or len(layer.span) > 1:
                what = ("has a fused FFN" if layer.ffn is not None else
                        f"runs side by side with layers {layer.index}-{layer.last} (a block-parallel window)"
                        if layer.window is not None else f"has no recognised FFN ({layer.unknown})")
                raise InvalidPlanError(f"layer {layer.index} {what}; a depth search starts from the "
                                       "exported model (every layer with its FFN, nothing fused)")
        return cls(block_map.num_layers,
                   frozenset(layer.index for layer in block_map.layers if not layer.attention))

    @property
    def original_steps(self) -> int:
        return 2 * self.num_layers

    @property
    def steps(self) -> int:
        ffns = self.num_layers - len(self.removed_ffn) - sum(last - first for first, last in self.groups)
        parallel = sum(2 * (last - first) for first, last in self.windows)
        return self.num_layers - len(self.removed_attention) + ffns - parallel

    @property
    def saved(self) -> int:
        return self.original_steps - self.steps

    def group_of(self, layer: int) -> tuple[int, int] | None:
        return next((g for g in self.groups if g[0] <= layer <= g[1]), None)

    def window_of(self, layer: int) -> tuple[int, int] | None:
        return next((w for w in self.windows if w[0] <= layer <= w[1]), None)

    def whole(self, layer: int) -> bool:
        """Layer ``layer`` is as exported: attention and its own FFN, in no group and no window."""
        return (layer not in self.removed_attention and layer not in self.removed_ffn
                and self.group_of(layer) is None and self.window_of(layer) is None)

    def ffn_span(self, layer: int) -> tuple[int, int] | None:
        """``(first, last)`` of the FFN computing at layer ``layer``'s position (its group, or just
        the layer); None when the FFN is removed."""
        if layer in self.removed_ffn:
            return None
        return self.group_of(layer) or (layer, layer)

    def legal_moves(self, window: int = 0) -> list[Move]:
        """Every move possible from this plan; ``window``: the largest window of whole blocks a
        ``parallel`` move may run side by side (0: none)."""
        moves = []
        for layer in range(self.num_layers):
            if self.window_of(layer) is not None:
                continue  # a window's members take no other move
            attention = layer not in self.removed_attention
            ffn = layer not in self.removed_ffn and self.group_of(layer) is None
            if attention:
                moves.append(Move("attention", (layer,)))
            if ffn:
                moves.append(Move("ffn", (layer,)))
            if attention and ffn:
                moves.append(Move("block", (layer,)))
        for layer in range(1, self.num_layers):
            left, right = self.ffn_span(layer - 1), self.ffn_span(layer)
            if (left and right and left != right and layer in self.removed_attention
                    and self.window_of(layer - 1) is None and self.window_of(layer) is None):
                moves.append(Move("fuse", tuple(range(left[0], right[1] + 1))))
        for size in range(2, window + 1):
            for first in range(self.num_layers - size + 1):
                if all(self.whole(layer) for layer in range(first, first + size)):
                    moves.append(Move("parallel", tuple(range(first, first + size))))
        return moves

    def can_fuse(self, first: int, last: int) -> bool:
        """FFNs ``first..last`` all present, no attention between them, no group cut in two."""
        spans = [self.ffn_span(layer) for layer in range(first, last + 1)]
        present = [span for span in spans if span is not None]
        return (last > first and len(present) == len(spans) and present[0][0] == first and present[-1][1] == last
                and len(set(present)) > 1 and all(j in self.removed_attention for j in range(first + 1, last + 1)))

    def apply(self, move: Move) -> DepthPlan:
        contiguous = move.layers == tuple(range(move.layers[0], move.layers[-1] + 1))
        if move.kind == "fuse":
            legal = contiguous and self.can_fuse(move.layers[0], move.layers[-1])
        elif move.kind == "parallel":
            legal = contiguous and len(move.layers) >= 2 and all(self.whole(layer) for layer in move.layers)
        else:
            legal = move in self.legal_moves()
        if not legal:
            raise InvalidPlanError(f"{move} is not possible here")
        layer = move.layers[0]
        if move.kind == "attention":
            return dataclasses.replace(self, removed_attention=self.removed_attention | {layer})
        if move.kind == "ffn":
            return dataclasses.replace(self, removed_ffn=self.removed_ffn | {layer})
        if move.kind == "block":
            return dataclasses.replace(self, removed_attention=self.removed_attention | {layer},
                                       removed_ffn=self.removed_ffn | {layer})
        first, last = move.layers[0], move.layers[-1]
        if move.kind == "parallel":
            return dataclasses.replace(self, windows=tuple(sorted([*self.windows, (first, last)])))
        groups = [g for g in self.groups if not first <= g[0] <= last] + [(first, last)]
        return dataclasses.replace(self, groups=tuple(sorted(groups)))

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "sequential_steps": self.steps, "steps_saved": self.saved,
                "removed_attention": sorted(self.removed_attention), "removed_ffn": sorted(self.removed_ffn),
                "fused_groups": [list(g) for g in self.groups], "parallel_windows": [list(w) for w in self.windows]}

    @classmethod
    def from_dict(cls, data: Mapping) -> DepthPlan:
        return cls(int(data["num_layers"]), frozenset(data.get("removed_attention", ())),
                   frozenset(data.get("removed_ffn", ())), tuple(tuple(g) for g in data.get("fused_groups", ())),
                   tuple(tuple(w) for w in data.get("parallel_windows", ())))


class DepthReductionPass(RewritePass):
    """Write a :class:`DepthPlan` into a model: attention removed, FFNs removed, groups fused,
    ``down_deltas`` (first layer of an FFN or group -> ``ΔW`` as ``[width, hidden]`` float32) added to
    those down projections (the search's closed-form repairs), windows of whole blocks side by side."""

    def __init__(self, plan: DepthPlan, down_deltas: Mapping[int, np.ndarray] | None = None,
                 target: str = "gpu", keep_kv_io: bool = False):
        super().__init__()
        self.plan = plan
        self.down_deltas = dict(down_deltas or {})
        self.target = target
        self.keep_kv_io = keep_kv_io

    def rewrite(self, model: ir.Model) -> ir.passes.PassResult:
        start = DepthPlan.of(find_blocks(model))
        if start.num_layers != self.plan.num_layers:
            raise InvalidPlanError(f"the plan is for {self.plan.num_layers} layers; the model has {start.num_layers}")
        attention = sorted(self.plan.removed_attention - start.removed_attention)
        if attention:
            AttentionRemovalPass(attention, keep_kv_io=self.keep_kv_io)(model)
        if self.plan.removed_ffn:
            FFNRemovalPass(self.plan.removed_ffn)(model)
        if self.plan.groups:
            FFNFusionPass([list(range(a, b + 1)) for a, b in self.plan.groups], self.target)(model)
        block_map = find_blocks(model)
        for first, delta in self.down_deltas.items():
            add_to_down(block_map.ffn(first), delta)
        if self.plan.windows:  # last: its members' refits are written into their own FFNs first
            BlockParallelPass([list(range(a, b + 1)) for a, b in self.plan.windows])(model)
        return ir.passes.PassResult(model, modified=True)


def add_to_down(block: FFNBlock, delta: np.ndarray) -> None:
    """``W_down += Δ`` (``Δ`` as ``[width, hidden]``; rows past it, a fused group's zero padding,
    stay), summed in float32 and stored in the weight's own dtype and layout."""
    down = block.down
    rows, hidden = down.shape_in_out
    if delta.shape[1] != hidden or delta.shape[0] > rows:
        raise InvalidPlanError(f"a down-projection update of shape {delta.shape} does not fit {down.name} "
                               f"({rows}x{hidden})")
    weight = read_rows(down, 0, rows).astype(np.float32)
    weight[:len(delta)] += delta
    down.set_in_out(weight)
