"""Run a decoder one block at a time: the residual stream of all tokens stays in memory, the weights
of one block at a time are loaded. ``BlockRunner(model, streamed=True)`` runs models larger than RAM.

The model is cut along its residual stream into pieces, each an ONNX Runtime session built from the
model's own subgraph (so whatever the exporter wrote runs as it is):

* the embedding: graph inputs -> the first block's input;
* each unit (:mod:`ffnfusion.runtime.stream`'s blocks): its input stream -> its output, plus the
  attention output and the FFN's input for the per-block metrics;
* the head: the last block's output -> ``logits``, position by position (so it runs on any slice of
  tokens).

``streamed=True`` builds a piece's session when it is needed and drops it afterwards: only that
piece's weights are resident (ORT reads external data for the initializers the piece uses).
``streamed=False`` keeps every session: the whole model in memory, no rebuilding. Both compute the
same numbers, batch for batch. Each piece runs on up to ``batch_tokens`` tokens at a time (whole
windows), so activations stay bounded too.

bfloat16 models are widened to float32 piece by piece (ONNX Runtime's CPU provider has no bfloat16
kernels); float16 runs as it is.
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

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from ffnfusion.core.model_io import initializer_bytes, load_model, model_file
from ffnfusion.passes.blocks import find_blocks, find_embedding_output
from ffnfusion.passes.dtype_widening import Float32WideningPass
from ffnfusion.runtime.onnxruntime import default_feeds, session_from_bytes, session_from_model
from ffnfusion.runtime.units import Unit, units_of

logger = logging.getLogger(__name__)

DEFAULT_BATCH_TOKENS = 8192
HEAD = "head"
EMBEDDING = "embedding"
SHARED = "shared"
HEAD_SLICED = "head (projection fed by vocabulary slices)"
HEAD_SLICE_BYTES = 128 * 2**20  # of the output projection fed at a time
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
    path = model_file(model_path)
    weights = initializer_bytes(load_model(path))
    if _needs_widening(path):
        weights *= 2
    available = available_memory()
    if stream is None:
        stream = weights * IN_RAM_FACTOR > available
        why = (f"{weights / 2**30:.1f} GiB of weights x{IN_RAM_FACTOR:g} vs {available / 2**30:.1f} GiB available")
    else:
        why = "forced by --stream" if stream else "forced by --no-stream"
    logger.info(f"run: {'block-streamed' if stream else 'in RAM'} ({why})")
    return stream


def _needs_widening(path: pathlib.Path) -> bool:
    model = load_model(path)
    return find_embedding_output(model.graph).producer().inputs[0].const_value.dtype == ir.DataType.BFLOAT16


class BlockRunner:
    """The pieces of one decoder, run block by block on all tokens at once (see module docstring)."""

    def __init__(self, source: str | os.PathLike | Callable[[], ir.Model], *, streamed: bool,
                 threads: int | None = None, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                 base_dir: str | os.PathLike | None = None):
        """``source``: a path, or a function returning a fresh ``ir.Model`` each call (e.g. a model
        being rewritten in memory) whose external data lives in ``base_dir``."""
        if callable(source):
            if base_dir is None:
                raise ValueError("BlockRunner(factory) needs base_dir, where the model's external data lives")
            self.path, self._fresh = pathlib.Path(base_dir) / "<in memory>", source
            self.base_dir = pathlib.Path(base_dir)
        else:
            self.path = model_file(source)
            self.base_dir = self.path.parent
            self._fresh = lambda: load_model(self.path)  # lazy: external tensors are not read here
        self.streamed = streamed
        self.threads = threads
        self.batch_tokens = batch_tokens
        model = self._fresh()
        self.block_map = find_blocks(model)
        self.units = units_of(self.block_map)
        dtype = find_embedding_output(model.graph).producer().inputs[0].const_value.dtype
        self.widen = dtype == ir.DataType.BFLOAT16
        self.stream_dtype = ir.DataType.FLOAT if self.widen else dtype
        logits = next((v for v in model.graph.outputs if v.name == "logits"), None)
        last = logits.shape[-1] if logits is not None and logits.shape is not None else None
        self.vocab = last if isinstance(last, int) else None  # None: unknown until the head runs
        self.shared = _shared_values(model.graph, find_embedding_output(model.graph))
        self._head_projection = _HeadProjection.find(model, self._fresh)
        self._sessions: dict[object, object] = {}
        self._piece_bytes: dict[object, bytes] = {}
        self._slicer = (_ProtoSlicer(self.path, model) if not callable(source) and not self.widen
                        and all(_in_base_dir(v.const_value, self.base_dir) for v in model.graph.initializers.values())
                        else None)
        self._shared_cache: dict[tuple, dict[str, np.ndarray]] = {}
        self.session_seconds = 0.0  # building sessions (reading weights): the price of streaming

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
        with self._session(("unit", index, extras)) as run:
            def apply(stream: np.ndarray, windows: np.ndarray) -> list[np.ndarray]:
                return self._batched(windows, run, stream)
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
        sliced = self._head_projection is not None
        with self._session(HEAD_SLICED if sliced else HEAD) as run:
            def logits(rows: np.ndarray) -> np.ndarray:
                step = max(1, self.batch_tokens)
                parts = []
                for start in range(0, len(rows), step):
                    chunk = rows[None, start:start + step]
                    if not sliced:
                        parts.append(run(None, chunk)[0][0])
                        continue
                    columns = [run(None, chunk, **fed)[0][0] for fed in self._head_projection.slices()]
                    parts.append(np.concatenate(columns, axis=-1))
                return np.concatenate(parts)
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
                gc.collect()  # the session's weights go now, not when the cycle collector gets to them

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
        _, index, extras = key
        unit: Unit = self.units[index]
        return unit.input, [unit.output, *(self.extras(index) if extras else [])], list(self.shared)

    def _build(self, key):
        if key not in self._piece_bytes and self._slicer is not None and key != HEAD_SLICED:
            piece = self._slicer.piece(*self._bounds(key))
            if piece is not None:
                self._piece_bytes[key] = piece
        if key in self._piece_bytes:
            return session_from_bytes(self._piece_bytes[key], self.base_dir, self.threads, shared_arena=True,
                                      prepack=not self.streamed)
        model = self._fresh()
        graph = model.graph
        values = {v.name: v for node in graph for v in node.outputs if v.name}
        values.update({v.name: v for v in graph.inputs})
        start, ends, shared_names = self._bounds(key)
        shared = [values[name] for name in shared_names]
        outputs = [values[name] if name in values else next(v for v in graph.outputs if v.name == name)
                   for name in ends]
        if start is not None:
            value = values[start]
            hidden = value.shape[-1] if value.shape is not None else None
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
            self._head_projection.feed_as_input(model)
        RemoveUnusedNodesPass()(model)
        for unused in [v for v in graph.inputs if not v.uses() and not v.is_graph_output()
                       and v.name != "stream_in"]:
            graph.inputs.remove(unused)
        if self.widen:
            Float32WideningPass()(model)
        if not self.widen and all(_in_base_dir(v.const_value, self.base_dir) for v in graph.initializers.values()):
            # ORT reads the piece's initializers from the model's own data file: nothing is copied,
            # and the serialized piece (graph only, a few KB) is kept to rebuild its session fast.
            self._piece_bytes[key] = ir.serde.serialize_model(model).SerializeToString()
            return session_from_bytes(self._piece_bytes[key], self.base_dir, self.threads, shared_arena=True,
                                      prepack=not self.streamed)
        # Widened or computed weights (a fused group, a refit) are in memory: a file of the piece
        # alone keeps the protobuf under 2 GB and lets ORT map them.
        scratch = pathlib.Path(tempfile.mkdtemp(prefix="ffnfusion-block-"))
        try:
            ir.save(model, scratch / "piece.onnx", external_data="piece.onnx.data")
            del model, graph, values, outputs
            return session_from_model(ir.load(scratch / "piece.onnx"), scratch, self.threads,
                                      shared_arena=True, prepack=not self.streamed)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


class _HeadProjection:
    """The head's output projection ``logits = h·W (+ b)``, when big enough to feed in slices."""

    def __init__(self, linear_output: str, weight_name: str, transposed: bool, bias_name: str | None, fresh):
        self.linear_output, self.weight_name, self.transposed, self.bias_name = (
            linear_output, weight_name, transposed, bias_name)
        self._fresh = fresh

    @classmethod
    def find(cls, model: ir.Model, fresh) -> _HeadProjection | None:
        """The last linear layer before ``logits``, through position-wise ops only (Cast, a softcap's
        Div/Tanh/Mul by constants): None when there is none or it is small."""
        from ffnfusion.passes import op_matchers

        value = next((v for v in model.graph.outputs if v.name == "logits"), None)
        while value is not None:
            linear = op_matchers.match_linear(value)
            if linear is not None:
                tensor = linear.weight.tensor
                if tensor.nbytes <= 2 * HEAD_SLICE_BYTES or linear.input is None:
                    return None
                return cls(value.name, linear.weight.value.name, linear.weight.transposed,
                           linear.bias.name if linear.bias is not None else None, fresh)
            node = value.producer()
            if node is None or node.op_type not in ("Cast", "Div", "Mul", "Tanh", "Identity"):
                return None
            value = next((v for v in node.inputs if v is not None and v.const_value is None), None)
        return None

    def feed_as_input(self, model: ir.Model) -> None:
        """Replace the projection by ``MatMul(h, head_weight) (+ head_bias)``, both graph inputs."""
        from ffnfusion.passes import op_matchers

        graph = model.graph
        output = next(v for node in graph for v in node.outputs if v.name == self.linear_output)
        linear = op_matchers.match_linear(output)
        hidden, vocab = linear.weight.shape_in_out
        weight = ir.val("head_weight", linear.weight.tensor.dtype, [hidden, "vocab_slice"])
        graph.inputs.append(weight)
        product = ir.node("MatMul", [linear.input, weight], name="ffnfusion/head/sliced_projection")
        graph.append(product)
        result = product.outputs[0]
        if linear.bias is not None:
            bias = ir.val("head_bias", linear.bias.const_value.dtype, ["vocab_slice"])
            graph.inputs.append(bias)
            add = ir.node("Add", [result, bias], name="ffnfusion/head/sliced_bias")
            graph.append(add)
            result = add.outputs[0]
        if output.is_graph_output():
            index, name = graph.outputs.index(output), output.name
            output.name = f"{name}/unsliced"  # removed with its node below
            graph.outputs[index] = result
            result.name = name
        ir.convenience.replace_all_uses_with(output, result)

    def slices(self) -> Iterator[dict[str, np.ndarray]]:
        """Feeds ``{head_weight[, head_bias]}`` for consecutive slices of the vocabulary, each read
        from the (memory-mapped) data file when it is made."""
        model = self._fresh()
        tensor = model.graph.initializers[self.weight_name].const_value
        bias = model.graph.initializers[self.bias_name].const_value.numpy() if self.bias_name else None
        rows, cols = tensor.shape.numpy()
        vocab, hidden = (rows, cols) if self.transposed else (cols, rows)
        step = max(1, HEAD_SLICE_BYTES // (hidden * tensor.dtype.numpy().itemsize))
        for start in range(0, vocab, step):
            stop = min(vocab, start + step)
            fed = {"head_weight": _read_slice(tensor, start, stop, self.transposed)}
            if bias is not None:
                fed["head_bias"] = np.ascontiguousarray(bias[start:stop])
            yield fed


def _read_slice(tensor, start: int, stop: int, transposed: bool) -> np.ndarray:
    """``W[:, start:stop]`` as ``[hidden, stop - start]`` (``W[start:stop].T`` when stored transposed),
    read with plain reads from an external data file: memory-mapping it would leave the whole
    projection resident."""
    rows, cols = tensor.shape.numpy()
    dtype = tensor.dtype.numpy()
    if not isinstance(tensor, ir.ExternalTensor):
        array = tensor.numpy()
        return np.ascontiguousarray(array[start:stop].T if transposed else array[:, start:stop])
    base = tensor.offset or 0
    with open(tensor.path, "rb") as data:
        if transposed:  # rows start..stop are contiguous
            data.seek(base + start * cols * dtype.itemsize)
            return np.ascontiguousarray(np.fromfile(data, dtype, (stop - start) * cols).reshape(stop - start, cols).T)
        out = np.empty((rows, stop - start), dtype)
        for row in range(rows):  # one contiguous run of columns per row
            data.seek(base + (row * cols + start) * dtype.itemsize)
            out[row] = np.fromfile(data, dtype, stop - start)
        return out


class _ProtoSlicer:
    """Pieces cut from the model's ``ModelProto`` directly: the nodes a piece needs are copied by
    protobuf (no onnx-ir round trip per piece), its weights stay references to the model's data file.
    ~10 ms a piece instead of ~150 ms for a re-load and rewrite, which matters when a streamed run
    builds every block's session on every pass."""

    def __init__(self, path: pathlib.Path, model: ir.Model):
        import onnx

        self.proto = onnx.load(str(path), load_external_data=False)
        graph = self.proto.graph
        self.producer = {name: i for i, node in enumerate(graph.node) for name in node.output if name}
        self.initializers = {init.name: init for init in graph.initializer}
        self.graph_inputs = {v.name: v for v in graph.input}
        self.types = {v.name: v for v in model.graph.inputs}
        self.types.update({v.name: v for node in model.graph for v in node.outputs if v.name})

    def piece(self, start: str | None, ends: list[str], fed: list[str]) -> bytes | None:
        import onnx
        from onnx import helper

        graph = self.proto.graph
        stop = set(fed) | ({start} if start else set())
        needed, stack, inputs, initializers = set(), list(ends), [], {}
        while stack:
            name = stack.pop()
            if name in stop or name in self.graph_inputs:
                if name not in inputs:
                    inputs.append(name)
                continue
            if name in self.initializers:
                initializers[name] = self.initializers[name]
                continue
            index = self.producer.get(name)
            if index is None or index in needed:
                continue
            needed.add(index)
            node = graph.node[index]
            stack.extend(n for n in node.input if n)
            for attribute in node.attribute:  # names read inside If/Loop bodies
                for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                    stack.extend(_outer_names(sub))
        nodes = []
        for index in sorted(needed):  # graph order: topological
            node = onnx.NodeProto()
            node.CopyFrom(graph.node[index])
            if start:
                node.input[:] = ["stream_in" if n == start else n for n in node.input]
            nodes.append(node)
        value_infos = []
        for name in inputs:
            value = self.types.get(name)
            if value is None or value.dtype is None:
                return None  # no type recorded for a piece input: the onnx-ir path infers it
            dims = None if value.shape is None else [d if isinstance(d, int) else str(d) for d in value.shape]
            value_infos.append(helper.make_tensor_value_info("stream_in" if name == start else name,
                                                             int(value.dtype), dims))
        if any(self.types.get(name) is None or self.types[name].dtype is None for name in ends):
            return None
        outputs = [helper.make_tensor_value_info(name, int(self.types[name].dtype), None) for name in ends]
        piece = helper.make_graph(nodes, f"piece_{ends[0]}", value_infos, outputs, list(initializers.values()))
        model = helper.make_model(piece, opset_imports=self.proto.opset_import, ir_version=self.proto.ir_version)
        model.functions.extend(self.proto.functions)
        return model.SerializeToString()


def _outer_names(graph) -> list[str]:
    """Names a subgraph reads from its enclosing scope (inputs of its nodes it does not produce)."""
    produced = {n for node in graph.node for n in node.output} | {v.name for v in graph.input} \
        | {init.name for init in graph.initializer}
    return [n for node in graph.node for n in node.input if n and n not in produced]


def _shared_values(graph: ir.Graph, embedding: ir.Value) -> list[str]:
    """Values every block reads that do not depend on the residual stream: computed from the graph
    inputs alone (the causal mask, rotary cos/sin), they would otherwise be recomputed in every
    block's piece. Constants (initializers, Constant nodes and what folds from them) are left out."""
    on_stream: set[ir.Value] = set()
    variable: set[ir.Value] = set(graph.inputs)
    for node in graph:  # graph order is topological
        inputs = [v for v in node.inputs if v is not None]
        if node.outputs and node.outputs[0] is embedding or any(v in on_stream for v in inputs):
            on_stream.update(node.outputs)
        elif any(v in variable for v in inputs):
            variable.update(node.outputs)
    shared = {}
    for node in graph:
        for value in node.inputs:
            if value is not None and value in variable and value not in on_stream and value.producer() is not None \
                    and any(v in on_stream for v in node.outputs) and value is not embedding \
                    and value.dtype is not None:  # fed values need a declared type
                shared[value.name] = None
    return [name for name in shared if name]


def _in_base_dir(tensor, base_dir: pathlib.Path) -> bool:
    """Small constants serialise inline; big in-memory tensors must not (the 2 GB protobuf limit)."""
    if isinstance(tensor, ir.ExternalTensor):
        return pathlib.Path(tensor.base_dir).resolve() == base_dir.resolve()
    return tensor is None or tensor.nbytes < 2**20
