"""The frontier's search on the CPU and on a GPU, side by side in one run: the same path, the KL at
every budget within 1e-3, and the wall times.

    python -m ffnfusion.benchmarks.frontier_gpu out/base out/qwen [--steps 8,14,20] [--json FILE]
    python -m ffnfusion.benchmarks.frontier_gpu --synthetic smollm2   # no model files needed
    python -m ffnfusion.benchmarks.frontier_gpu --smoke      # the tiny synthetic Llama, CPU twice (CI)

Each model is an exported folder (``ffnfusion export smollm2 -o out/base``, ``ffnfusion export
qwen2.5-coder-0.5b -o out/qwen``). The frontier runs with its defaults (4,096 fitting tokens of
Python's docs, 512 selection tokens of license texts, perplexity on IDLE's release notes), no
baselines, once with ``--device cpu`` and once with ``--device cuda``: the same code, the device
changed (:mod:`ffnfusion.runtime.device`; on the CPU the search's FFNs are numpy's, on CUDA torch's). ``--synthetic PRESET`` searches a random-weight model of
that shape (``ffnfusion synth``'s presets, attention in every layer) on random token ids instead: the
times are real, the path means nothing (a machine that reaches no model hub can still run it).
``--smoke`` is ``--synthetic tiny`` at 2 and 4 steps, and where there is no GPU runs the second pass
with the GPU path's torch code on the CPU: the script, and the torch FFNs against numpy's through a
whole search; it says so.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

KL_TOLERANCE = 1e-3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="exported model folders (or .onnx files)")
    parser.add_argument("--steps", default="8,14,20", help="budgets (default 8,14,20; --smoke: 2,4)")
    parser.add_argument("--synthetic", metavar="PRESET",
                        help="a random-weight model of this shape (tiny, smollm2, llama-8b) on random token ids")
    parser.add_argument("--smoke", action="store_true",
                        help="--synthetic tiny at 2,4 steps; CPU vs CPU where there is no GPU")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.synthetic = "tiny"
    if not args.models and not args.synthetic:
        parser.error("name exported model folders, or --synthetic PRESET, or --smoke")
    from ffnfusion.exporters.synthetic import PRESETS

    if args.synthetic and args.synthetic not in PRESETS:
        parser.error(f"--synthetic: choose from {', '.join(PRESETS)}, not {args.synthetic!r}")

    import torch

    from ffnfusion.cli.progress import configure_logging
    from ffnfusion.runtime.device import CPU, CPU_TORCH, resolve_device

    configure_logging()
    if torch.cuda.is_available():
        other = resolve_device("cuda")
    elif args.smoke:
        other = CPU_TORCH
        print("frontier_gpu: no CUDA device here: the second run is the GPU path's torch code on the CPU "
              "(a smoke check)", flush=True)
    else:
        print("frontier_gpu: error: torch sees no CUDA device (use --smoke for the CPU check)", file=sys.stderr)
        return 2
    print(f"frontier_gpu: {other.description}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        steps = [int(s) for s in ("2,4" if args.smoke and args.steps == "8,14,20" else args.steps).split(",")]
        cases = [_model_case(model) for model in args.models]
        if args.synthetic:
            cases.append(_synthetic_case(args.synthetic, pathlib.Path(scratch)))
        for name, path, windows in cases:
            on_cpu, on_other = (_search(path, windows, steps, device) for device in (CPU, other))
            rows.append(_compare(name, other.name, on_cpu, on_other, steps))
            print(_line(rows[-1]), flush=True)
    print("\n| model | CPU search | " + f"{rows[0]['device']} search | speed-up | same path | largest KL difference |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(_line(row))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(row["same_path"] and row["kl_difference"] <= KL_TOLERANCE for row in rows) else 1


def _synthetic_case(preset: str, scratch: pathlib.Path):
    import numpy as np

    from ffnfusion.exporters.synthetic import PRESETS, write_synthetic

    path = write_synthetic(preset, scratch / preset, dropped=[])
    window = 32 if preset == "tiny" else 512  # the frontier's default window; tiny's sequences are short
    ids = np.random.default_rng(0).integers(0, PRESETS[preset].vocab, (3, 8, window))
    return f"{preset} (synthetic)", path, {"fit": ids[0], "select": ids[1][:1 if window == 512 else 4],
                                           "evaluation": ids[2][:1 if window == 512 else 4]}


def _model_case(model: str):
    from ffnfusion.core.model_io import model_file
    from ffnfusion.runtime.frontier.windows import (
        DEFAULT_CALIB,
        DEFAULT_EVAL,
        evaluation_windows,
        fit_and_select_windows,
    )

    path = model_file(model)
    fit, select = fit_and_select_windows(path.parent, list(DEFAULT_CALIB))
    return path.parent.name, path, {"fit": fit, "select": select,
                                    "evaluation": evaluation_windows(path.parent, [DEFAULT_EVAL])}


def _search(path, windows, steps, device) -> dict:
    from ffnfusion.runtime.frontier.frontier import run_frontier

    clock = time.perf_counter()
    result = run_frontier(path, fit=windows["fit"], select=windows["select"], evaluation=windows["evaluation"],
                          steps=steps, baselines=(), device=device)
    return {"seconds": round(time.perf_counter() - clock, 1), "search_seconds": result.seconds.get("auto"),
            "points": {p.steps_saved: {"kl": p.kl, "moves": [m["move"] + " " + str(m["layers"]) for m in p.moves]}
                       for p in result.points}}


def _compare(name: str, device: str, cpu: dict, other: dict, steps: list[int]) -> dict:
    same = all(cpu["points"].get(s, {}).get("moves") == other["points"].get(s, {}).get("moves") for s in steps)
    difference = max((abs(cpu["points"][s]["kl"] - other["points"][s]["kl"]) for s in steps
                      if s in cpu["points"] and s in other["points"]), default=float("inf"))
    return {"model": name, "device": device, "cpu_search_seconds": cpu["search_seconds"],
            "device_search_seconds": other["search_seconds"], "same_path": same, "kl_difference": difference,
            "kl": {s: [cpu["points"].get(s, {}).get("kl"), other["points"].get(s, {}).get("kl")] for s in steps}}


def _line(row: dict) -> str:
    speed = row["cpu_search_seconds"] / max(row["device_search_seconds"], 1e-9)
    return (f"| {row['model']} | {row['cpu_search_seconds']} s | {row['device_search_seconds']} s | {speed:.2f}× | "
            f"{'yes' if row['same_path'] else 'NO'} | {row['kl_difference']:.2e} |")


if __name__ == "__main__":
    sys.exit(main())
