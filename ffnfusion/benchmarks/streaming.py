"""Block-streamed vs in-RAM: forward time and peak memory side by side, and the llama-8b preset.

    python -m ffnfusion.benchmarks.streaming                   # SmolLM2: in-RAM vs block-streamed forward
    python -m ffnfusion.benchmarks.streaming --llama-8b        # + analyze/verify/repair/frontier, ~15 GB preset

SmolLM2 (exported once into ``--work``): logits for the same tokens from (1) one ONNX Runtime session
of the whole model, (2) :class:`~ffnfusion.runtime.block_runner.BlockRunner` with every block's session
kept (in RAM) and (3) block-streamed (each block's weights loaded when needed, then released). Each
runs in its own process, so each peak RSS is its own. The llama-8b preset (attention removed in
12-27, float16) runs ``analyze``, ``verify`` against fused copies (one group of 4 FFNs, then two of 8
and 7), ``fuse --repair`` and a 2-move ``frontier`` with ``--stream``, one process each, and prints
their wall time and peak RSS side by side (hours on 2 cores: the frontier's first step scores every
move, each streaming the rest of the model).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

FORWARD = """
import json, sys, time, numpy as np
mode, path, tokens, window = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ids = np.random.default_rng(0).integers(0, 32000, (tokens // window, window))
start = time.perf_counter()
if mode == "session":
    from ffnfusion.runtime.onnxruntime import create_session, run_logits
    session = create_session(path)
    build = time.perf_counter() - start
    start = time.perf_counter()
    logits = run_logits(session, ids)
else:
    from ffnfusion.runtime.block_runner import BlockRunner
    runner = BlockRunner(path, streamed=mode == "streamed")
    build = 0.0
    logits = runner.logits(ids)
seconds = time.perf_counter() - start
np.save(sys.argv[5], logits[:, -4:])  # a slice, to compare the modes' numbers
print(json.dumps({"seconds": seconds + build, "forward_seconds": seconds, "load_seconds": build}))
"""


def run_measured(argv: list[str]) -> tuple[float, float, str]:
    """Run ``argv`` as a child; returns (wall seconds, the child's own peak RSS in GiB, its stdout)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(argv, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)  # reaps the child: its rusage alone
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if child.returncode:
            raise SystemExit(f"failed ({child.returncode}): {' '.join(argv)}\n{err.read()[-3000:]}")
        return seconds, usage.ru_maxrss / 2**20, out.read()


def smollm2(work: pathlib.Path, tokens: int, window: int, repeats: int) -> list[dict]:
    """Rows of ``{"mode", "seconds" (load + forward), ...}``; the modes interleaved ``repeats`` times."""
    import numpy as np

    model = work / "smollm2" / "model.onnx"
    if not model.is_file():
        subprocess.run([sys.executable, "-m", "ffnfusion.cli", "export", "smollm2", "-o", str(model.parent)], check=True)
    rows = []
    for repeat in range(repeats):
        for mode in ("session", "in-ram", "streamed"):  # interleaved, so load on the machine hits all alike
            out = work / f"logits-{mode}.npy"
            seconds, peak, stdout = run_measured(
                [sys.executable, "-c", FORWARD, mode, str(model), str(tokens), str(window), str(out)])
            rows.append({"mode": mode, "tokens": tokens, "repeat": repeat, "peak_rss_gib": round(peak, 2),
                         **json.loads(stdout)})
    reference = np.load(work / "logits-session.npy")
    for row in rows:
        other = np.load(work / f"logits-{row['mode']}.npy")
        row["rel_err_vs_session"] = float(np.linalg.norm(other - reference) / np.linalg.norm(reference))
    return rows


def llama_8b(work: pathlib.Path) -> list[dict]:
    import numpy as np

    base, fused, repaired = work / "llama-8b", work / "llama-8b-fused", work / "llama-8b-repaired"
    cli = [sys.executable, "-m", "ffnfusion.cli"]
    steps = []

    def step(name: str, argv: list[str]) -> None:
        print(f"[llama-8b] {name}: {' '.join(argv[2:])}", file=sys.stderr, flush=True)
        seconds, peak, _ = run_measured(argv)
        steps.append({"step": name, "seconds": round(seconds, 1), "peak_rss_gib": round(peak, 2)})
        print(f"[llama-8b] {name}: {seconds:.1f} s, peak RSS {peak:.2f} GiB", file=sys.stderr, flush=True)

    if not (base / "model.onnx").is_file():
        step("synth (random weights, float16)", [*cli, "synth", "llama-8b", "-o", str(base)])
    rng = np.random.default_rng(0)
    ids = []
    for name in ("source-a", "source-b"):
        ids.append(work / f"{name}.npy")
        np.save(ids[-1], rng.integers(0, 128256, 4096))
    step("analyze (512 tokens)", [*cli, "analyze", str(base), "-o", str(work / "llama-8b-report"), "--token-ids",
                                  str(ids[0]), "--tokens", "512", "--window", "512", "--dependency-tokens", "512",
                                  "--stream"])
    step("fuse 12-15", [*cli, "fuse", str(base), "-o", str(fused), "--groups", "12-15", "--no-validate"])
    step("verify vs fused (512 tokens)", [*cli, "verify", str(base), str(fused), "--token-ids", str(ids[0]),
                                          "--tokens", "512", "--window", "512", "--stream"])
    shutil.rmtree(fused, ignore_errors=True)
    step("fuse 12-15 --repair (2048 tokens)", [*cli, "fuse", str(base), "-o", str(repaired), "--groups", "12-15",
                                               "--repair", "--repair-tokens", "2048", "--token-ids", *map(str, ids),
                                               "--stream", "--no-validate"])
    shutil.rmtree(repaired, ignore_errors=True)
    # eight 8B FFNs in one unit (2.8 GB of weights): the case that peaked at 6.4 GiB before column blocks
    step("fuse 12-19,20-26", [*cli, "fuse", str(base), "-o", str(fused), "--groups", "12-19,20-26", "--no-validate"])
    step("verify vs fused 12-19,20-26 (512 tokens, windows of 256)",
         [*cli, "verify", str(base), str(fused), "--token-ids", str(ids[0]), "--tokens", "512", "--window", "256",
          "--stream"])
    shutil.rmtree(fused, ignore_errors=True)
    # the preset's attention-free 12-27 already save 16 of the 64 steps: two moves beyond them
    step("frontier --steps 18 (2 moves; 256 fitting, 128 selection tokens)",
         [*cli, "frontier", str(base), "-o", str(work / "llama-8b-frontier"), "--steps", "18", "--tokens", "256",
          "--select-tokens", "128", "--eval-tokens", "256", "--window", "128", "--calib-ids", *map(str, ids),
          "--eval-ids", str(ids[0]), "--baselines", "none", "--no-latency", "--stream"])
    shutil.rmtree(work / "llama-8b-frontier", ignore_errors=True)
    return steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="out/streaming", help="exports and scratch models (default out/streaming)")
    parser.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 8192],
                        help="SmolLM2 forward tokens, comma-separated (default 2048,8192)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per mode (default 3)")
    parser.add_argument("--llama-8b", action="store_true", help="also the llama-8b preset (~30 GB disk, ~1 h)")
    parser.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 comparison")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    rows = []
    labels = {"session": "one ORT session (in RAM)", "in-ram": "block by block, sessions kept",
              "streamed": "block-streamed"}
    print("\nSmolLM2-135M, windows of 512, median of interleaved runs, each run in its own process; time =\n"
          "loading + forward to logits (one session: its load is also shown apart)\n")
    print("| tokens | mode | load + forward s | ratio to one session | forward only s | peak RSS GiB | logits rel. err vs one session |")
    print("|---|---|---|---|---|---|---|")
    for tokens in [] if args.no_smollm2 else args.tokens:
        measured = smollm2(work, tokens, args.window, args.repeats)
        rows += measured
        by_mode: dict[str, list[dict]] = {}
        for row in measured:
            by_mode.setdefault(row["mode"], []).append(row)

        def median(mode: str, key: str, by_mode=by_mode) -> float:
            values = sorted(r[key] for r in by_mode[mode])
            return values[len(values) // 2]

        for mode, mode_rows in by_mode.items():
            forward = f"{median(mode, 'forward_seconds'):.2f}" if mode == "session" else ""
            print(f"| {tokens} | {labels[mode]} | {median(mode, 'seconds'):.2f} | "
                  f"{median(mode, 'seconds') / median('session', 'seconds'):.2f} | {forward} | "
                  f"{max(r['peak_rss_gib'] for r in mode_rows):.2f} | {mode_rows[0]['rel_err_vs_session']:.1e} |",
                  flush=True)
    result = {"smollm2": rows}
    if args.llama_8b:
        steps = llama_8b(work)
        result["llama_8b"] = steps
        print("\nllama-8b preset (32 layers, hidden 4096, FFN 14336, float16, 13.7 GiB), --stream\n")
        print("| step | seconds | peak RSS GiB |\n|---|---|---|")
        for s in steps:
            print(f"| {s['step']} | {s['seconds']} | {s['peak_rss_gib']} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
