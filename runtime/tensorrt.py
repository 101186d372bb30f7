"""TensorRT engines from ffnfusion's ONNX models (TensorRT 10.x and 11.x Python API).

* networks are strongly typed: precision comes from the graph's dtypes. In TensorRT 10 the
  ``STRONGLY_TYPED`` creation flag opts in (weak typing still exists there); TensorRT 11 removed weak
  typing and the FP16/BF16 builder flags, and ignores the (deprecated) flag;
* TF32 is off by default (``tf32=False``): TensorRT enables it for float32 math, which moves float32
  logits ~1e-3 away from ONNX Runtime's; ``--tf32`` turns it back on for speed;
* one optimisation profile with min/opt/max shapes in trtexec's syntax (``input_ids:1x1,...``), merged
  with the defaults and checked (min <= opt <= max, one batch size per point, the KV-cache mask
  covering past + new tokens) *before* TensorRT is imported, so a bad profile fails here, on any machine;
* ``OnnxParser.parse_from_file`` resolves external data next to the model; parser errors name the
  failing node and operator.

TensorRT is optional (``pip install 'tensorrt>=10,<12'`` on a machine with an NVIDIA GPU); without it,
or when it cannot create a builder (CUDA/driver mismatch), entry points raise
:class:`TensorRTUnavailableError` (CLI: exit code 3).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import onnx_ir as ir

from ffnfusion.core.errors import InvalidArgumentError, TensorRTError, TensorRTUnavailableError
from ffnfusion.core.files import atomic_path

logger = logging.getLogger(__name__)

DEFAULT_WORKSPACE_MIB = 4096
SUPPORTED_MAJORS = (10, 11)


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as err:
        raise TensorRTUnavailableError(
            f"TensorRT is not installed ({err}); install it with `pip install 'tensorrt>=10,<12'` on a machine "
            "with an NVIDIA GPU, or build with the printed trtexec command") from None
    major = int(str(tensorrt.__version__).split(".")[0])
    if major not in SUPPORTED_MAJORS:
        raise TensorRTUnavailableError(f"TensorRT {tensorrt.__version__} is installed; ffnfusion supports "
                                       f"TensorRT {' and '.join(f'{m}.x' for m in SUPPORTED_MAJORS)}")
    return tensorrt


_TRT_LOGGER = None


def _trt_logger(trt):
    """One TensorRT logger per process (TensorRT warns when builder and runtime get different ones)."""
    global _TRT_LOGGER
    if _TRT_LOGGER is None:
        _TRT_LOGGER = trt.Logger(trt.Logger.WARNING)
    return _TRT_LOGGER


def _create(what: str, factory):
    """``trt.Builder``/``trt.Runtime``: a CUDA or driver problem surfaces as a TypeError or None."""
    try:
        made = factory()
    except (TypeError, RuntimeError) as err:
        made, detail = None, str(err).splitlines()[0] if str(err) else type(err).__name__
    else:
        detail = "it returned None"
    if made is None:
        raise TensorRTUnavailableError(f"TensorRT cannot create a {what} here ({detail}); check that an NVIDIA GPU "
                                       "is visible and the CUDA driver matches TensorRT's")
    return made


# --- shapes and the optimisation profile ------------------------------------------------------------

Shapes = dict[str, tuple[int, ...]]
POINTS = ("min", "opt", "max")


def parse_shapes(text: str) -> Shapes:
    """trtexec syntax ``input_ids:1x128,attention_mask:1x128`` -> ``{"input_ids": (1, 128), ...}``."""
    shapes: Shapes = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, dims = item.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.split("x"))
        except ValueError:
            raise InvalidArgumentError(f"bad shape {item!r}: expected NAME:DxDx..., e.g. input_ids:1x128") from None
        if any(d < 0 for d in shapes[name]):
            raise InvalidArgumentError(f"bad shape {item!r}: dimensions must be >= 0")
    return shapes


def format_shapes(shapes: Shapes) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims)}" for name, dims in shapes.items())


@dataclasses.dataclass
class Profile:
    min: Shapes
    opt: Shapes
    max: Shapes
    # Inputs with no default shape (not 2-D tokens or 4-D KV cache, or symbolic head sizes): they must
    # come from the overrides.
    unknown: dict[str, list] = dataclasses.field(default_factory=dict)

    def point(self, name: str) -> Shapes:
        return getattr(self, name)


def default_profile(model_path: str | pathlib.Path, *, max_batch: int = 8, opt_seq: int = 128,
                    max_seq: int = 512) -> Profile:
    """min/opt/max for every input: batch 1/1/max_batch, sequence 1/opt/max, past length 0/opt/max
    (a KV-cache ``attention_mask`` covers past + new tokens). Inputs without a default are listed in
    ``Profile.unknown``; :func:`merge_profile` requires overrides for them."""
    model = ir.load(model_path)
    profile = Profile({}, {}, {})
    kv_model = any((v.name or "").startswith("past_key_values") for v in model.graph.inputs)
    for value in model.graph.inputs:
        dims = list(value.shape) if value.shape is not None else []
        name = value.name or ""
        heads, head_dim = (dims[1], dims[3]) if len(dims) == 4 else (None, None)
        if name.startswith("past_key_values") and isinstance(heads, int) and isinstance(head_dim, int):
            profile.min[name], profile.opt[name], profile.max[name] = (
                (1, heads, 0, head_dim), (1, heads, opt_seq, head_dim), (max_batch, heads, max_seq, head_dim))
        elif len(dims) == 2:
            total = 2 if kv_model and name == "attention_mask" else 1
            profile.min[name] = (1, 1)
            profile.opt[name] = (1, opt_seq * total)
            profile.max[name] = (max_batch, max_seq * total)
        else:
            profile.unknown[name] = [str(d) for d in dims]
    return profile


def merge_profile(profile: Profile, overrides: dict[str, Shapes]) -> Profile:
    """Apply ``{"min"|"opt"|"max": shapes}`` overrides, keep the rest consistent, and check it all.

    * a point the user left out is clamped into the range the user gave (``--max-shapes
      input_ids:2x64`` lowers the default opt 1x128 to 1x64);
    * in KV-cache models ``attention_mask`` follows ``past + sequence`` at every point unless given
      explicitly, and the past tensors follow the batch of ``input_ids``;
    * then every input needs ``min <= opt <= max`` per dimension, one rank, and at each point one batch
      size and ``mask = past + sequence``. Any violation: :class:`InvalidArgumentError`, one line.
    """
    merged = Profile({**profile.min}, {**profile.opt}, {**profile.max})
    given: dict[str, set[str]] = {}
    for point, shapes in overrides.items():
        for name, dims in shapes.items():
            if name not in profile.min and name not in profile.unknown:
                known = ", ".join([*profile.min, *profile.unknown])
                raise InvalidArgumentError(f"--{point}-shapes names {name!r}, which is not a model input ({known})")
            merged.point(point)[name] = tuple(dims)
            given.setdefault(name, set()).add(point)
    missing = [name for name in profile.unknown if given.get(name, set()) != set(POINTS)]
    if missing:
        name = missing[0]
        raise InvalidArgumentError(f"input {name} {profile.unknown[name]} has no default shape; give it in "
                                   "--min-shapes, --opt-shapes and --max-shapes")
    for name, points in given.items():  # clamp what the user left out into what they gave
        if name not in profile.min or len(points) == 3:
            continue
        low, high = merged.min[name], merged.max[name]
        if len(low) == len(high) == len(merged.opt[name]):
            if "opt" not in points:
                merged.opt[name] = tuple(min(max(o, lo), hi) for o, lo, hi in zip(merged.opt[name], low, high))
            if "min" not in points:
                merged.min[name] = tuple(min(m, o) for m, o in zip(low, merged.opt[name]))
    _follow_cache_relations(merged, given)
    _check_profile(merged)
    return merged


def _past_inputs(profile: Profile) -> list[str]:
    return [name for name in profile.min if name.startswith("past_key_values")]


def _follow_cache_relations(profile: Profile, given: dict[str, set[str]]) -> None:
    """Derive what the user did not give from what they did: mask = past + seq; past and
    position_ids follow the batch (and position_ids the sequence) of input_ids."""
    pasts = _past_inputs(profile)
    if "input_ids" not in profile.min:
        return
    for point in POINTS:
        shapes = profile.point(point)
        batch, seq = shapes["input_ids"][0], shapes["input_ids"][-1]
        for name in pasts:
            if point not in given.get(name, set()) and len(shapes[name]) == 4:
                past = shapes[name]
                shapes[name] = (batch, past[1], past[2], past[3])
        if "position_ids" in shapes and point not in given.get("position_ids", set()):
            shapes["position_ids"] = (batch, seq)
        if "attention_mask" in shapes and point not in given.get("attention_mask", set()):
            past_len = shapes[pasts[0]][2] if pasts else 0
            shapes["attention_mask"] = (batch, past_len + seq)


def _check_profile(profile: Profile) -> None:
    for name in profile.min:
        low, opt, high = profile.min[name], profile.opt[name], profile.max[name]
        if not len(low) == len(opt) == len(high):
            raise InvalidArgumentError(f"profile for {name}: min {low}, opt {opt}, max {high} have different ranks")
        for axis, (a, b, c) in enumerate(zip(low, opt, high)):
            if not a <= b <= c:
                raise InvalidArgumentError(
                    f"profile for {name}: axis {axis} needs min <= opt <= max, got {a} <= {b} <= {c} "
                    f"(min {format_shapes({name: low})}, opt {format_shapes({name: opt})}, "
                    f"max {format_shapes({name: high})})")
    pasts = _past_inputs(profile)
    for point in POINTS:
        shapes = profile.point(point)
        batches = {name: dims[0] for name, dims in shapes.items() if dims and (name in ("input_ids", "attention_mask",
                                                                                         "position_ids") or name in pasts)}
        if len(set(batches.values())) > 1:
            raise InvalidArgumentError(f"{point} shapes disagree on the batch size: "
                                       + ", ".join(f"{n} {b}" for n, b in batches.items()))
        if "input_ids" in shapes and "attention_mask" in shapes:
            past_len = {shapes[name][2] for name in pasts if len(shapes[name]) == 4}
            if len(past_len) > 1:
                raise InvalidArgumentError(f"{point} shapes give the past tensors different lengths {sorted(past_len)}")
            expected = (past_len.pop() if past_len else 0) + shapes["input_ids"][-1]
            if shapes["attention_mask"][-1] != expected:
                raise InvalidArgumentError(
                    f"{point} shapes: attention_mask has length {shapes['attention_mask'][-1]}, but past + sequence = "
                    f"{expected} (the mask covers the cached and the new tokens)")


def trtexec_command(model: str, plan: str, profile: Profile, workspace_mib: int, timing_cache: str | None,
                    tf32: bool = False) -> str:
    parts = ["trtexec", f"--onnx={model}", f"--saveEngine={plan}", "--stronglyTyped",
             f"--minShapes={format_shapes(profile.min)}", f"--optShapes={format_shapes(profile.opt)}",
             f"--maxShapes={format_shapes(profile.max)}", f"--memPoolSize=workspace:{workspace_mib}M"]
    if not tf32:
        parts.append("--noTF32")
    if timing_cache:
        parts.append(f"--timingCacheFile={timing_cache}")
    return " ".join(parts)


# --- build and run ---------------------------------------------------------------------------------

def build_engine(model: str, plan: str, profile: Profile, *, workspace_mib: int = DEFAULT_WORKSPACE_MIB,
                 timing_cache: str | None = None, tf32: bool = False) -> pathlib.Path:
    """Parse ``model``, build a strongly typed engine with ``profile`` (checked: :func:`merge_profile`),
    write ``plan`` atomically (and the timing cache, if asked)."""
    _check_profile(profile)
    trt = import_tensorrt()
    trt_logger = _trt_logger(trt)
    builder = _create("builder", lambda: trt.Builder(trt_logger))
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(model)):
        errors = []
        for index in range(parser.num_errors):
            error = parser.get_error(index)
            errors.append(f"node {error.node_name() or error.node()} ({error.node_operator()}): {error.desc()}")
        raise TensorRTError(f"TensorRT's ONNX parser rejected {model}: " + "; ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib * 2**20)
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    optimization_profile = builder.create_optimization_profile()
    for name in profile.min:
        try:
            optimization_profile.set_shape(name, profile.min[name], profile.opt[name], profile.max[name])
        except (RuntimeError, TypeError) as err:
            raise TensorRTError(f"TensorRT refused the profile for {name}: {str(err).splitlines()[0]}") from None
    if config.add_optimization_profile(optimization_profile) < 0:
        raise TensorRTError("TensorRT refused the optimisation profile (see its messages above)")
    cache_path = pathlib.Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        logger.warning(f"build-engine: timing cache {cache_path} does not match this TensorRT/GPU; building without it")
    logger.info(f"build-engine: building {model} (this takes minutes)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"TensorRT could not build an engine for {model} (see the messages above)")
    with atomic_path(plan) as tmp:
        tmp.write_bytes(bytes(serialized))
    if cache_path is not None and config.get_timing_cache() is not None:
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return pathlib.Path(plan)


def torch_dtype(trt, dtype):
    """``trt.DataType`` -> torch dtype (``trt.nptype`` has no bfloat16)."""
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT8: torch.int8, trt.DataType.BOOL: torch.bool}
    for name, torch_type in (("BF16", torch.bfloat16), ("INT64", torch.int64), ("UINT8", torch.uint8)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = torch_type
    if dtype not in table:
        raise TensorRTError(f"engine tensor type {dtype} has no torch equivalent here")
    return table[dtype]


def run_engine(plan: str, feeds: dict, output: str = "logits"):
    """Run the engine on numpy ``feeds`` (CUDA buffers through torch, cast to the engine's input
    types); returns ``output`` as float32 numpy."""
    trt = import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailableError("run-engine needs a CUDA GPU")
    runtime = _create("runtime", lambda: trt.Runtime(_trt_logger(trt)))
    engine = runtime.deserialize_cuda_engine(pathlib.Path(plan).read_bytes())
    if engine is None:
        raise TensorRTError(f"cannot deserialize {plan}: built by another TensorRT version or for another GPU?")
    context = engine.create_execution_context()
    if context is None:
        raise TensorRTError("TensorRT could not create an execution context (out of GPU memory?)")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    buffers = {}
    for name in inputs:
        if name not in feeds:
            raise TensorRTError(f"the engine takes input {name!r}, which the feeds lack")
        tensor = torch.from_numpy(feeds[name]).to(torch_dtype(trt, engine.get_tensor_dtype(name)))
        buffers[name] = tensor.cuda().contiguous()
        if not context.set_input_shape(name, tuple(feeds[name].shape)):
            raise TensorRTError(f"input {name} shape {tuple(feeds[name].shape)} is outside the engine's profile")
    for name in names:
        if name not in buffers:
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise TensorRTError(f"output {name} has unresolved shape {shape}")
            buffers[name] = torch.empty(shape, dtype=torch_dtype(trt, engine.get_tensor_dtype(name)), device="cuda")
    for name, tensor in buffers.items():
        # Empty tensors (a past of length 0) have no memory; TensorRT accepts any address for them.
        if not context.set_tensor_address(name, tensor.data_ptr()) and tensor.numel():
            raise TensorRTError(f"TensorRT refused the buffer for {name}")
    stream = torch.cuda.Stream()  # not the default stream: TensorRT synchronises it on every call
    if not context.execute_async_v3(stream.cuda_stream):
        raise TensorRTError("TensorRT execution failed (see its messages above)")
    stream.synchronize()
    return buffers[output].float().cpu().numpy()
