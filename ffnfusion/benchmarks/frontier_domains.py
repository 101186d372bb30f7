"""Where a frontier's calibration text matters: the points of two frontier runs (say, fitted on
Python's docs and fitted on the broad mix) side by side, perplexity on several texts, one run.

    python -m ffnfusion.benchmarks.frontier_domains --reference BASE LABEL=FRONTIER_DIR ... \\
        [--steps 8,14,20] [--eval idle-news moby-dick licenses sotu] [--json FILE]

Each text is read by name or path (4,096 tokens spread over it); every model's perplexity is measured
on the written files with ONNX Runtime.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

EVAL_TEXTS = ("idle-news", "moby-dick", "licenses", "sotu")
EVAL_TOKENS = 4096


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("frontiers", nargs="+", metavar="LABEL=DIR", help="frontier output folders to compare")
    parser.add_argument("--reference", required=True, help="the original model")
    parser.add_argument("--steps", default="8,14,20", help="points (default 8,14,20)")
    parser.add_argument("--eval", nargs="+", default=list(EVAL_TEXTS), help="texts, names or files")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)

    from ffnfusion.cli.progress import configure_logging
    from ffnfusion.core.model_io import model_file
    from ffnfusion.runtime import calibration
    from ffnfusion.runtime.frontier.frontier import file_perplexity

    configure_logging()
    reference = model_file(args.reference)
    tokenizer = calibration.load_tokenizer(reference.parent)
    texts = {name: calibration.windows_from_ids(
        tokenizer(calibration.read_text(name, EVAL_TOKENS * 16), return_tensors="np")["input_ids"][0],
        EVAL_TOKENS, calibration.DEFAULT_WINDOW) for name in args.eval}
    rows = [{"model": "original", **{n: file_perplexity(reference, w) for n, w in texts.items()}}]
    for spec in args.frontiers:
        label, _, folder = spec.partition("=")
        for steps in args.steps.split(","):
            path = pathlib.Path(folder) / f"steps-{steps}"
            rows.append({"model": f"{label}, {steps} steps", **{n: file_perplexity(path, w) for n, w in texts.items()}})
    header = "| model | " + " | ".join(texts) + " |"
    print("\n" + header + "\n" + "|---" * (len(texts) + 1) + "|")
    for row in rows:
        print(f"| {row['model']} | " + " | ".join(f"{row[n]:.2f}" for n in texts) + " |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
