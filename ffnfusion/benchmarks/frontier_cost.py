"""What the frontier's search costs, and what it finds for that cost: the search as it was (every
candidate scored on all selection tokens, fitting streams brought up to date at every step, every
accepted move and every refit run again) beside today's default (the same path by construction) and
the screened races, same model, same tokens, same machine, one run.

    python -m ffnfusion.benchmarks.frontier_cost MODEL [--steps 8,14,20] [--screen 128,256]
        [--contenders 2] [--guess 128] [--calib python-docs licenses] [--eval idle-news]
        [--eval-also brown moby-dick] [--json FILE]

For each variant: full-forward equivalents of the search (sublayer forwards in full forwards of the
selection tokens; ``frontier.json``'s ``search_full_forward_equivalents``), its wall time, and at every
budget the KL on the selection tokens and the held-out perplexity of the point it chose, with the
ratio to the unscreened search's. Frontier defaults otherwise (4,096 fitting tokens, 512 selection
tokens, 4,096 held-out tokens). ``--eval-also``: every point's perplexity on more held-out texts, and per
budget the geometric mean of its ratios to the unscreened search's over all of them (one text's
perplexity moves by several percent between paths of equal KL).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

from ffnfusion.runtime.frontier import search


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an exported model folder or .onnx file (e.g. `ffnfusion export smollm2`)")
    parser.add_argument("--steps", default="8,14,20", help="budgets (default 8,14,20)")
    parser.add_argument("--screen", default="128",
                        help="screening token counts to compare, comma-separated (default 128)")
    parser.add_argument("--contenders", type=int, default=2,
                        help="screened races: the best screened moves scored in full per step (default 2)")
    parser.add_argument("--refitted", type=int, default=search.REFITTED,
                        help=f"screened races: contenders tried with their refit (default {search.REFITTED})")
    parser.add_argument("--guess", default="",
                        help="first-step guess token counts to compare (--guess-tokens), comma-separated (default: none)")
    parser.add_argument("--calib", nargs="+", default=["python-docs", "licenses"],
                        help="frontier --calib: fitting sources then the selection source")
    parser.add_argument("--eval", default="idle-news", help="held-out perplexity text (default idle-news)")
    parser.add_argument("--calib-ids", nargs="+", metavar="IDS.npy", help="token ids instead of --calib")
    parser.add_argument("--eval-ids", metavar="IDS.npy", help="token ids instead of --eval")
    parser.add_argument("--eval-also", nargs="+", default=[], metavar="TEXT",
                        help="more held-out texts (e.g. brown moby-dick, or IDS.npy files): every variant's points measured on each "
                             "too, with the geometric mean over all held-out texts")
    parser.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)

    from ffnfusion.cli.progress import configure_logging
    from ffnfusion.core.model_io import model_file
    from ffnfusion.runtime.block_runner import BlockRunner, choose_streamed
    from ffnfusion.runtime.frontier.evaluator import DepthEvaluator
    from ffnfusion.runtime.frontier.frontier import run_frontier
    from ffnfusion.runtime.frontier.windows import evaluation_windows, fit_and_select_windows

    configure_logging()
    path = model_file(args.model)
    steps = [int(s) for s in args.steps.split(",")]
    fit, select = fit_and_select_windows(path.parent, args.calib, ids_files=args.calib_ids or (),
                                         window=args.window)
    evaluation = evaluation_windows(path.parent, [args.eval], ids_file=args.eval_ids, window=args.window)
    # Rows print as they land, the screened races before the default (its path is the unscreened
    # one's by construction): a run cut short still compares the races with the old search.
    variants = {"unscreened (as before)": search.UNSCREENED}
    for screen in (int(s) for s in args.screen.split(",") if s):
        variants[f"race: screen {screen}, {args.contenders} contenders, {args.refitted} refitted"] = \
            search.SearchOptions(screen_tokens=screen, contenders=args.contenders, refitted=args.refitted)
    for guess in (int(g) for g in args.guess.split(",") if g):
        variants[f"first step guessed on {guess} tokens"] = search.SearchOptions(guess_tokens=guess)
    variants["default (lazy fitting streams, reuse)"] = search.DEFAULT_SEARCH
    also = {text: evaluation_windows(path.parent, [text], ids_file=text if text.endswith(".npy") else None,
                                     window=args.window) for text in args.eval_also}
    judge = DepthEvaluator(BlockRunner(path, streamed=choose_streamed(path, None)), fit, select) if also else None
    rows = []
    for name, options in variants.items():
        clock = time.perf_counter()
        result = run_frontier(path, fit=fit, select=select, evaluation=evaluation, steps=steps, baselines=(),
                              search_options=options)
        also_ppl = {text: {p.steps_saved: judge.perplexity(p.plan, p.deltas, windows) for p in result.points}
                    for text, windows in also.items()} if judge else {}
        rows.append({"variant": name, "options": options.to_dict(),
                     "full_forward_equivalents": round(result.full_forward_equivalents, 1),
                     "cost_by_work": {k: round(v, 1) for k, v in result.cost_by_work.items()},
                     "search_seconds": result.seconds.get("auto"), "seconds": round(time.perf_counter() - clock, 1),
                     "points": {p.steps_saved: {"kl": round(p.kl, 5), "ppl": round(p.ppl or 0, 3),
                                                "moves": [m["move"] + " " + str(m["layers"]) for m in p.moves],
                                                **{f"ppl {text}": round(also_ppl[text][p.steps_saved], 3)
                                                   for text in also}}
                                for p in result.points}})
        print(_row(rows[0], rows[-1], steps), flush=True)
    print("\n| search | full-forward equivalents | search time | " +
          " | ".join(f"{s} steps: KL, perplexity (vs unscreened)" for s in steps) + " | same path |")
    print("|---|---|---|" + "---|" * len(steps) + "---|")
    for row in rows:
        print(_row(rows[0], row, steps))
    if also:
        texts = [args.eval_ids or args.eval, *also]
        print("\n| search | " + " | ".join(f"{s} steps: " + " / ".join(texts) + " (geometric mean vs unscreened)"
                                        for s in steps) + " |")
        print("|---|" + "---|" * len(steps))
        for row in rows:
            print(_also_row(rows[0], row, steps, list(also)))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _also_row(base: dict, row: dict, steps: list[int], also: list[str]) -> str:
    cells = [row["variant"]]
    for s in steps:
        point, reference = row["points"].get(s), base["points"].get(s)
        if point is None or reference is None:
            cells.append("—")
            continue
        keys = ["ppl", *(f"ppl {text}" for text in also)]
        ratio = math.prod(point[k] / reference[k] for k in keys) ** (1 / len(keys))
        cells.append(" / ".join(f"{point[k]:.2f}" for k in keys) + f" ({ratio - 1:+.1%})")
    return "| " + " | ".join(cells) + " |"


def _row(base: dict, row: dict, steps: list[int]) -> str:
    cells = [row["variant"], f"{row['full_forward_equivalents']} ({row['full_forward_equivalents'] / base['full_forward_equivalents']:.2f}×)",
             f"{row['search_seconds']} s"]
    for s in steps:
        point, reference = row["points"].get(s), base["points"].get(s)
        if point is None or reference is None:
            cells.append("—")
            continue
        cells.append(f"{point['kl']:.4f}, {point['ppl']:.2f} ({point['ppl'] / reference['ppl'] - 1:+.1%})")
    same = all(row["points"].get(s, {}).get("moves") == base["points"].get(s, {}).get("moves") for s in steps)
    return "| " + " | ".join(cells) + f" | {'yes' if same else 'no'} |"


if __name__ == "__main__":
    sys.exit(main())
