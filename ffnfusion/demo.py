"""``ffnfusion demo``: export -> inspect -> fuse -> check exactness -> report quality, on SmolLM2."""

from __future__ import annotations

import copy
import json
import pathlib
import time

import numpy as np
import torch

from ffnfusion import commands
from ffnfusion.atomic import write_json_atomically
from ffnfusion.exporters import llama_surgery
from ffnfusion.exporters.onnx_export import (
    METADATA_FILE, MODEL_FILE, ExportOptions, export_model, 
)
from ffnfusion.exporters.sources import load_causal_lm, resolve_source
from ffnfusion.passes.layer_ranges import format_ranges
from ffnfusion.passes.plan import FusionPlan
from ffnfusion.runtime.onnxruntime import create_session, run_logits
from ffnfusion.runtime.calibration import perplexity, python_docs_text, token_windows

WINDOW = 256
EXACTNESS_TOLERANCE = 1e-5


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """Frobenius-norm relative error ``‖a − r‖ / ‖r‖``."""
    return float(np.linalg.norm(actual - reference) / np.linalg.norm(reference))


def _torch_logits(model, input_ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(input_ids), use_cache=False).logits.float().numpy()


def _reusable_export(base: pathlib.Path, source: str, dropped: list[int]) -> bool:
    meta_path = base / METADATA_FILE
    if not (base / MODEL_FILE).is_file() or not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text())
    return meta.get("source") == source and meta.get("dropped_attention") == dropped \
        and meta.get("exporter") == "dynamo" and not meta.get("kv_cache")


def run(workdir: str, source: str, dropped: list[int], plan: FusionPlan, tokens: int) -> dict:
    log = commands.log
    workdir = pathlib.Path(workdir)
    base, fused_path = workdir / "base", workdir / "fused" / MODEL_FILE
    resolved = resolve_source(source, log=log)

    log(f"[1/5] load {resolved.describe()}")
    model, tokenizer = load_causal_lm(resolved)
    original = copy.deepcopy(model)

    log(f"[2/5] export with attention dropped in layers {format_ranges(dropped)}")
    start = time.perf_counter()
    if _reusable_export(base, source, dropped):
        llama_surgery.drop_attention(model, dropped)
        log(f"export: reusing {base / MODEL_FILE} (delete it to export again)")
    else:
        export_model(model, base, ExportOptions(drop_attention=dropped), tokenizer=tokenizer,
                     source=source, log=log)
    export_seconds = time.perf_counter() - start

    log("[3/5] inspect")
    print(commands.inspect(str(base / MODEL_FILE), as_json=False), flush=True)

    log(f"[4/5] fuse groups {plan.describe()}")
    summary = commands.fuse(str(base / MODEL_FILE), str(fused_path), plan)

    log(f"[5/5] check on {tokens} tokens of Python's documentation ({tokens // WINDOW} windows of {WINDOW})")
    input_ids = token_windows(tokenizer, python_docs_text(), WINDOW, max(1, tokens // WINDOW))
    sequential = _torch_logits(model, input_ids)
    llama_surgery.parallelize_groups(model, plan.groups)
    parallel = _torch_logits(model, input_ids)
    ort_unfused = run_logits(create_session(base / MODEL_FILE), input_ids)
    ort_fused = run_logits(create_session(fused_path), input_ids)
    report = {
        "export_seconds": round(export_seconds, 1),
        "nodes_before": summary["nodes_before"],
        "nodes_after": summary["nodes_after"],
        "fused_vs_torch_parallel_rel_err": relative_error(ort_fused, parallel),
        "unfused_vs_torch_sequential_rel_err": relative_error(ort_unfused, sequential),
        "fused_vs_unfused_rel_diff": relative_error(ort_fused, ort_unfused),
        "perplexity": {
            "original": perplexity(_torch_logits(original, input_ids), input_ids),
            "attention_dropped": perplexity(ort_unfused, input_ids),
            "fused": perplexity(ort_fused, input_ids),
        },
    }
    exact = report["fused_vs_torch_parallel_rel_err"] <= EXACTNESS_TOLERANCE
    ppl = report["perplexity"]
    print(
        f"\nsummary ({resolved.describe()})\n"
        f"  exported model         {base / MODEL_FILE}  ({report['export_seconds']} s)\n"
        f"  fused model            {fused_path}\n"
        f"  graph nodes            {report['nodes_before']} -> {report['nodes_after']}\n"
        f"  fused groups           {plan.describe()}\n"
        f"  exactness              ORT fused vs torch parallel form: rel err "
        f"{report['fused_vs_torch_parallel_rel_err']:.2e} ({'OK' if exact else 'FAILED'}, tolerance {EXACTNESS_TOLERANCE:.0e})\n"
        f"                         ORT unfused vs torch sequential:  rel err {report['unfused_vs_torch_sequential_rel_err']:.2e}\n"
        f"  fusion changes logits  rel diff fused vs unfused {report['fused_vs_unfused_rel_diff']:.3f}\n"
        f"  perplexity             original {ppl['original']:.2f} | attention dropped {ppl['attention_dropped']:.2f}"
        f" | fused {ppl['fused']:.2f}",
        flush=True,
    )
    write_json_atomically(workdir / "demo.json", report)
    if not exact:
        raise SystemExit("demo: the fused model does not match the parallel-form reference")
    return report
