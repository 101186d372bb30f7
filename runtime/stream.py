"""Run a decoder's residual stream piece by piece with ONNX Runtime.

* :meth:`StreamRunner.capture` runs the whole graph once and returns the residual stream at every
  block boundary (extra graph outputs, no second pass).
* :meth:`StreamRunner.run_unit` runs one block on any stream value: a session holding only that
  block's nodes, with the stream value as its input. Dependency analysis chains these to recompute a
  stretch of the stream with one block skipped, instead of re-running the whole graph.

The *units* are the blocks of FFN Fusion's dependency analysis: an attention-free layer contributes
its FFN (kind ``ffn``), any other layer its whole residual update (kind ``layer``).
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from ffnfusion.core.errors import BlockRecognitionError
from ffnfusion.core.model_io import load_model, model_file
from ffnfusion.passes.blocks import BlockMap, DecoderLayer, find_blocks, find_embedding_output
from ffnfusion.runtime.onnxruntime import default_feeds, session_from_model


@dataclasses.dataclass(frozen=True)
class Unit:
    index: int
    layer: int  # first decoder layer (a previously fused FFN spans several)
    last_layer: int
    kind: str  # "layer" | "ffn" | "attention"
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
    units = []
    for layer in block_map.layers:
        units.append(_unit(len(units), layer))
    return units


def _unit(index: int, layer: DecoderLayer) -> Unit:
    attention, ffn = layer.attention_block, layer.ffn
    if ffn is None and attention is None:
        raise BlockRecognitionError(f"layer {layer.index} has neither attention nor a recognised FFN")
    if ffn is None:
        kind, start, end = "attention", attention.input, attention.output
    else:
        kind = "layer" if attention is not None else "ffn"
        start = attention.input if attention is not None else ffn.input
        end = ffn.output
    return Unit(index, layer.index, layer.span[-1], kind, start.name, end.name,
                attention.output.name if attention is not None else None,
                ffn.input.name if ffn is not None else None)


class StreamRunner:
    """Captures and recomputes the residual stream of one ONNX model."""

    def __init__(self, model_path: str | pathlib.Path, threads: int | None = None):
        self.path = model_file(model_path)
        self.threads = threads
        model = load_model(self.path)
        self.block_map = find_blocks(model)
        self.units = units_of(self.block_map)
        self.stream_dtype = find_embedding_output(model.graph).producer().inputs[0].const_value.dtype
        self._capture_names = list(dict.fromkeys(
            name for unit in self.units
            for name in (unit.input, unit.attention_output, unit.output) if name
        ))
        self._capture_session = None
        self._span_sessions: dict[tuple[str, str], object] = {}

    def _fresh_model(self) -> tuple[ir.Model, dict[str, ir.Value]]:
        model = load_model(self.path)
        values = {v.name: v for node in model.graph for v in node.outputs if v.name}
        return model, values

    def capture(self, input_ids: np.ndarray, with_logits: bool = True) -> dict[str, np.ndarray]:
        """Every unit boundary (and attention output) for ``input_ids``, plus ``logits``."""
        if self._capture_session is None:
            model, values = self._fresh_model()
            extra = [values[name] for name in self._capture_names if not values[name].is_graph_output()]
            model.graph.outputs.extend(extra)
            self._capture_session = session_from_model(model, self.path.parent, self.threads)
        wanted = self._capture_names + (["logits"] if with_logits else [])
        arrays = self._capture_session.run(wanted, default_feeds(self._capture_session, input_ids))
        return dict(zip(wanted, arrays))

    def run_unit(self, index: int, stream: np.ndarray, input_ids: np.ndarray) -> np.ndarray:
        """Unit ``index`` applied to ``stream`` (its input replaced): the stream value after it."""
        unit = self.units[index]
        return self._run_span(unit.input, unit.output, stream, input_ids)

    def run_to_logits(self, start: str, stream: np.ndarray, input_ids: np.ndarray) -> np.ndarray:
        """The logits when the stream value named ``start`` is replaced by ``stream``."""
        return self._run_span(start, "logits", stream, input_ids)

    def _run_span(self, start: str, end: str, stream: np.ndarray, input_ids: np.ndarray) -> np.ndarray:
        session = self._span_sessions.get((start, end))
        if session is None:
            session = self._span_sessions[start, end] = self._build_span_session(start, end)
        feeds = default_feeds(session, input_ids, stream_in=stream.astype(self.stream_dtype.numpy(), copy=False))
        return session.run(None, feeds)[0]

    def _build_span_session(self, start_name: str, end_name: str):
        """A session computing ``end_name`` from a new input ``stream_in`` that replaces ``start_name``."""
        model, values = self._fresh_model()
        graph = model.graph
        end = values.get(end_name) or next(v for v in graph.outputs if v.name == end_name)
        start = values.get(start_name) or next(v for v in graph.inputs if v.name == start_name)
        stream_in = ir.val("stream_in", self.stream_dtype, ["batch", "sequence", start.shape[-1] if start.shape else None])
        ir.convenience.replace_all_uses_with(start, stream_in)
        graph.inputs.append(stream_in)
        graph.outputs.clear()
        graph.outputs.append(end)
        RemoveUnusedNodesPass()(model)
        for value in [v for v in graph.inputs if not v.uses()]:
            graph.inputs.remove(value)
        return session_from_model(model, self.path.parent, self.threads)
