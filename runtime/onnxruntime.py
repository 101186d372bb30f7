"""ONNX Runtime helpers: sessions (from files or in-memory onnx-ir models) and default feeds."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pathlib
import weakref

import numpy as np
import onnx_ir as ir

from ffnfusion.core.errors import InvalidArgumentError, ModelRunError

logger = logging.getLogger(__name__)
# Session -> the KV head size its graph leaves symbolic (ORT GenAI builder models): recorded where
# the session is made, read by default_feeds.
_PAST_HEAD_SIZES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _options(threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers etc. are noise here
    if threads:
        options.intra_op_num_threads = threads
    return options


GENAI_CONFIG = "genai_config.json"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}


def create_session(path: str | os.PathLike, threads: int | None = None, provider: str = "cpu"):
    """An ``InferenceSession`` on ``provider`` (cpu | cuda | tensorrt), falling back to the CPU with
    one warning (logged) when that provider does not really load (onnxruntime-gpu lists CUDA and
    TensorRT even on machines without a GPU)."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise InvalidArgumentError(f"unknown provider {provider!r}: choose from {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    providers = [wanted] if wanted == PROVIDERS["cpu"] else [wanted, PROVIDERS["cpu"]]
    if wanted not in ort.get_available_providers():
        logger.warning(f"warning: {wanted} is not in this onnxruntime build; using the CPU")
        providers = [PROVIDERS["cpu"]]
    # A provider that fails to load logs (and prints, for TensorRT) a wall of errors: we say it once.
    ort.set_default_logger_severity(4)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            session = ort.InferenceSession(str(path), _options(threads), providers=providers)
    except Exception as err:  # ORT raises its own exception types for invalid graphs
        raise ModelRunError(f"ONNX Runtime cannot load {path}: {str(err).splitlines()[0]}") from err
    finally:
        ort.set_default_logger_severity(3)
    if providers[0] != PROVIDERS["cpu"] and session.get_providers()[0] != wanted:
        logger.warning(f"warning: {wanted} did not load (no usable GPU or libraries); running on the CPU")
    _PAST_HEAD_SIZES[session] = genai_head_size(pathlib.Path(path).parent)
    return session


def genai_head_size(directory: pathlib.Path) -> int | None:
    """ORT GenAI builder models leave the KV head size symbolic in the graph; their
    ``genai_config.json`` states it (``model.decoder.head_size``)."""
    try:
        return int(json.loads((directory / GENAI_CONFIG).read_text())["model"]["decoder"]["head_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def session_from_model(model: ir.Model, base_dir: str | os.PathLike, threads: int | None = None, *,
                       arena: bool = True, shared_arena: bool = False, prepack: bool = True):
    """A session for an in-memory model whose external weights live in ``base_dir`` (nothing is
    written to disk: ORT reads the serialized graph and memory-maps the original data file).
    ``arena=False`` returns the session's activation memory to the system when it is dropped (for
    the short-lived sessions of a block-streamed run)."""
    return session_from_bytes(ir.serde.serialize_model(model).SerializeToString(), base_dir, threads, arena=arena,
                              shared_arena=shared_arena, prepack=prepack)


def session_from_bytes(data: bytes, base_dir: str | os.PathLike, threads: int | None = None, *,
                       arena: bool = True, shared_arena: bool = False, prepack: bool = True,
                       past_head_size: int | None = None, provider: str = "cpu"):
    """:func:`session_from_model` for an already serialized model (``past_head_size``: the KV head
    size of a graph that leaves it symbolic, :func:`genai_head_size`; ``provider``: a key of
    :data:`PROVIDERS`, the CPU behind it). ``shared_arena``: allocate from
    one process-wide CPU arena (many sessions kept side by side would each grow their own).
    ``prepack=False``: no packed copy of the weights (for a session run once or twice, the copy
    costs more time and memory than it saves)."""
    import onnxruntime as ort

    options = _options(threads)
    options.enable_cpu_mem_arena = arena
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if shared_arena:
        # Many sessions run one after another, each with its own thread pool: a finished session's
        # workers would spin on the cores the next one needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        _register_shared_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
    options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                     str(pathlib.Path(base_dir).resolve()))
    providers = [PROVIDERS["cpu"]] if provider == "cpu" else [PROVIDERS[provider], PROVIDERS["cpu"]]
    session = ort.InferenceSession(data, options, providers=providers)
    _PAST_HEAD_SIZES[session] = past_head_size
    return session


_SHARED_ARENA: list[bool] = []


def _register_shared_arena() -> None:
    import onnxruntime as ort

    if not _SHARED_ARENA:
        memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, -1, -1, -1))
        _SHARED_ARENA.append(True)


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def default_feeds(session, input_ids: np.ndarray, **given) -> dict[str, np.ndarray]:
    """Feeds for a full-sequence forward pass: ``attention_mask`` of ones, ``position_ids``
    0..S-1 and empty (length-0) KV-cache tensors, whatever subset of these the model takes."""
    input_ids = np.asarray(input_ids, dtype=np.int64)
    batch, seq = input_ids.shape
    feeds = {}
    for spec in session.get_inputs():
        name = spec.name
        if name in given:
            feeds[name] = given[name]
        elif name == "input_ids":
            feeds[name] = input_ids
        elif name == "attention_mask":
            feeds[name] = np.ones_like(input_ids)
        elif name == "position_ids":
            feeds[name] = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
        elif name.startswith("past_key_values") and len(spec.shape) == 4:
            _, heads, _, head_dim = spec.shape
            if not isinstance(head_dim, int):
                head_dim = _PAST_HEAD_SIZES.get(session)
            if not (isinstance(heads, int) and isinstance(head_dim, int)):
                raise ModelRunError(f"input {name} has no static head sizes {spec.shape}")
            feeds[name] = np.zeros((batch, heads, 0, head_dim), _NUMPY_TYPES.get(spec.type, np.float32))
        else:
            raise ModelRunError(f"the model needs input {name!r}, which ffnfusion cannot fill in")
    return feeds


def run_logits(session, input_ids: np.ndarray) -> np.ndarray:
    """Logits for ``input_ids`` [batch, seq] with a full attention mask and an empty KV cache."""
    return session.run(["logits"], default_feeds(session, input_ids))[0]
