"""Fused vs unfused latency on ONNX Runtime CPU, SmolLM2-shaped, at B in {1, 8} x S in {1, 128}.

    python -m ffnfusion.benchmarks.cpu_fusion                      # synthetic SmolLM2 shape (no download)
    python -m ffnfusion.benchmarks.cpu_fusion --model out/demo/dropped --groups 5-6

Default: the ``smollm2`` synthetic preset (hidden 576, FFN 1536, 30 layers, attention removed in
10-17), fused by the whole run minus its last FFN (10-16). Prints the bench table and the
fused/unfused median ratio per shape (<= 1.00 means fusion is not slower), measured side by side.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="unfused model (file or directory); default: synthetic smollm2 preset")
    parser.add_argument("--groups", default="10-16", help="groups to fuse (default 10-16)")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)

    from ffnfusion import commands
    from ffnfusion.exporters.synthetic import write_synthetic
    from ffnfusion.passes.plan import FusionPlan
    from ffnfusion.runtime.bench import benchmark, format_rows

    work = pathlib.Path(tempfile.mkdtemp(prefix="ffnfusion-cpu-"))
    try:
        unfused = pathlib.Path(args.model) if args.model else write_synthetic("smollm2", work / "unfused", log=commands.log)
        if unfused.is_dir():
            unfused = unfused / "model.onnx"
        fused = work / "fused" / "model.onnx"
        commands.fuse(str(unfused), str(fused), FusionPlan.parse(args.groups))
        rows, _ = benchmark([str(unfused), str(fused)], [1, 8], [1, 128], repeats=args.repeats, threads=args.threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(format_rows(rows))
    print("\n| batch | seq | fused / unfused (median) |\n|---|---|---|")
    for row in rows[1::2]:
        print(f"| {row.batch} | {row.seq} | {row.ratio_to_first:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
