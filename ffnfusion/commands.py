"""The work behind each CLI command; ``cli.py`` only parses arguments and reports errors."""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import time

from ffnfusion.exporters.onnx_export import METADATA_FILE, ExportOptions, export_source, write_json_atomically
from ffnfusion.exporters.sources import resolve_source
from ffnfusion.model_io import load_model, save_model, validate_model
from ffnfusion.passes.blocks import BlockMap, find_blocks
from ffnfusion.passes.ffn_fusion import FFNFusionPass
from ffnfusion.passes.layer_ranges import format_ranges
from ffnfusion.passes.plan import FusionPlan

# Files a runtime needs beside model.onnx; copied so a fused model directory is self-contained.
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "config.json", "generation_config.json")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def export(source: str, out_dir: str, options: ExportOptions) -> pathlib.Path:
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
    described = [f"{a}-{b} ({b - a + 1} layers)" for a, b in runs]
    lines.append(f"attention-free runs: {', '.join(described) or 'none'}")
    return "\n".join(lines)


def inspect(model_path: str, as_json: bool) -> str:
    block_map = find_blocks(load_model(model_path))
    return json.dumps(block_map.to_dict(), indent=2) if as_json else format_block_table(block_map)


def fuse(model_path: str, out_path: str, plan: FusionPlan, validate: bool = True) -> dict:
    """Load, fuse, save atomically, validate; returns a summary. Nothing is written on error."""
    model_path = pathlib.Path(model_path)
    if model_path.is_dir():
        model_path = model_path / "model.onnx"
    start = time.perf_counter()
    model = load_model(model_path)
    nodes_before = len(model.graph)
    log(f"fuse: {model_path} ({nodes_before} nodes), groups {plan.describe()}")
    FFNFusionPass(plan)(model)
    written = save_model(model, out_path, input_path=model_path)
    try:
        if validate:
            log("fuse: validating (onnx.checker full_check, ONNX Runtime session)")
            validate_model(written)
        _copy_companions(model_path.parent, written.parent, plan)
    except BaseException:
        written.unlink(missing_ok=True)
        written.with_name(written.name + ".data").unlink(missing_ok=True)
        raise
    summary = {"output": str(written), "groups": [list(g) for g in plan.groups],
               "nodes_before": nodes_before, "nodes_after": len(model.graph),
               "seconds": round(time.perf_counter() - start, 2)}
    log(f"fuse: wrote {written}: {nodes_before} -> {len(model.graph)} nodes in {summary['seconds']} s")
    return summary


def _copy_companions(src: pathlib.Path, dst: pathlib.Path, plan: FusionPlan) -> None:
    if src.resolve() == dst.resolve():
        return
    for name in COMPANION_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    metadata_path = src / METADATA_FILE
    metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
    metadata["fused_groups"] = metadata.get("fused_groups", []) + [list(g) for g in plan.groups]
    metadata["fused_from"] = str(src)
    write_json_atomically(dst / METADATA_FILE, metadata)
