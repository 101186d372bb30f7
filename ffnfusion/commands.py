"""The work behind each CLI command; ``cli.py`` only parses arguments and reports errors."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import sys
import time
from collections.abc import Callable

import onnx_ir as ir

from ffnfusion.atomic import write_json_atomically
from ffnfusion.errors import FFNFusionError, UsageError
from ffnfusion.exporters.sources import resolve_source
from ffnfusion.model_io import METADATA_FILE, MODEL_FILE, load_model, model_file, save_model, validate_model
from ffnfusion.passes.attention_removal import AttentionRemovalPass
from ffnfusion.passes.blocks import BlockMap, find_blocks
from ffnfusion.passes.ffn_fusion import FFNFusionPass
from ffnfusion.passes.layer_ranges import format_ranges
from ffnfusion.passes.plan import FusionPlan

# Files a runtime needs beside model.onnx; copied so a fused model directory is self-contained.
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "config.json", "generation_config.json")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def export(source: str, out_dir: str, options) -> pathlib.Path:
    from ffnfusion.exporters.onnx_export import export_source  # imports torch: only when exporting

    return export_source(resolve_source(source, log=log), out_dir, options, log=log)


def format_block_table(block_map: BlockMap) -> str:
    runs = block_map.runs
    lines = [f"{'layer':>5}  {'attention':<9}  {'ffn width':>9}  {'norm':<18}  {'epsilon':>8}  run"]
    for layer in block_map.layers:
        run = block_map.run_of(layer.index) if layer.ffn and not layer.attention else None
        ffn = layer.ffn
        lines.append(
            f"{format_ranges(layer.span):>5}  {'yes' if layer.attention else 'no':<9}  "
            f"{ffn.width if ffn else '-':>9}  {ffn.norm.kind if ffn else (layer.unknown or '-'):<18}  "
            f"{f'{ffn.norm.epsilon:.0e}' if ffn else '-':>8}  {f'{run[0]}-{run[1]}' if run else ''}"
        )
    described = [f"{format_ranges(range(a, b + 1))} ({b - a + 1} layer{'s' if b > a else ''})" for a, b in runs]
    lines.append(f"attention-free runs: {', '.join(described) or 'none'}")
    return "\n".join(lines)


def inspect(model_path: str, as_json: bool) -> str:
    block_map = find_blocks(load_model(model_path))
    return json.dumps(block_map.to_dict(), indent=2) if as_json else format_block_table(block_map)


@dataclasses.dataclass(frozen=True)
class RepairOptions:
    """``fuse --repair``: how to refit the fused groups' down projections."""

    method: str = "refit"
    tokens: int | None = None  # default: calibration.DEFAULT_REPAIR_TOKENS
    lam: str | float = "auto"
    texts: tuple[str, ...] = ()
    ids_files: tuple[str, ...] = ()


def fuse(model_path: str, out_path: str, plan: FusionPlan, validate: bool = True, target: str = "gpu",
         repair: RepairOptions | None = None, threads: int | None = None) -> dict:
    """Fuse the plan's groups (and repair them) into a new model; returns a summary. Nothing is
    written on error."""
    fusion = FFNFusionPass(plan, target)
    repair_pass = _repair_pass(model_path, plan, repair, target, threads) if repair else None

    def record(metadata: dict) -> None:
        metadata["fused_groups"] = metadata.get("fused_groups", []) + [list(g) for g in plan.groups]
        if repair_pass is not None:
            metadata["repair"] = metadata.get("repair", []) + [repair_pass.report.to_dict()]

    rewrite = fusion if repair_pass is None else ir.passes.Sequential(fusion, repair_pass)
    what = f"fuse groups {plan.describe()}" + (f", repair ({repair.method})" if repair else "")
    summary = rewrite_model(model_path, out_path, rewrite, what, record, validate)
    summary["groups"] = [list(g) for g in plan.groups]
    if repair_pass is not None:
        summary["repair"] = repair_pass.report.to_dict()
        log(f"repair: {repair_pass.report.describe()}")
    return summary


def _repair_pass(model_path: str, plan: FusionPlan, options: RepairOptions, target: str, threads: int | None):
    from ffnfusion.runtime import calibration
    from ffnfusion.runtime.repair import RepairPass, lambda_grid

    try:
        lambdas = lambda_grid(options.lam)
    except ValueError as err:
        raise UsageError(str(err)) from None
    tokens = options.tokens or calibration.DEFAULT_REPAIR_TOKENS
    if tokens < calibration.DEFAULT_WINDOW:
        raise UsageError(f"--repair-tokens must be at least one window ({calibration.DEFAULT_WINDOW})")
    path = model_file(model_path)
    sources = calibration.repair_sources(path.parent, texts=options.texts, ids_files=options.ids_files, tokens=tokens)
    log(f"repair: sources {', '.join(f'{s.name} ({s.fit.size} fit + {s.select.size} held out)' for s in sources)}")
    return RepairPass(path, plan.groups, sources, method=options.method, lambdas=lambdas, target=target,
                      threads=threads, log=log)


