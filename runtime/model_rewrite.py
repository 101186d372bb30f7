"""Model files in, model files out: load, rewrite with the passes, save atomically, validate, and
copy the tokenizer and metadata beside the output. The library behind ``fuse_ffn(path, ...)`` and
the CLI's ``fuse`` and ``drop-attention``; progress goes to the ``ffnfusion`` logger.

Nothing is written on error: the output appears whole, validated, or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import time
from collections.abc import Callable, Sequence

import onnx_ir as ir

from ffnfusion.core.errors import InvalidArgumentError
from ffnfusion.core.files import write_json_atomically
from ffnfusion.core.model_io import COMPANION_FILES, METADATA_FILE, MODEL_FILE, load_model, model_file, save_model
from ffnfusion.passes.attention_removal import AttentionRemovalPass, AttentionRemovalResult
from ffnfusion.passes.block_parallel import BlockParallelPass, BlockParallelResult
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.canonical import rewriting
from ffnfusion.passes.ffn_fusion import FFNFusionPass
from ffnfusion.passes.layer_ranges import format_ranges
from ffnfusion.passes.plan import FusionPlan
from ffnfusion.runtime.device import Device
from ffnfusion.runtime.ffn_reference import check_refittable
from ffnfusion.runtime.validation import validate_model

logger = logging.getLogger(__name__)

NVIDIA_GPUS = pathlib.Path("/proc/driver/nvidia/gpus")  # one entry per GPU the NVIDIA driver sees



@dataclasses.dataclass(frozen=True)
class RepairOptions:
    """``fuse --repair``: how to refit the fused groups' down projections."""

    method: str = "refit"
    tokens: int | None = None  # default: calibration.DEFAULT_REPAIR_TOKENS
    lam: str | float = "auto"
    texts: tuple[str, ...] = ()
    ids_files: tuple[str, ...] = ()
    stream: bool | None = None  # run block by block (None: when the model would not fit in memory)
    device: str | Device = "auto"  # where the models' pieces run


def fuse_model_file(model_path: str | os.PathLike, out_path: str | os.PathLike, plan: FusionPlan, *,
                    validate: bool = True, target: str = "auto", repair: RepairOptions | None = None,
                    threads: int | None = None) -> dict:
    """Fuse the plan's groups (and repair them) into a new model; returns a summary. ``target``:
    ``gpu``, ``cpu`` or ``auto`` (:func:`resolve_target`)."""
    target, why = resolve_target(target)
    fusion = FFNFusionPass(plan, target)
    repair_pass = _repair_pass(model_path, plan, repair, target, threads) if repair else None
    reports = []

    def rewrite(model: ir.Model) -> None:
        # One pass after the other (not ir.passes.Sequential, which hides our errors in PassError
        # and drops the repair's report from its result).
        fusion(model)
        if repair_pass is not None:
            reports.append(repair_pass(model).report)

    def record(metadata: dict) -> None:
        metadata["fused_groups"] = metadata.get("fused_groups", []) + [list(g) for g in plan.groups]
        if reports:
            metadata["repair"] = metadata.get("repair", []) + [reports[0].to_dict()]

    what = f"fuse groups {plan.describe()}, {target} layout ({why})" + (f", repair ({repair.method})" if repair else "")
    summary = rewrite_model_file(model_path, out_path, rewrite, what, record, validate)
    summary["groups"] = [list(g) for g in plan.groups]
    if reports:
        summary["repair"] = reports[0].to_dict()
        logger.info(f"repair: {reports[0].describe()}")
    return summary


def resolve_target(target: str) -> tuple[str, str]:
    """``(layout, why)``. ``auto``: the ``cpu`` layout unless this machine has an NVIDIA GPU. The
    ``gpu`` layout (width unpadded) measured up to 3.5% slower than unfused on ONNX Runtime's CPU
    provider (README); the ``cpu`` layout costs a GPU at most 16 zero columns per group."""
    if target != "auto":
        return target, "--target " + target
    has_gpu = NVIDIA_GPUS.is_dir() and any(NVIDIA_GPUS.iterdir())
    return ("gpu", "auto: an NVIDIA GPU is present") if has_gpu else ("cpu", "auto: no NVIDIA GPU here")


def _repair_pass(model_path, plan: FusionPlan, options: RepairOptions, target: str, threads: int | None):
    from ffnfusion.runtime import calibration
    from ffnfusion.runtime.repair import RepairPass, lambda_grid

    lambdas = lambda_grid(options.lam)
    tokens = options.tokens or calibration.DEFAULT_REPAIR_TOKENS
    if tokens < calibration.DEFAULT_WINDOW:
        raise InvalidArgumentError(f"--repair-tokens must be at least one window ({calibration.DEFAULT_WINDOW})")
    path = model_file(model_path)
    blocks = find_blocks(load_model(path))
    for layer in blocks.layers:  # before the calibration text is read
        if layer.ffn is not None and any(layer.index in group for group in plan.groups):
            check_refittable(layer.ffn)
    sources = calibration.repair_sources(path.parent, texts=options.texts, ids_files=options.ids_files, tokens=tokens)
    logger.info(f"repair: sources {', '.join(f'{s.name} ({s.fit.size} fit + {s.select.size} held out)' for s in sources)}")
    return RepairPass(path, plan.groups, sources, method=options.method, lambdas=lambdas, target=target,
                      threads=threads, stream=options.stream, device=options.device)


