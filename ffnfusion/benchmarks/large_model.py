"""Fuse a model larger than RAM and compare with the physical floor (``cp`` of its data).

    python -m ffnfusion.benchmarks.large_model                 # llama-8b preset, ~15 GB, ~50 GB disk
    python -m ffnfusion.benchmarks.large_model --preset smollm2  # quick

Prints, measured side by side in one run: time and peak RSS of ``cp model.onnx.data``, ``fuse``,
``drop-attention`` and ``inspect`` (each in its own process), the fuse/cp time ratio, and the
exactness of one fused group against the parallel sum, computed in numpy from the external data.
Everything it writes is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

DEFAULT_GROUPS = {"llama-8b": "12-15,16-19,20-23,24-26", "smollm2": "10-13,14-16", "tiny": "2-3"}
DROP = {"llama-8b": "0-1", "smollm2": "0-1", "tiny": "0"}


def measured(command: list[str]) -> tuple[float, float]:
    """Run ``command`` in a fresh wrapper process; return (seconds, peak RSS in GiB of the command)."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "code = subprocess.run(sys.argv[1:]).returncode; "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             "sys.exit(code)")
    out = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{out.stderr[-2000:]}")
    seconds, rss_kib = out.stdout.split()[-2:]
    return float(seconds), int(rss_kib) / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-8b", choices=sorted(DEFAULT_GROUPS))
    parser.add_argument("--workdir", help="scratch directory (default: a new one under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the models written")
    args = parser.parse_args(argv)
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="ffnfusion-bench-"))
    cli = [sys.executable, "-m", "ffnfusion.cli"]
    source, fused, dropped = work / "synth", work / "fused" / "model.onnx", work / "dropped" / "model.onnx"
    rows = []
    try:
        if not (source / "model.onnx").is_file():
            seconds, rss = measured([*cli, "synth", args.preset, "-o", str(source)])
            rows.append(("synth (write random weights)", seconds, rss))
        data = source / "model.onnx.data"
        size = data.stat().st_size / 2**30
        copy = work / "copy.data"
        cp_seconds, cp_rss = measured(["cp", str(data), str(copy)])
        copy.unlink()
        rows.append((f"cp model.onnx.data ({size:.1f} GiB)", cp_seconds, cp_rss))
        groups = DEFAULT_GROUPS[args.preset]
        fuse_seconds, fuse_rss = measured([*cli, "fuse", str(source), "-o", str(fused), "--groups", groups])
        rows.append((f"fuse --groups {groups}", fuse_seconds, fuse_rss))
        from ffnfusion.passes.layer_ranges import parse_groups
        from ffnfusion.runtime.exactness import fused_group_error

        exactness = fused_group_error(str(source / "model.onnx"), str(fused), parse_groups(groups)[0])
        shutil.rmtree(fused.parent)
        seconds, rss = measured([*cli, "drop-attention", str(source), "-o", str(dropped), "--layers", DROP[args.preset]])
        rows.append((f"drop-attention --layers {DROP[args.preset]}", seconds, rss))
        shutil.rmtree(dropped.parent)
        seconds, rss = measured([*cli, "inspect", str(source)])
        rows.append(("inspect", seconds, rss))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.preset}: {size:.1f} GiB of weights ({'kept in ' + str(work) if args.keep else 'deleted'})")
    print("| step | seconds | peak RSS (GiB) |\n|---|---|---|")
    for name, seconds, rss in rows:
        print(f"| {name} | {seconds:.1f} | {rss:.2f} |")
    print(f"\nfuse time / cp time = {fuse_seconds / cp_seconds:.2f} (target <= 2.0); "
          f"fuse peak RSS {fuse_rss:.2f} GiB (target <= 2)")
    print(f"exactness of group {exactness['group'][0]}-{exactness['group'][1]} (width {exactness['width']}) vs "
          f"parallel sum, numpy from external data: rel err {exactness['rel_err']:.2e}")
    print(json.dumps({"rows": rows, "fuse_over_cp": fuse_seconds / cp_seconds, "exactness": exactness}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
