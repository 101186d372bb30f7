"""TensorRT engines from ffnfusion's ONNX models (TensorRT 10/11 Python API).

* networks are strongly typed: precision comes from the graph's dtypes (TensorRT 11 removed the
  FP16/BF16 builder flags; the STRONGLY_TYPED creation flag is required in 10 and ignored in 11);
* one optimisation profile with min/opt/max shapes in trtexec's syntax (``input_ids:1x1,...``);
* ``OnnxParser.parse_from_file`` resolves external data next to the model;
* parser errors are reported with the failing node's name and operator.

TensorRT is optional (``pip install ffnfusion[tensorrt]`` from NVIDIA's index); without it every
entry point raises :class:`TensorRTUnavailable`, which the CLI turns into exit code 3.
"""

from __future__ import annotations

import dataclasses
import pathlib

import onnx_ir as ir

from ffnfusion.errors import FFNFusionError, UsageError

DEFAULT_WORKSPACE_MIB = 4096


class TensorRTUnavailable(FFNFusionError):
    """``import tensorrt`` failed."""

    exit_code = 3


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as err:
        raise TensorRTUnavailable(
            f"TensorRT is not installed ({err}); install it with `pip install tensorrt` on a machine with an "
            "NVIDIA GPU (the wheels come from NVIDIA's package index), or build with the printed trtexec command"
        ) from None
    return tensorrt


Shapes = dict[str, tuple[int, ...]]


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
            raise UsageError(f"bad shape {item!r}: expected NAME:DxDx..., e.g. input_ids:1x128") from None
    return shapes


def format_shapes(shapes: Shapes) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims)}" for name, dims in shapes.items())


@dataclasses.dataclass
class Profile:
    min: Shapes
    opt: Shapes
    max: Shapes


def default_profile(model_path: str | pathlib.Path, *, max_batch: int = 8, opt_seq: int = 128,
                    max_seq: int = 512) -> Profile:
    """min/opt/max for every input: batch 1/1/max_batch, sequence 1/opt/max, past length 0/opt/max
    (a KV-cache ``attention_mask`` covers past + new tokens)."""
    model = ir.load(model_path)
    profile = Profile({}, {}, {})
    kv_model = any((v.name or "").startswith("past_key_values") for v in model.graph.inputs)
    for value in model.graph.inputs:
        dims = list(value.shape) if value.shape is not None else []
        name = value.name
        if name.startswith("past_key_values") and len(dims) == 4:
            heads, head_dim = int(dims[1]), int(dims[3])
            profile.min[name], profile.opt[name], profile.max[name] = (
                (1, heads, 0, head_dim), (1, heads, opt_seq, head_dim), (max_batch, heads, max_seq, head_dim))
        elif len(dims) == 2:
            total = 2 if kv_model and name == "attention_mask" else 1
            profile.min[name] = (1, 1)
            profile.opt[name] = (1, opt_seq * total)
            profile.max[name] = (max_batch, max_seq * total)
        else:
            raise UsageError(f"no default shape for input {name} {dims}; pass --min/--opt/--max-shapes")
    return profile


def trtexec_command(model: str, plan: str, profile: Profile, workspace_mib: int, timing_cache: str | None) -> str:
    parts = ["trtexec", f"--onnx={model}", f"--saveEngine={plan}", "--stronglyTyped",
             f"--minShapes={format_shapes(profile.min)}", f"--optShapes={format_shapes(profile.opt)}",
             f"--maxShapes={format_shapes(profile.max)}", f"--memPoolSize=workspace:{workspace_mib}M"]
    if timing_cache:
        parts.append(f"--timingCacheFile={timing_cache}")
    return " ".join(parts)


def build_engine(model: str, plan: str, profile: Profile, *, workspace_mib: int = DEFAULT_WORKSPACE_MIB,
                 timing_cache: str | None = None, log=print) -> pathlib.Path:
    """Parse ``model``, build a strongly typed engine with ``profile``, write ``plan`` atomically."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model)):
        errors = []
        for index in range(parser.num_errors):
            error = parser.get_error(index)
            errors.append(f"node {error.node_name() or error.node()} ({error.node_operator()}): {error.desc()}")
        raise FFNFusionError(f"TensorRT's ONNX parser rejected {model}: " + "; ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib * 2**20)
    optimization_profile = builder.create_optimization_profile()
    for name in profile.min:
        optimization_profile.set_shape(name, profile.min[name], profile.opt[name], profile.max[name])
    config.add_optimization_profile(optimization_profile)
    cache_path = pathlib.Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    log(f"build-engine: building {model} (this takes minutes)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FFNFusionError(f"TensorRT could not build an engine for {model} (see the messages above)")
    from ffnfusion.atomic import atomic_path

    with atomic_path(plan) as tmp:
        tmp.write_bytes(bytes(serialized))
    if cache_path is not None:
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return pathlib.Path(plan)


def run_engine(plan: str, feeds: dict, output: str = "logits"):
    """Run the engine on numpy ``feeds`` (CUDA buffers through torch); returns ``output`` as numpy."""
    trt = import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise FFNFusionError("run-engine needs a CUDA GPU")
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(pathlib.Path(plan).read_bytes())
    context = engine.create_execution_context()
    buffers = {}
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            buffers[name] = torch.from_numpy(feeds[name]).cuda().contiguous()
            context.set_input_shape(name, tuple(feeds[name].shape))
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            dtype = torch.from_numpy(trt.nptype(engine.get_tensor_dtype(name))(0).reshape(1)).dtype
            buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
    for name, tensor in buffers.items():
        context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise FFNFusionError("TensorRT execution failed")
    stream.synchronize()
    return buffers[output].cpu().numpy()
