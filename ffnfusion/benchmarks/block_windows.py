"""Whole blocks side by side, as the paper chose them: windows of ``--size`` blocks ranked on the
full-block dependency matrix (lowest ``M_max``, ties by ``M_sum``), the best 1, 2, … ``--count`` of
them run in parallel form (``ffnfusion parallelize``), each model's held-out perplexity and KL to
the original measured in one run.

    python -m ffnfusion.benchmarks.block_windows MODEL [--size 4] [--count 4] [--work DIR]

``M`` comes from ``ffnfusion analyze`` on the model (``--report report.json`` reuses one; it must
cover pairs ``size − 1`` apart): by default on Python's documentation, 4,096 tokens, ``M`` on 1,024.
Held out: IDLE's release notes, 4,096 tokens (``--eval-ids`` for token ids), text the analysis never
read — the frontier's default, so its tables compare. The paper (Llama-3.1-405B derived, MMLU)
found pairs of 4-block windows near the original and a fourth window collapsing it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

EVAL_TOKENS = 4096
WINDOW = 512


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the exported model (attention in every layer)")
    parser.add_argument("--size", type=int, default=4, help="blocks per window (default 4, the paper's)")
    parser.add_argument("--count", type=int, default=4, help="largest number of windows (default 4)")
    parser.add_argument("--work", default="out/block-windows", help="directory for the report and the models")
    parser.add_argument("--report", help="an analyze report.json of MODEL to rank windows on (default: analyze)")
    parser.add_argument("--calib-ids", help="token ids for the analysis (default: Python's documentation)")
    parser.add_argument("--eval-ids", help="held-out token ids (default: IDLE's release notes)")
    parser.add_argument("--tokens", type=int, default=EVAL_TOKENS, help="analysis and held-out tokens (default 4096)")
    parser.add_argument("--window", type=int, default=WINDOW, help="tokens per window (default 512)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)

    from ffnfusion.cli.progress import configure_logging
    from ffnfusion.core.model_io import model_file
    from ffnfusion.runtime import calibration
    from ffnfusion.runtime.analysis import DependencyReport, analyze_model, rank_block_windows
    from ffnfusion.runtime.corpora import release_notes_text
    from ffnfusion.runtime.model_rewrite import parallelize_model_file
    from ffnfusion.runtime.verify import compare_many

    configure_logging()
    model = model_file(args.model)
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.report:
        report = DependencyReport.load(args.report)
    else:
        windows = calibration.calibration_windows(model.parent, ids_file=args.calib_ids, tokens=args.tokens,
                                                  window=args.window)
        report, _ = analyze_model(model, windows, max_distance=max(8, args.size - 1),
                                  dependency_tokens=min(1024, windows.size))
        report.save(work / "report.json")
    ranked = rank_block_windows(report, args.size)[:args.count]
    if not ranked:
        print(f"no window of {args.size} whole blocks in {model}", file=sys.stderr)
        return 1
    if args.eval_ids:
        held_out = calibration.windows_from_ids(calibration.load_token_ids(args.eval_ids), args.tokens, args.window)
    else:
        tokenizer = calibration.load_tokenizer(model.parent)
        held_out = calibration.token_windows(tokenizer, release_notes_text(), args.window, args.tokens // args.window)
    candidates = []
    for count in range(1, len(ranked) + 1):
        chosen = sorted(window["layers"] for window in ranked[:count])
        out = work / f"windows-{count}"
        parallelize_model_file(model, out, [list(range(a, b + 1)) for a, b in chosen], validate=False)
        candidates.append(str(out / "model.onnx"))
    results = compare_many(str(model), candidates, held_out)
    rows = []
    print(f"| windows ({args.size} blocks, best first) | M_max | steps saved | held-out ppl | × original | "
          "KL(orig ‖ new) | top-1 agreement |")
    print("|---|---|---|---|---|---|---|")
    print(f"| none (original) | - | 0 | {results[0]['ref']['ppl']:.2f} | 1.00 | 0 | 1 |")
    for count, result in enumerate(results, 1):
        chosen = ranked[:count]
        row = {"windows": [w["layers"] for w in chosen], "m_max": round(chosen[-1]["m_max"], 4),
               "steps_saved": count * (2 * args.size - 2), "ppl": round(result["new"]["ppl"], 3),
               "ratio": round(result["new"]["ppl"] / result["ref"]["ppl"], 3), "kl": round(result["kl"], 4),
               "top1": round(result["top1_agreement"], 4), "original_ppl": round(result["ref"]["ppl"], 3)}
        rows.append(row)
        label = ", ".join(f"{a}-{b}" for a, b in row["windows"])
        print(f"| {label} | {row['m_max']} | {row['steps_saved']} | {row['ppl']:.2f} | {row['ratio']:.2f} | "
              f"{row['kl']:.4f} | {row['top1']:.3f} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"model": str(model), "size": args.size, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
