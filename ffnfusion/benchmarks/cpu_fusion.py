"""Fused vs unfused latency on ONNX Runtime CPU at B in {1, 8} x S in {1, 128}, side by side.

    python -m ffnfusion.benchmarks.cpu_fusion                      # two synthetic cases (no download)
    python -m ffnfusion.benchmarks.cpu_fusion --model out/demo/dropped --groups 5-6

Default cases, both SmolLM2-shaped (hidden 576, FFN 1536, 30 layers, float32, random weights):

* ``smollm2``: attention removed in 10-17, fused 10-16 (the run minus its last FFN);
* ``ffn-stack``: attention removed everywhere, fused 0-7,8-15,16-23,24-28 (groups 12288 wide).

Each case runs the unfused model and the fused one in both layouts (``fuse --target gpu`` and
``--target cpu``) interleaved, and prints the median ratio to the unfused model per shape
(<= 1.00: fusion is not slower).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile

CASES = {  # name: (attention-free layers, groups)
    "smollm2": (list(range(10, 18)), "10-16"),
    "ffn-stack": (list(range(30)), "0-7,8-15,16-23,24-28"),
}
TARGETS = ("gpu", "cpu")


def run_case(unfused: pathlib.Path, groups: str, work: pathlib.Path, repeats: int, threads: int):
    from ffnfusion.passes.plan import FusionPlan
    from ffnfusion.runtime.bench import benchmark
    from ffnfusion.runtime.model_rewrite import fuse_model_file

    paths = [str(unfused)]
    for target in TARGETS:
        fused = work / f"fused-{target}" / "model.onnx"
        fuse_model_file(str(unfused), str(fused), FusionPlan.parse(groups), target=target)
        paths.append(str(fused))
    rows, _ = benchmark(paths, [1, 8], [1, 128], repeats=repeats, threads=threads)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="unfused model (file or directory) instead of the synthetic cases")
    parser.add_argument("--groups", default="10-16", help="groups to fuse in --model (default 10-16)")
    parser.add_argument("--case", choices=sorted(CASES), action="append",
                        help="synthetic case(s) to run (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=30, help="interleaved timed runs per shape (default 30)")
    args = parser.parse_args(argv)

    from ffnfusion.cli.progress import configure_logging, log
    from ffnfusion.exporters.synthetic import write_synthetic
    from ffnfusion.runtime.bench import format_rows

    configure_logging()

    tables = []
    work = pathlib.Path(tempfile.mkdtemp(prefix="ffnfusion-cpu-"))
    try:
        if args.model:
            unfused = pathlib.Path(args.model)
            cases = [(str(unfused), unfused / "model.onnx" if unfused.is_dir() else unfused, args.groups)]
        else:
            cases = []
            for name in args.case or list(CASES):
                dropped, groups = CASES[name]
                path = write_synthetic("smollm2", work / name / "unfused", dropped=dropped)
                cases.append((name, path / "model.onnx" if path.is_dir() else path, groups))
        for name, unfused, groups in cases:
            log(f"[{name}] fusing {groups} (gpu and cpu layouts), timing {args.repeats} interleaved runs")
            rows = run_case(unfused, groups, work / name, args.repeats, args.threads)
            print(f"\n## {name}: fused {groups}\n\n{format_rows(rows)}", flush=True)
            tables.append((name, groups, rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| case | B | S | fused --target gpu / unfused | fused --target cpu / unfused |\n|---|---|---|---|---|")
    for name, groups, rows in tables:
        for start in range(0, len(rows), 1 + len(TARGETS)):
            unfused_row, *fused_rows = rows[start:start + 1 + len(TARGETS)]
            ratios = " | ".join(f"{row.ratio_to_first:.3f}" for row in fused_rows)
            print(f"| {name} ({groups}) | {unfused_row.batch} | {unfused_row.seq} | {ratios} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
