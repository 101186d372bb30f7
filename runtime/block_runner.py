"""Run a decoder one block at a time: the residual stream of all tokens stays in memory, the weights
of one block at a time are loaded. ``BlockRunner(model, streamed=True)`` runs models larger than RAM.

The model is cut along its residual stream into pieces, each an ONNX Runtime session built from the
model's own subgraph (so whatever the exporter wrote runs as it is):

* the embedding: graph inputs -> the first block's input;
* each unit (:mod:`ffnfusion.runtime.units`): its input stream -> its output, plus the
  attention output and the FFN's input for the per-block metrics;
* the head: the last block's output -> ``logits``, position by position (so it runs on any slice of
  tokens).

``streamed=True`` builds a piece's session when it is needed and drops it afterwards: only that
piece's weights are resident (ORT reads external data for the initializers the piece uses). An FFN
whose weights exceed ``WIDE_FFN_BYTES`` (a fused group of 8B layers: 2.8 GB, and ORT holds about
twice a piece's weights while it loads them) runs in numpy instead, a block of its columns at a time
read from the file (:func:`~ffnfusion.runtime.ffn_reference.update`, float32); its attention, if
any, is still a session.
``streamed=False`` keeps every session: the whole model in memory, no rebuilding. Both compute the
same numbers, batch for batch. Each piece runs on up to ``batch_tokens`` tokens at a time (whole
windows), so activations stay bounded too.

bfloat16 models are widened to float32 piece by piece (ONNX Runtime's CPU provider has no bfloat16
kernels); float16 runs as it is. How the pieces are cut from the model: :mod:`.model_pieces`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from ffnfusion.core.model_io import initializer_bytes, load_model, model_file
from ffnfusion.passes.block_map import FFNBlock
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.canonical import canonicalize
from ffnfusion.passes.dtype_widening import Float32WideningPass
from ffnfusion.passes.embedding import embedding_table, find_embedding_gather, find_embedding_output
from ffnfusion.passes.skip_norms import SPLIT_PREFIX
from ffnfusion.runtime.device import CPU, Device
from ffnfusion.runtime.ffn_reference import update
from ffnfusion.runtime.model_pieces import HeadProjection, ProtoSlicer, shared_values, weights_in_dir
from ffnfusion.runtime.onnxruntime import default_feeds, genai_head_size, session_from_bytes
from ffnfusion.runtime.units import units_of

logger = logging.getLogger(__name__)

DEFAULT_BATCH_TOKENS = 8192
FULL_COLLECT_BLOCK_BYTES = 64 << 20  # above this per block, a full gc.collect after each streamed piece
HEAD_ROWS = 1024  # final-stream rows per head run: [1024, vocab] logits at a time
HEAD = "head"
EMBEDDING = "embedding"
SHARED = "shared"
HEAD_SLICED = "head (projection fed by vocabulary slices)"
WIDE_FFN_BYTES = 1 << 30  # streamed: an FFN with more weight bytes runs by column blocks in numpy
# In-RAM needs the weights (float32 when widened) plus ONNX Runtime's copy while a session loads.
IN_RAM_FACTOR = 2.0


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes); physical memory where that file is missing."""
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_streamed(model_path: str | os.PathLike, stream: bool | None) -> bool:
    """``stream`` if given (``--stream``/``--no-stream``); else stream when the model's weights would
    not fit comfortably in the memory available now. Logs the choice and why."""
    model = load_model(model_file(model_path))
    weights = initializer_bytes(model)
    if _stream_dtype(model) == ir.DataType.BFLOAT16:
        weights *= 2  # widened to float32 to run
    available = available_memory()
    if stream is None:
        stream = weights * IN_RAM_FACTOR > available
        why = (f"{weights / 2**30:.1f} GiB of weights x{IN_RAM_FACTOR:g} vs {available / 2**30:.1f} GiB available")
    else:
        why = "forced by --stream" if stream else "forced by --no-stream"
    logger.info(f"run: {'block-streamed' if stream else 'in RAM'} ({why})")
    return stream


