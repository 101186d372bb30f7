"""The *units* of a decoder's residual stream: the blocks of FFN Fusion's dependency analysis.

An attention-free layer contributes its FFN (kind ``ffn``), any other layer its whole residual
update (kind ``layer``); a layer with attention and no recognised FFN is kind ``attention``; a window
of blocks run side by side (:mod:`~ffnfusion.passes.block_parallel`) is one unit (kind ``window``). Each
unit names the stream values it reads and writes, which is where :class:`~ffnfusion.runtime.block_runner.BlockRunner`
cuts the graph."""

from __future__ import annotations

import dataclasses

from ffnfusion.core.errors import BlockRecognitionError, UnknownLayerError
from ffnfusion.passes.block_map import BlockMap, DecoderLayer


@dataclasses.dataclass(frozen=True)
class Unit:
    index: int
    layer: int  # first decoder layer (a previously fused FFN spans several)
    last_layer: int
    kind: str  # "layer" | "ffn" | "attention" | "window" (whole blocks side by side)
    input: str  # stream value names
    output: str
    attention_output: str | None  # x + attn(n(x)), for layers with attention
    ffn_input: str | None  # the stream value the FFN branch reads (may be a no-op Cast of the above)

    def to_dict(self) -> dict:
        entry = {"index": self.index, "layer": self.layer, "kind": self.kind}
        if self.last_layer != self.layer:
            entry["last_layer"] = self.last_layer
        return entry


def units_of(block_map: BlockMap) -> list[Unit]:
    units: list[Unit] = []
    for layer in block_map.layers:
        units.append(_unit(len(units), layer))
    return units


def _unit(index: int, layer: DecoderLayer) -> Unit:
    if layer.window is not None:  # blocks side by side: one piece, stream in to stream out
        window = layer.window
        assert window.input.name is not None and window.output.name is not None
        return Unit(index, layer.index, layer.span[-1], "window", window.input.name, window.output.name, None, None)
    attention, ffn = layer.attention_block, layer.ffn
    if layer.of_unknown_kind:
        # a branch the runner cannot cut around: running the model without it would be wrong
        raise UnknownLayerError(f"layer {layer.index} is of a kind ffnfusion does not know ({layer.unknown})")
    if ffn is None and attention is None:
        raise BlockRecognitionError(f"layer {layer.index} has neither attention nor a recognised FFN")
    if ffn is None:
        assert attention is not None
        kind, start, end = "attention", attention.input, attention.output
    else:
        kind = "layer" if attention is not None else "ffn"
        start = attention.input if attention is not None else ffn.input
        end = ffn.output
    # a parallel-residual layer has no x + attn(n(x)) value: its attention and FFN read x together
    assert start.name is not None and end.name is not None  # exported and loaded graphs name every value
    return Unit(index, layer.index, layer.span[-1], kind, start.name, end.name,
                attention.output.name if attention is not None and not layer.parallel else None,
                ffn.input.name if ffn is not None else None)