def drop_attention(model_path: str, out_path: str, layers: list[int], validate: bool = True,
                   keep_kv_io: bool = False) -> dict:
    """Remove the attention branches of ``layers`` into a new model; returns a summary."""
    removal = AttentionRemovalPass(layers, keep_kv_io)

    def record(metadata: dict) -> None:
        metadata["dropped_attention"] = sorted(set(metadata.get("dropped_attention", [])) | set(layers))
        result = removal.result
        metadata["removed_kv"] = metadata.get("removed_kv", []) + result.removed_inputs + result.removed_outputs

    summary = rewrite_model(model_path, out_path, removal, f"drop attention in {format_ranges(layers)}",
                            record, validate)
    result = removal.result
    summary.update(layers=layers, removed_inputs=result.removed_inputs,
                   removed_outputs=result.removed_outputs, kept_inputs=result.kept_inputs)
    if result.kept_inputs:
        log(f"drop-attention: kept {', '.join(result.kept_inputs)}: still read by other nodes")
    return summary


def rewrite_model(model_path: str, out_path: str, rewrite: ir.passes.InPlacePass, what: str,
                  record_metadata: Callable[[dict], None], validate: bool) -> dict:
    """Load, rewrite, save atomically, validate, copy tokenizer and metadata beside the output."""
    model_path = model_file(model_path)
    out_path = pathlib.Path(out_path)
    if out_path.suffix != ".onnx":  # a directory: keep the input's layout (optimum, HF exports)
        out_path = out_path / MODEL_FILE
    start = time.perf_counter()
    model = load_model(model_path)
    nodes_before = len(model.graph)
    log(f"{what}: {model_path} ({nodes_before} nodes)")
    rewrite(model)
    written = save_model(model, out_path, input_path=model_path)
    try:
        if validate:
            log("validate: onnx.checker full_check, ONNX Runtime session")
            validate_model(written, log=log)
        _copy_companions(model_path.parent, written.parent, record_metadata)
    except BaseException:
        written.unlink(missing_ok=True)
        written.with_name(written.name + ".data").unlink(missing_ok=True)
        raise
    seconds = round(time.perf_counter() - start, 2)
    log(f"wrote {written}: {nodes_before} -> {len(model.graph)} nodes in {seconds} s")
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


def analysis_windows(model_path: str, calib: list[str] | None, calib_ids: str | None, tokens: int,
                     window: int, default=None):
    """Token windows for analysis/verification, tokenised with the tokenizer beside the model."""
    from ffnfusion.runtime import calibration

    model_dir = pathlib.Path(model_path)
    model_dir = model_dir if model_dir.is_dir() else model_dir.parent
    return calibration.calibration_windows(model_dir, texts=calib or (), ids_file=calib_ids, tokens=tokens,
                                           window=window, default=default or calibration.python_docs_text)


def analyze(model_path: str, out_dir: str, windows, *, max_distance: int = 8, dependency_tokens: int = 2048,
            threshold: float | None = None, max_width: int | None = None, include_last: bool = False):
    """Measure, plan and write the report directory; returns ``(report, plan)``."""
    from ffnfusion.passes.dependency import analyze as measure
    from ffnfusion.passes.planner import plan_groups
    from ffnfusion.report import write_analysis
    from ffnfusion.runtime.stream import StreamRunner

    runner = StreamRunner(model_path)
    log(f"analyze: {runner.path}: {len(runner.units)} blocks, runs "
        f"{', '.join(format_ranges(range(a, b + 1)) for a, b in runner.block_map.runs) or 'none'}; "
        f"{windows.size} tokens in {len(windows)} windows of {windows.shape[1]}")
    report = measure(runner, windows, max_distance=max_distance, dependency_tokens=dependency_tokens)
    limits = {} if threshold is None else {"threshold": threshold}
    plan = plan_groups(report, max_width=max_width, include_last=include_last, **limits)
    write_analysis(report, plan, out_dir, str(runner.path))
    log(f"analyze: plan {plan.describe() or '(no group passes the threshold)'}; cost "
        f"{report.cost['full_forward_equivalents']} full-forward equivalents; wrote {out_dir}")
    return report, plan


def least_important_attention(model_path: str, windows, count: int) -> list[int]:
    """The ``count`` attention branches with the lowest importance 1 − cos(X, X + attn(n(X)))."""
    from ffnfusion.passes.dependency import analyze as measure
    from ffnfusion.runtime.stream import StreamRunner

    runner = StreamRunner(model_path)
    report = measure(runner, windows, with_dependency=False)
    scored = sorted((m["importance"], b["layer"]) for b, m in zip(report.blocks, report.per_block)
                    if "importance" in m)
    if count > len(scored):
        raise FFNFusionError(f"--count {count}: the model has only {len(scored)} attention layers")
    chosen = sorted(layer for _, layer in scored[:count])
    log("drop-attention: least important attention: " + ", ".join(
        f"{layer} ({score:.4f})" for score, layer in sorted(scored[:count], key=lambda item: item[1])))
    return chosen


def verify(reference: str, candidate: str, windows) -> dict:
    from ffnfusion.runtime.verify import compare_models

    log(f"verify: {reference} vs {candidate} on {windows.size} tokens")
    return compare_models(reference, candidate, windows)


def format_verification(result: dict) -> str:
    return (f"ref  ppl {result['ref']['ppl']:.3f}  ({result['ref']['path']})\n"
            f"new  ppl {result['new']['ppl']:.3f}  ({result['new']['path']})\n"
            f"top-1 agreement {result['top1_agreement']:.4f}   KL(ref||new) {result['kl']:.4f}   "
            f"final hidden cosine {result['hidden_cosine']:.4f}   ({result['tokens']} tokens)")