def _sublayers(unit) -> int:
    if unit.kind == "window":  # every member's attention and FFN
        return 2 * (unit.last_layer - unit.layer + 1)
    return 2 if unit.kind == "layer" else 1


def forward_equivalents(runners, reference: BlockRunner, tokens: int) -> float:
    """The sublayers ``runners`` ran, in full forwards of ``reference`` over ``tokens`` tokens."""
    return sum(r.sublayer_tokens for r in runners) / max(1, reference.sublayers * tokens)


def _canonical(model: ir.Model) -> ir.Model:
    """Every fresh copy in the canonical form (:mod:`~ffnfusion.passes.canonical`) the same way, so
    value names match between copies and the block map points into the copy it describes."""
    canonicalize(model)
    return model


def _stream_dtype(model: ir.Model) -> ir.DataType:
    """The dtype of the embedding table, which is the residual stream's."""
    table = embedding_table(find_embedding_gather(model.graph))
    assert table is not None  # find_embedding_gather only returns Gathers from a table
    return table.dtype


class BlockRunner:
    """The pieces of one decoder, run block by block on all tokens at once (see module docstring)."""

    def __init__(self, source: str | os.PathLike | Callable[[], ir.Model], *, streamed: bool,
                 threads: int | None = None, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                 base_dir: str | os.PathLike | None = None, device: Device = CPU):
        """``source``: a path, or a function returning a fresh ``ir.Model`` each call (e.g. a model
        being rewritten in memory) whose external data lives in ``base_dir``. ``device``: where its
        sessions run (its provider), and where the code that reads its weights computes."""
        if callable(source):
            if base_dir is None:
                raise ValueError("BlockRunner(factory) needs base_dir, where the model's external data lives")
            self.path, self._fresh = pathlib.Path(base_dir) / "<in memory>", lambda: _canonical(source())
            self.base_dir = pathlib.Path(base_dir)
        else:
            self.path = model_file(source)
            self.base_dir = self.path.parent
            self._fresh = lambda: _canonical(load_model(self.path))  # lazy: external tensors are not read here
        self.streamed = streamed
        self.threads = threads
        self.device = device
        self.batch_tokens = batch_tokens
        model = self._fresh()
        self._split = any((n.name or "").startswith(SPLIT_PREFIX) for n in model.graph)
        self.block_map = find_blocks(model)
        self.units = units_of(self.block_map)
        # The work done, counted as the frontier counts it: tokens × sublayers (attention, FFN) run.
        self.sublayers = sum(_sublayers(unit) for unit in self.units)
        self.sublayer_tokens = 0
        dtype = _stream_dtype(model)
        self.widen = dtype == ir.DataType.BFLOAT16
        self.stream_dtype = ir.DataType.FLOAT if self.widen else dtype
        logits = next((v for v in model.graph.outputs if v.name == "logits"), None)
        last = logits.shape[-1] if logits is not None and logits.shape is not None else None
        self.vocab = last if isinstance(last, int) else None  # None: unknown until the head runs
        self.shared = shared_values(model.graph, find_embedding_output(model.graph))
        self._head_projection = HeadProjection.find(model)
        self._sessions: dict[object, Any] = {}  # key -> onnxruntime.InferenceSession
        self._piece_bytes: dict[object, bytes] = {}
        # Pieces are cut from the file's proto by value name, which only works when the graph is as
        # stored (Skip norms split in memory are not).
        self._slicer = (ProtoSlicer(self.path, model) if not callable(source) and not self.widen
                        and not self._split and weights_in_dir(model, self.base_dir) else None)
        self._shared_cache: dict[tuple, dict[str, np.ndarray]] = {}
        self.session_seconds = 0.0  # building sessions (reading weights): the price of streaming
        self._past_head_size = genai_head_size(self.base_dir)
        self._full_collect = initializer_bytes(model) / max(1, len(self.units)) > FULL_COLLECT_BLOCK_BYTES

    # --- the pieces ---------------------------------------------------------------------------------

    def embed(self, windows: np.ndarray) -> np.ndarray:
        """The first block's input for every window: ``[n, window, hidden]``."""
        with self._session(EMBEDDING) as run:
            return self._batched(windows, lambda ids, _: run(ids, None)[0])

    def run_unit(self, index: int, stream: np.ndarray, windows: np.ndarray) -> np.ndarray:
        """Unit ``index`` applied to ``stream`` [n, window, hidden] (loads it, or reuses it in RAM)."""
        with self.unit(index) as apply:
            return apply(stream, windows)[0]

    @contextlib.contextmanager
    def unit(self, index: int, extras: bool = False) -> Iterator[Callable[[np.ndarray, np.ndarray], list[np.ndarray]]]:
        """Yields ``apply(stream, windows) -> [output, *extras]`` for unit ``index``; with ``extras``,
        also :meth:`extras` (attention output, FFN input: asking for them costs ORT some fusions, so
        only the analysis does). Streamed: the weights are released on exit."""
        ffn = self._column_ffn(index)
        if ffn is not None:
            with self._unit_by_columns(index, ffn, extras) as apply:
                yield apply
            return
        with self._session(("unit", index, extras)) as run:
            def apply(stream: np.ndarray, windows: np.ndarray) -> list[np.ndarray]:
                self.sublayer_tokens += _sublayers(self.units[index]) * windows.size
                return self._batched(windows, run, stream)
            yield apply

    def _column_ffn(self, index: int) -> FFNBlock | None:
        """Streamed: unit ``index``'s FFN when its weights are too large to load at once, else None."""
        unit = self.units[index]
        layer = self.block_map.layer(unit.layer)
        ffn = layer.ffn
        if not self.streamed or ffn is None or layer.parallel or (unit.kind == "layer" and unit.attention_output is None):
            return None
        weights = [w for w in (ffn.gate, ffn.up, ffn.down) if w is not None]
        size = sum(w.value.const_value.nbytes for w in weights if w.value.const_value is not None)
        return ffn if size > WIDE_FFN_BYTES else None

    @contextlib.contextmanager
    def _unit_by_columns(self, index: int, ffn: FFNBlock, extras: bool):
        """:meth:`unit` for a wide FFN: its attention (if any) as a session, then ``x + ffn(x)`` in
        numpy, columns by blocks; the extras (attention output, FFN input) are both the stream between."""
        unit = self.units[index]
        with contextlib.ExitStack() as stack:
            attend = stack.enter_context(self.attention(index)) if unit.attention_output is not None else None

            def apply(stream: np.ndarray, windows: np.ndarray) -> list[np.ndarray]:
                middle = attend(stream, windows) if attend is not None else stream
                self.sublayer_tokens += windows.size  # the FFN (the attention counts itself)
                x = middle.reshape(-1, middle.shape[-1]).astype(np.float32)
                output = (x + update(ffn, x)).astype(middle.dtype).reshape(middle.shape)
                return [output, *([middle] * len(self.extras(index)) if extras else [])]
            yield apply

    @contextlib.contextmanager
    def attention(self, index: int) -> Iterator[Callable[[np.ndarray, np.ndarray], np.ndarray]]:
        """Yields ``apply(stream, windows) -> x + attn(n(x))`` for unit ``index``'s attention branch
        alone (the depth search runs FFNs itself)."""
        if self.units[index].attention_output is None:
            raise ValueError(f"unit {index} has no attention branch")
        with self._session(("attention", index)) as run:
            def apply(stream: np.ndarray, windows: np.ndarray) -> np.ndarray:
                self.sublayer_tokens += windows.size
                return self._batched(windows, run, stream)[0]
            yield apply

    def extras(self, index: int) -> list[str]:
        """Names of the extra outputs of unit ``index``: values inside the block the analysis reads."""
        unit = self.units[index]
        return [n for n in dict.fromkeys((unit.attention_output, unit.ffn_input)) if n and n != unit.input]

    @contextlib.contextmanager
    def head(self) -> Iterator[Callable[[np.ndarray], np.ndarray]]:
        """Yields ``logits(final_stream)`` for final-stream rows ``[tokens, hidden]`` (position-wise).

        A large output projection (a 128k vocabulary is 1 GB in float16, and ORT holds two to three
        times that while it loads) is not loaded whole: the head's session takes the projection as an
        input and runs once per slice of the vocabulary, each slice read from the data file when fed."""
        projection = self._head_projection
        sliced = projection is not None
        with self._session(HEAD_SLICED if sliced else HEAD) as run:
            def logits(rows: np.ndarray) -> np.ndarray:
                # Row blocks written into one array: no second copy of [tokens, vocab] to concatenate,
                # and ORT's arena reuses one block-sized output buffer.
                step = max(1, min(self.batch_tokens, HEAD_ROWS))
                out = None
                for start in range(0, len(rows), step):
                    chunk = rows[None, start:start + step]
                    if sliced:
                        assert projection is not None
                        part = np.concatenate([run(None, chunk, **fed)[0][0] for fed in projection.slices()], axis=-1)
                    else:
                        part = run(None, chunk)[0][0]
                    if out is None:
                        out = np.empty((len(rows), part.shape[-1]), part.dtype)
                    out[start:start + len(part)] = part
                assert out is not None, "no rows"
                return out
            yield logits

    def final_stream(self, windows: np.ndarray, progress=None) -> np.ndarray:
        """The last block's output for every window (the residual stream before the final norm)."""
        stream = self.embed(windows)
        for index in range(len(self.units)):
            stream = self.run_unit(index, stream, windows)
            if progress is not None:
                progress(index + 1, len(self.units), windows.size)
        return stream

    def run_units(self, first: int, last: int, stream: np.ndarray, windows: np.ndarray) -> np.ndarray:
        """Units ``first..last`` (inclusive) applied in turn to ``stream`` [n, window, hidden]."""
        for index in range(first, last + 1):
            stream = self.run_unit(index, stream, windows)
        return stream

    def logits(self, windows: np.ndarray) -> np.ndarray:
        """``[n, window, vocab]`` logits, block by block (for tests and small inputs)."""
        final = self.final_stream(windows)
        with self.head() as logits:
            return logits(final.reshape(-1, final.shape[-1])).reshape(*windows.shape, -1)

    # --- sessions -----------------------------------------------------------------------------------

    def _batched(self, windows: np.ndarray, run, stream: np.ndarray | None = None):
        """``run(ids, stream)`` on whole windows, ``batch_tokens`` tokens at a time; outputs concatenated."""
        per_batch = max(1, self.batch_tokens // windows.shape[1])
        results = [run(windows[s:s + per_batch], None if stream is None else stream[s:s + per_batch])
                   for s in range(0, len(windows), per_batch)]
        if isinstance(results[0], list):
            return [np.concatenate(parts) for parts in zip(*results)]
        return np.concatenate(results)

    @contextlib.contextmanager
    def _session(self, key):
        session = self._sessions.get(key)
        if session is None:
            start = time.perf_counter()
            session = self._build(key)
            self.session_seconds += time.perf_counter() - start
            if not self.streamed:
                self._sessions[key] = session
        stream_dtype = self.stream_dtype.numpy()
        wanted = {i.name for i in session.get_inputs()} & set(self.shared)

        def run(ids, stream, **fed):
            given = {} if stream is None else {"stream_in": stream.astype(stream_dtype, copy=False)}
            given.update(fed)
            if ids is None:  # the head: no token inputs
                return session.run(None, given)
            if wanted:
                given.update((name, value) for name, value in self._shared_for(ids).items() if name in wanted)
            return session.run(None, default_feeds(session, ids, **given))

        try:
            yield run
        finally:
            if self.streamed:
                del session, run
                # The session's weights go now, not when the cycle collector gets to them. A full
                # collection costs ~35 ms (the model's graph is large): worth it only for big blocks.
                gc.collect(2 if self._full_collect else 1)

    def _shared_for(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The shared values for this batch of token windows (computed once, the last few kept)."""
        key = (ids.shape, hash(ids.tobytes()))
        if key not in self._shared_cache:
            with self._session(SHARED) as run:
                values = run(ids, None)
            if len(self._shared_cache) >= 4:
                self._shared_cache.pop(next(iter(self._shared_cache)))
            self._shared_cache[key] = dict(zip(self.shared, values))
        return self._shared_cache[key]

    def _bounds(self, key) -> tuple[str | None, list[str], list[str]]:
        """``(stream input, outputs, fed shared values)`` of a piece, by value name."""
        if key == EMBEDDING:
            return None, [self.units[0].input], []
        if key in (HEAD, HEAD_SLICED):
            return self.units[-1].output, ["logits"], []
        if key == SHARED:
            return None, list(self.shared), []
        if key[0] == "attention":
            unit = self.units[key[1]]
            return unit.input, [unit.attention_output], list(self.shared)
        _, index, extras = key
        unit = self.units[index]
        return unit.input, [unit.output, *(self.extras(index) if extras else [])], list(self.shared)

    def _build(self, key):
        if key not in self._piece_bytes and self._slicer is not None and key != HEAD_SLICED:
            piece = self._slicer.piece(*self._bounds(key))
            if piece is not None:
                self._piece_bytes[key] = piece
        if key in self._piece_bytes:
            return self._session_from(self._piece_bytes[key], self.base_dir)
        model = self._fresh()
        graph = model.graph
        values = {v.name: v for node in graph for v in node.outputs if v.name}
        values.update({v.name: v for v in graph.inputs if v.name})
        start, ends, shared_names = self._bounds(key)
        shared = [values[name] for name in shared_names]
        outputs = [values[name] if name in values else next(v for v in graph.outputs if v.name == name)
                   for name in ends]
        if start is not None:
            value = values[start]
            last = value.shape[-1] if value.shape is not None else None
            hidden = last if isinstance(last, int) or last is None else str(last)
            stream_in = ir.val("stream_in", value.dtype or self.stream_dtype, ["batch", "sequence", hidden])
            ir.convenience.replace_all_uses_with(value, stream_in)
            graph.inputs.append(stream_in)
        for value in shared:  # computed once per batch by the SHARED piece: fed, not recomputed
            if value.uses():
                fed = ir.val(value.name, value.dtype, value.shape)
                ir.convenience.replace_all_uses_with(value, fed)
                graph.inputs.append(fed)
        graph.outputs.clear()
        graph.outputs.extend(outputs)
        if key == HEAD_SLICED:
            assert self._head_projection is not None  # HEAD_SLICED is only asked for when there is one
            self._head_projection.feed_as_input(model)
        RemoveUnusedNodesPass()(model)
        for unused in [v for v in graph.inputs if not v.uses() and not v.is_graph_output()
                       and v.name != "stream_in"]:
            graph.inputs.remove(unused)
        if self.widen:
            Float32WideningPass()(model)
        if not self.widen and weights_in_dir(model, self.base_dir):
            # ORT reads the piece's initializers from the model's own data file: nothing is copied,
            # and the serialized piece (graph only, a few KB) is kept to rebuild its session fast.
            self._piece_bytes[key] = ir.serde.serialize_model(model).SerializeToString()
            return self._session_from(self._piece_bytes[key], self.base_dir)
        # Widened or computed weights (a fused group, a refit) are in memory: a file of the piece
        # alone keeps the protobuf under 2 GB and lets ORT map them.
        scratch = pathlib.Path(tempfile.mkdtemp(prefix="ffnfusion-block-"))
        try:
            ir.save(model, scratch / "piece.onnx", external_data="piece.onnx.data")
            del model, graph, values, outputs
            piece = ir.serde.serialize_model(ir.load(scratch / "piece.onnx")).SerializeToString()
            return self._session_from(piece, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _session_from(self, piece: bytes, base_dir: pathlib.Path):
        # One arena for all pieces; a streamed piece runs once or twice, so packing its weights
        # would cost more than it saves.
        return session_from_bytes(piece, base_dir, self.threads, shared_arena=True, prepack=not self.streamed,
                                  past_head_size=self._past_head_size,  # ORT GenAI leaves it symbolic
                                  provider=self.device.provider)