def parallelize_model_file(model_path: str | os.PathLike, out_path: str | os.PathLike,
                           windows: Sequence[Sequence[int]] | str, *, validate: bool = True,
                           merge_cores: bool = True) -> dict:
    """Run each window of whole blocks side by side (:class:`BlockParallelPass`) into a new model;
    returns a summary with each window's layout."""
    parallel = BlockParallelPass(windows, merge_cores)
    results: list[BlockParallelResult] = []

    def rewrite(model: ir.Model) -> None:
        result = parallel(model)
        assert isinstance(result, BlockParallelResult)
        results.append(result)

    def record(metadata: dict) -> None:
        metadata["parallel_windows"] = metadata.get("parallel_windows", []) + [
            window.to_dict() for window in results[0].windows]

    label = ",".join(format_ranges(window) for window in parallel.windows)
    summary = rewrite_model_file(model_path, out_path, rewrite, f"run blocks side by side in {label}", record,
                                 validate)
    summary["windows"] = [window.to_dict() for window in results[0].windows]
    for window in results[0].windows:
        logger.info(f"window {window.first}-{window.last}: attention {window.attention}, cores: {window.core}; "
                    f"FFNs {window.ffn}; "
                    f"{window.saved_steps} sequential steps saved")
    return summary


def remove_attention_file(model_path: str | os.PathLike, out_path: str | os.PathLike, layers: Sequence[int], *,
                          validate: bool = True, keep_kv_io: bool = False) -> dict:
    """Remove the attention branches of ``layers`` into a new model; returns a summary."""
    removal = AttentionRemovalPass(layers, keep_kv_io)
    results: list[AttentionRemovalResult] = []

    def remove(model: ir.Model) -> None:
        result = removal(model)
        assert isinstance(result, AttentionRemovalResult)
        results.append(result)

    def record(metadata: dict) -> None:
        metadata["dropped_attention"] = sorted(set(metadata.get("dropped_attention", [])) | set(layers))
        metadata["removed_kv"] = metadata.get("removed_kv", []) + results[0].removed_inputs + results[0].removed_outputs

    summary = rewrite_model_file(model_path, out_path, remove,
                                 f"drop attention in {format_ranges(layers)}", record, validate)
    result = results[0]
    summary.update(layers=list(layers), removed_inputs=result.removed_inputs,
                   removed_outputs=result.removed_outputs, kept_inputs=result.kept_inputs)
    if result.kept_inputs:
        logger.info(f"drop-attention: kept {', '.join(result.kept_inputs)}: still read by other nodes")
    return summary


def rewrite_model_file(model_path: str | os.PathLike, out_path: str | os.PathLike,
                       rewrite: Callable[[ir.Model], object], what: str,
                       record_metadata: Callable[[dict], None], validate: bool) -> dict:
    """Load, ``rewrite(model)`` in place, save atomically, validate, copy tokenizer and metadata
    beside the output (``record_metadata`` adds to the input's ``ffnfusion.json``)."""
    model_path = model_file(model_path)
    out_path = pathlib.Path(out_path)
    if out_path.suffix != ".onnx":  # a directory: keep the input's layout (optimum, HF exports)
        out_path = out_path / MODEL_FILE
    start = time.perf_counter()
    model = load_model(model_path)
    nodes_before = len(model.graph)
    logger.info(f"{what}: {model_path} ({nodes_before} nodes)")
    with rewriting(model):  # Skip norms and 4-bit groups back as the input had them, once, at the end
        rewrite(model)
    written = save_model(model, out_path, input_path=model_path)
    try:
        if validate:
            logger.info("validate: onnx.checker full_check, ONNX Runtime session")
            validate_model(written)
        _copy_companions(model_path.parent, written.parent, record_metadata)
    except BaseException:
        written.unlink(missing_ok=True)
        written.with_name(written.name + ".data").unlink(missing_ok=True)
        raise
    seconds = round(time.perf_counter() - start, 2)
    logger.info(f"wrote {written}: {nodes_before} -> {len(model.graph)} nodes in {seconds} s")
    return {"output": str(written), "nodes_before": nodes_before, "nodes_after": len(model.graph),
            "seconds": seconds}


def _copy_companions(src: pathlib.Path, dst: pathlib.Path, record_metadata: Callable[[dict], None]) -> None:
    if src.resolve() == dst.resolve():
        return  # never rewrite the input's own metadata
    for name in COMPANION_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    metadata_path = src / METADATA_FILE
    metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
    record_metadata(metadata)
    metadata["derived_from"] = str(src)
    write_json_atomically(dst / METADATA_FILE, metadata)
