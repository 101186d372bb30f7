"""``ffnfusion demo``: the whole pipeline on SmolLM2-135M, with the baselines that keep it honest.

export -> drop the K least important attention layers -> analyze -> auto plan -> fuse -> check the
fused graph against a torch reference of the parallel form -> verify every variant against the
original on text from another domain than the calibration text.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib

import numpy as np

from ffnfusion.cli.progress import ProgressBar, log
from ffnfusion.cli.report import describe_blocks, write_analysis
from ffnfusion.core.errors import FFNFusionError, InvalidPlanError, ModelRunError
from ffnfusion.core.files import write_json_atomically
from ffnfusion.core.model_io import METADATA_FILE, MODEL_FILE, load_model, save_model
from ffnfusion.exporters.sources import load_causal_lm, resolve_source
from ffnfusion.passes.ffn_removal import FFNRemovalPass
from ffnfusion.passes.layer_ranges import format_ranges
from ffnfusion.passes.plan import FusionPlan
from ffnfusion.runtime import calibration
from ffnfusion.runtime.analysis import analyze_model, least_important_attention
from ffnfusion.runtime.heap import release_freed_memory
from ffnfusion.runtime.model_rewrite import RepairOptions, fuse_model_file, remove_attention_file
from ffnfusion.runtime.onnxruntime import create_session, run_logits
from ffnfusion.runtime.verify import compare_many

EXACTNESS_TOLERANCE = 1e-5


@dataclasses.dataclass
class DemoOptions:
    workdir: str = "out/demo"
    source: str = "smollm2"
    drop_count: int = 8
    calib_tokens: int = 8192
    dependency_tokens: int = 2048
    verify_tokens: int = 4096
    window: int = 512
    threshold: float | None = None  # None: the planner's default
    frontier_steps: tuple[int, ...] = (8, 14, 20)  # empty: no frontier
    frontier_fit_tokens: int = 4096
    frontier_select_tokens: int = 512
    repair_tokens: int = calibration.DEFAULT_REPAIR_TOKENS  # the repaired variant's fitting tokens


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """Frobenius-norm relative error ``‖a − r‖ / ‖r‖``."""
    return float(np.linalg.norm(actual - reference) / np.linalg.norm(reference))


def _reusable_export(base: pathlib.Path, source: str) -> bool:
    meta_path = base / METADATA_FILE
    if not (base / MODEL_FILE).is_file() or not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text())
    return meta.get("source") == source and meta.get("dropped_attention") == [] \
        and meta.get("exporter") == "dynamo" and not meta.get("kv_cache")


def _exactness(model, dropped, plan: FusionPlan, fused_path: pathlib.Path, input_ids: np.ndarray) -> float:
    """ORT fused logits vs the torch model with the same attention dropped and groups in parallel form."""
    import torch

    from ffnfusion.exporters import llama_surgery

    reference = copy.deepcopy(model)
    llama_surgery.drop_attention(reference, dropped)
    llama_surgery.parallelize_groups(reference, plan.groups)
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(input_ids), use_cache=False).logits.float().numpy()
    return relative_error(run_logits(create_session(fused_path), input_ids), expected)


def _removal_baseline(report, steps: int, dropped_path: pathlib.Path, out: pathlib.Path) -> list[int]:
    """The paper's baseline: remove as many FFN blocks as fusion saved steps, lowest ‖h‖/‖X‖ first."""
    scored = []
    for block, metrics in zip(report.blocks, report.per_block):
        if block["kind"] == "ffn":
            scored.append((metrics["h_ratio"], block["layer"]))
        elif "ffn_h_ratio" in metrics:
            scored.append((metrics["ffn_h_ratio"], block["layer"]))
    removed = sorted(layer for _, layer in sorted(scored)[:steps])
    model = load_model(dropped_path)
    FFNRemovalPass(removed)(model)
    save_model(model, out, input_path=dropped_path)
    return removed


def _stage(header: str) -> None:
    """A stage's header, after handing what the stage before freed back to the OS: one process runs
    them all, and glibc would otherwise carry each stage's peak into the next (``runtime.heap``)."""
    release_freed_memory()
    log(header)


