"""Repair on SmolLM2: perplexity and top-1 agreement with the unfused model on held-out text of two
kinds, for fused, fused + refit and fused + per-channel scale.

    python -m ffnfusion.benchmarks.repair_table [--work DIR] [--case 3-10:3-9 ...]

A case ``D:G`` exports SmolLM2 with attention removed in layers D (cached under --work) and fuses
groups G (``3-6+7-9`` for two groups). The repair calibrates on its defaults (Python docs + license
texts, :data:`~ffnfusion.runtime.calibration.DEFAULT_SOURCES`). Evaluation:

* ``like``: windows of the same two texts that the repair neither fitted on nor held out
  (the midpoints between its fitting windows);
* ``unlike``: IDLE's release notes (``idlelib/NEWS.txt``, shipped with CPython), a third kind.

"gap recovered" = (ppl_fused − ppl_repaired) / (ppl_fused − ppl_unfused).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

DEFAULT_CASES = ("3-10:3-9", "3-10:3-6+7-9", "10-17:10-16")
EVAL_TOKENS = 4096


def evaluation_windows(tokenizer, window: int) -> dict[str, np.ndarray]:
    from ffnfusion.runtime import calibration

    like = []
    per_source = EVAL_TOKENS // window // len(calibration.DEFAULT_SOURCES)
    for name in calibration.DEFAULT_SOURCES:
        ids = tokenizer(calibration.read_text(name), return_tensors="np")["input_ids"][0]
        windows = calibration.windows_from_ids(ids, len(ids), window)
        source = calibration.CalibrationSource.split("", windows, calibration.DEFAULT_REPAIR_TOKENS // 2 // window,
                                                     calibration.DEFAULT_SELECT_TOKENS // window)
        fit_starts = [int(np.flatnonzero((windows == w).all(1))[0]) for w in source.fit]
        midpoints = [(a + b) // 2 for a, b in zip(fit_starts, fit_starts[1:]) if b - a > 1]
        like.append(windows[midpoints[:per_source]])
    unlike = calibration.token_windows(tokenizer, calibration.release_notes_text(), window, EVAL_TOKENS // window)
    return {"like": np.concatenate(like), "unlike": unlike}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="out/repair", help="directory for exports and fused models")
    parser.add_argument("--case", action="append", help=f"D:G (default: {', '.join(DEFAULT_CASES)})")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)

    from ffnfusion.cli.progress import configure_logging
    from ffnfusion.exporters.onnx_export import ExportOptions, export_source
    from ffnfusion.exporters.sources import resolve_source
    from ffnfusion.passes.layer_ranges import parse_layers
    from ffnfusion.passes.plan import FusionPlan
    from ffnfusion.runtime.calibration import DEFAULT_WINDOW, load_tokenizer
    from ffnfusion.runtime.model_rewrite import RepairOptions, fuse_model_file
    from ffnfusion.runtime.verify import compare_many

    configure_logging()

    work = pathlib.Path(args.work)
    rows = []
    evaluation = None
    for case in args.case or DEFAULT_CASES:
        dropped_spec, groups_spec = case.split(":")
        groups = groups_spec.replace("+", ",")
        base = work / f"smollm2-drop{dropped_spec}"
        if not (base / "model.onnx").is_file():
            export_source(resolve_source("smollm2"), base, ExportOptions(drop_attention=parse_layers(dropped_spec)))
        if evaluation is None:
            evaluation = evaluation_windows(load_tokenizer(base), DEFAULT_WINDOW)
        plan = FusionPlan.parse(groups)
        variants = {"fused": None, "refit": RepairOptions("refit"), "scale": RepairOptions("scale")}
        paths, repairs = {}, {}
        for name, repair in variants.items():
            out = work / f"{base.name}-{groups_spec}-{name}"
            summary = fuse_model_file(str(base), str(out), plan, repair=repair)
            paths[name] = summary["output"]
            repairs[name] = summary.get("repair")
        row = {"dropped": dropped_spec, "groups": groups, "repair": {k: v for k, v in repairs.items() if v}}
        for kind, windows in evaluation.items():
            results = compare_many(str(base / "model.onnx"), [paths[n] for n in variants], windows)
            row[kind] = {"unfused": results[0]["ref"]["ppl"],
                         **{n: {"ppl": r["new"]["ppl"], "top1": r["top1_agreement"], "kl": r["kl"]}
                            for n, r in zip(variants, results)}}
        rows.append(row)
        print(format_row(row), flush=True)
    print("\n| attention removed | groups | text | unfused ppl | fused ppl (top-1) | fused+repair ppl (top-1) "
          "| gap recovered | fused+scale ppl (top-1) |\n|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(format_row(row))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def format_row(row: dict) -> str:
    lines = []
    for kind in ("like", "unlike"):
        r = row[kind]
        gap = r["fused"]["ppl"] - r["unfused"]
        recovered = (r["fused"]["ppl"] - r["refit"]["ppl"]) / gap if gap > 0 else float("nan")
        lines.append(
            f"| {row['dropped']} | {row['groups']} | {kind} | {r['unfused']:.2f} | "
            f"{r['fused']['ppl']:.2f} ({r['fused']['top1']:.3f}) | {r['refit']['ppl']:.2f} ({r['refit']['top1']:.3f}) | "
            f"{recovered:.1%} | {r['scale']['ppl']:.2f} ({r['scale']['top1']:.3f}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