def run(options: DemoOptions) -> dict:
    work = pathlib.Path(options.workdir)
    paths = {name: work / name / MODEL_FILE for name in ("base", "dropped", "fused", "repaired", "naive", "removed")}
    source = resolve_source(options.source)

    total = 8 if options.frontier_steps else 7
    _stage(f"[1/{total}] load {source.describe()}")
    model, tokenizer = load_causal_lm(source)
    calib, held_out, held_out_name = _texts(options, tokenizer)

    from ffnfusion.exporters.onnx_export import ExportOptions, export_model  # torch: only for the demo itself

    _stage(f"[2/{total}] export (dynamo, opset 20)")
    if _reusable_export(paths["base"].parent, options.source):
        log(f"export: reusing {paths['base']} (delete it to export again)")
    else:
        export_model(copy.deepcopy(model), paths["base"].parent, ExportOptions(), tokenizer=tokenizer,
                     source=options.source)

    _stage(f"[3/{total}] drop the {options.drop_count} least important attention layers")
    dropped = least_important_attention(str(paths["base"]), calib[: max(1, 4096 // options.window)],
                                        options.drop_count, progress=ProgressBar("analyze"))
    remove_attention_file(str(paths["base"]), str(paths["dropped"]), dropped)
    print(describe_blocks(str(paths["dropped"]), as_json=False), flush=True)

    _stage(f"[4/{total}] analyze dependencies and plan")
    report, plan = analyze_model(str(paths["dropped"]), calib, dependency_tokens=options.dependency_tokens,
                                 threshold=options.threshold, progress=ProgressBar("analyze"))
    write_analysis(report, plan, work / "report", str(paths["dropped"]))
    naive = FusionPlan.from_groups([range(a, b + 1) for a, b in report.runs if b > a])
    if not naive.groups:
        raise InvalidPlanError(f"demo: the dropped layers {format_ranges(dropped)} form no run of two or more "
                         "attention-free layers; nothing can be fused (try a larger --count)")
    if not plan.groups:
        log("demo: no group passes the planner's threshold (see report/report.md); only baselines follow")

    _stage(f"[5/{total}] fuse the auto plan {plan.describe() or '(empty)'} (plain and repaired) and, for comparison, whole runs")
    names, fused, repaired, removed = _rewrite_variants(paths, report, plan, naive, options.repair_tokens)

    checked_plan, checked_path = (plan, paths["fused"]) if plan.groups else (naive, paths["naive"])
    _stage(f"[6/{total}] exactness: fused ONNX ({checked_plan.describe()}) vs torch parallel form")
    exact = _exactness(model, dropped, checked_plan, checked_path, held_out[:2])

    _stage(f"[7/{total}] verify against the original on {held_out.size} tokens of {held_out_name}")
    results = dict(zip(names, compare_many(str(paths["base"]), [str(paths[n]) for n in names], held_out,
                                           progress=ProgressBar("verify", "models"))))

    summary = {
        "dropped_attention": dropped, "runs": report.runs, "plan": plan.to_dict(), "naive_plan": naive.to_dict(),
        "removed_ffn": removed, "fused_vs_torch_parallel_rel_err": exact,
        "repair": repaired and repaired["repair"],
        "nodes": fused and {"before": fused["nodes_before"], "after": fused["nodes_after"]},
        "analysis_cost": report.cost, "verification": results,
    }
    labels = {"dropped": (f"attention dropped ({len(dropped)})", format_ranges(dropped)),
              "fused": ("+ fused, auto plan", plan.describe()),
              "repaired": ("+ fused, auto plan, repaired", repaired and repaired["repair"] and _repair_choice(repaired["repair"])),
              "naive": ("+ fused, whole runs", naive.describe()),
              "removed": (f"+ {plan.steps_saved} FFN{'s' if plan.steps_saved > 1 else ''} removed instead",
                          format_ranges(removed))}
    rows = [("original", "", results["dropped"]["ref"]["ppl"], 1.0, 0.0)]
    rows += [(*labels[name], *_row(results[name])) for name in names]
    table = "\n".join(f"| {name} | {layers} | {ppl:.2f} | {top1:.3f} | {kl:.3f} |" for name, layers, ppl, top1, kl in rows)
    print(
        f"\nsummary ({source.describe()}, verification on {held_out.size} tokens of {held_out_name}; "
        f"analysis on Python docs, repair on Python docs + license texts)\n"
        f"| model | layers | perplexity | top-1 agreement | KL(orig‖model) |\n|---|---|---|---|---|\n{table}\n\n"
        + (f"fused graph: {fused['nodes_before']} -> {fused['nodes_after']} nodes, " if fused else "")
        + f"{plan.steps_saved} sequential FFN steps saved by the auto plan; analysis cost "
        f"{report.cost['full_forward_equivalents']} full-forward equivalents\n"
        f"exactness: ORT fused ({checked_plan.describe()}) vs torch parallel form rel err {exact:.2e} "
        f"({'OK' if exact <= EXACTNESS_TOLERANCE else 'FAILED'}, tolerance {EXACTNESS_TOLERANCE:.0e})",
        flush=True,
    )
    if exact > EXACTNESS_TOLERANCE:
        write_json_atomically(work / "demo.json", summary)
        raise ModelRunError("demo: the fused model does not match the parallel-form reference")
    if options.frontier_steps:
        summary["frontier"] = _frontier(options, model, tokenizer, paths["base"], work / "frontier", held_out,
                                        held_out_name)
    write_json_atomically(work / "demo.json", summary)
    return summary


def _texts(options: DemoOptions, tokenizer) -> tuple[np.ndarray, np.ndarray, str]:
    """Calibration windows (Python's docs) and held-out windows of a kind that neither the analysis
    (docs) nor the repair (docs + licenses) sees, with the held-out text's name."""
    calib = calibration.token_windows(tokenizer, calibration.python_docs_text(), options.window,
                                      options.calib_tokens // options.window)
    try:
        held_out_name, held_out_text = "IDLE release notes", calibration.release_notes_text()
    except FFNFusionError as err:
        log(f"demo: {err}; verifying on license text instead (the repair also calibrates on it)")
        held_out_name, held_out_text = "license text", calibration.license_text()
    held_out = calibration.token_windows(tokenizer, held_out_text, options.window,
                                         options.verify_tokens // options.window)
    return calib, held_out, held_out_name


def _rewrite_variants(paths: dict[str, pathlib.Path], report, plan: FusionPlan, naive: FusionPlan,
                      repair_tokens: int):
    """The auto plan fused (plain and repaired), whole runs fused, and as many FFNs removed as the
    plan saves steps: ``(names written, fused summary, repaired summary, removed layers)``."""
    names = ["dropped"]
    fused = repaired = None
    if plan.groups:
        fused = fuse_model_file(str(paths["dropped"]), str(paths["fused"]), plan)
        names.append("fused")
        repaired = fuse_model_file(str(paths["dropped"]), str(paths["repaired"]), plan,
                                   repair=RepairOptions(tokens=repair_tokens))
        names.append("repaired")
    fuse_model_file(str(paths["dropped"]), str(paths["naive"]), naive)
    names.append("naive")
    removed: list[int] = []
    if plan.steps_saved:
        removed = _removal_baseline(report, plan.steps_saved, paths["dropped"], paths["removed"])
        names.append("removed")
    return names, fused, repaired, removed


def _frontier(options: DemoOptions, model, tokenizer, base: pathlib.Path, out: pathlib.Path, held_out: np.ndarray,
              held_out_name: str) -> dict:
    """The depth-reduction frontier from the full export; the middle budget's model checked against
    a torch model with the same plan and verified against the original on the held-out text."""
    import torch

    from ffnfusion.cli.frontier_command import write_frontier
    from ffnfusion.exporters import llama_surgery
    from ffnfusion.runtime.frontier.frontier import BASELINES, run_frontier

    _stage(f"[8/8] depth-reduction frontier at {', '.join(map(str, options.frontier_steps))} steps saved: fit on "
           f"Python docs, choose on license texts, perplexity on {held_out_name}")
    fit = calibration.token_windows(tokenizer, calibration.python_docs_text(), options.window,
                                    options.frontier_fit_tokens // options.window)
    select = calibration.token_windows(tokenizer, calibration.license_text(), options.window,
                                       max(1, options.frontier_select_tokens // options.window))
    # The single-method baselines; block-parallel (the paper's M-ranked windows: an analysis and three
    # perplexities in the thousands, ~2 min) is `ffnfusion frontier`'s, kept out of the 15-minute demo.
    baselines = [name for name in BASELINES if name != "block-parallel"]
    result = run_frontier(base, fit=fit, select=select, evaluation=held_out, steps=options.frontier_steps,
                          baselines=baselines)
    write_frontier(result, base, out, held_out)
    print((out / "frontier.md").read_text(), flush=True)
    steps = sorted(options.frontier_steps)
    chosen = next((p for p in result.points if p.steps_saved == steps[len(steps) // 2]), None)
    if chosen is None:
        return result.to_dict()
    reference = copy.deepcopy(model)
    llama_surgery.apply_depth_plan(reference, chosen.plan, chosen.deltas)
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(held_out[:2]), use_cache=False).logits.float().numpy()
    path = out / chosen.model
    exact = relative_error(run_logits(create_session(path), held_out[:2]), expected)
    verified = compare_many(str(base), [str(path)], held_out, progress=ProgressBar("verify", "models"))[0]
    print(f"{chosen.steps_saved} steps saved ({path}): perplexity {verified['new']['ppl']:.2f} vs "
          f"{verified['ref']['ppl']:.2f}, top-1 agreement {verified['top1_agreement']:.3f}, KL {verified['kl']:.3f} "
          f"on {held_out.size} tokens of {held_out_name}; vs torch with the same plan rel err {exact:.2e} "
          f"({'OK' if exact <= EXACTNESS_TOLERANCE else 'FAILED'})", flush=True)
    if exact > EXACTNESS_TOLERANCE:
        raise ModelRunError(f"demo: {path} does not match the torch model with the same plan")
    return {**result.to_dict(), "checked": {"steps": chosen.steps_saved, "vs_torch_rel_err": exact,
                                            "verification": verified}}


def _repair_choice(report: dict) -> str:
    return ", ".join(f"{g['layers'][0]}-{g['layers'][1]}: " + ("kept W_down" if g["chosen"] is None else f"λ {g['chosen']:g}")
                     for g in report["groups"])


def _row(result: dict) -> tuple[float, float, float]:
    return result["new"]["ppl"], result["top1_agreement"], result["kl"]
