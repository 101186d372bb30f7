"""``ffnfusion frontier``: the depth-reduction frontier of a model (search, baselines, models, report)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import numpy as np

from ffnfusion.cli.arguments import device_argument, stream_arguments
from ffnfusion.cli.progress import log
from ffnfusion.cli.registry import arguments, command, parse_int_list
from ffnfusion.core.errors import InvalidArgumentError
from ffnfusion.core.files import staged_directory
from ffnfusion.runtime.device import CPU, Device, resolve_device
from ffnfusion.runtime.frontier.search import DEFAULT_SEARCH
from ffnfusion.runtime.frontier.windows import (
    DEFAULT_CALIB,
    DEFAULT_EVAL,
    DEFAULT_EVAL_TOKENS,
    DEFAULT_FIT_TOKENS,
    DEFAULT_SELECT_TOKENS,
)


def _frontier_arguments(parser: argparse.ArgumentParser) -> None:
    from ffnfusion.runtime.calibration import DEFAULT_WINDOW
    from ffnfusion.runtime.frontier.frontier import BASELINES
    from ffnfusion.runtime.frontier.search import METHODS

    parser.add_argument("model", help="the exported model (attention and FFN in every layer)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR",
                        help="frontier.json, frontier.md, frontier.png and a runnable steps-N/ per budget")
    parser.add_argument("--steps", type=parse_int_list, default=[8, 14, 20],
                        help="sequential steps to save, comma-separated (default 8,14,20)")
    parser.add_argument("--method", choices=METHODS, default="auto",
                        help="auto: greedy over removals and fusions with refits, lazily re-scored (default); "
                             "greedy-plain: every move scored each step, no refit; the others are the "
                             "single-method baselines")
    parser.add_argument("--baselines", default=",".join(BASELINES),
                        help=f"methods measured beside it, comma-separated or 'none' (default {','.join(BASELINES)})")
    parser.add_argument("--calib", nargs="+", metavar="NAME|FILE",
                        help="calibration texts, named sources or files: the refits fit on all but the last "
                             "(equal shares), candidates are scored on the last (another kind of text); default: "
                             f"{' '.join(DEFAULT_CALIB[:-1])} to fit, {DEFAULT_CALIB[-1]} to score")
    parser.add_argument("--calib-ids", "--token-ids", dest="calib_ids", nargs="+", metavar="IDS.npy",
                        help="token ids instead of texts, same roles")
    parser.add_argument("--tokens", type=int, default=DEFAULT_FIT_TOKENS,
                        help=f"fitting tokens (default {DEFAULT_FIT_TOKENS})")
    parser.add_argument("--select-tokens", type=int, default=DEFAULT_SELECT_TOKENS,
                        help=f"selection tokens that score candidates (default {DEFAULT_SELECT_TOKENS})")
    parser.add_argument("--eval", nargs="+", metavar="NAME|FILE",
                        help=f"held-out text for perplexity, never used to choose (default: {DEFAULT_EVAL}; "
                             "idle-news: IDLE's release notes)")
    parser.add_argument("--eval-ids", metavar="IDS.npy", help="held-out token ids instead")
    parser.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS,
                        help=f"held-out tokens (default {DEFAULT_EVAL_TOKENS})")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help=f"tokens per window (default {DEFAULT_WINDOW})")
    parser.add_argument("--target", choices=("auto", "gpu", "cpu"), default="auto",
                        help="layout of fused groups in the written models (as fuse --target)")
    parser.add_argument("--no-latency", dest="latency", action="store_false",
                        help="skip the ONNX Runtime latency of the written models")
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")
    parser.add_argument("--screen-tokens", type=int, default=DEFAULT_SEARCH.screen_tokens, metavar="N",
                        help="auto: score candidates on the first N tokens of each selection window, then the "
                             "best --contenders of them on all tokens, which decide the step (0: every candidate on "
                             f"all of them; default {DEFAULT_SEARCH.screen_tokens}); cheaper, but a different path")
    parser.add_argument("--contenders", type=int, default=DEFAULT_SEARCH.contenders, metavar="M",
                        help=f"with --screen-tokens: screened moves scored in full per step (default "
                             f"{DEFAULT_SEARCH.contenders})")
    parser.add_argument("--guess-tokens", type=int, default=DEFAULT_SEARCH.guess_tokens, metavar="N",
                        help="auto: the first step (no earlier scores to guess from) scores every move on the first N "
                             "tokens of each selection window and scores in full, lazily, only those that may "
                             f"win (0: every move in full; default {DEFAULT_SEARCH.guess_tokens})")
    parser.add_argument("--parallel-window", type=int, default=DEFAULT_SEARCH.parallel_window, metavar="K",
                        help="auto: also search 'parallel' moves, windows of 2..K whole blocks (attention kept) run "
                             "side by side, each saving 2k-2 steps (ffnfusion parallelize); 0: none (default "
                             f"{DEFAULT_SEARCH.parallel_window})")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what the search will cost at most (full-forward equivalents, and minutes at "
                             "the rate of one timed forward) and write nothing")
    parser.add_argument("--heal", action="store_true",
                        help="heal every written point toward the original (ffnfusion heal's defaults; its sources "
                             "are --calib/--calib-ids when given) into steps-N-healed/ and measure its held-out "
                             "perplexity")
    parser.add_argument("--heal-tokens", type=int, default=None, metavar="N",
                        help="with --heal: fitting tokens of the heal (default: heal's, 32768)")
    stream_arguments(parser)
    device_argument(parser)


@command("frontier", "how much depth to take out, at what quality, and how",
         "Searches removals of attention/FFN sublayers and whole blocks and fusions of attention-free FFNs "
         "(each with a closed-form refit of the FFN before the cut), scored by KL(original || candidate) "
         "on calibration text held out from the fits; measures the single-method baselines at the same "
         "budgets, the perplexity of every point on a held-out text, and ONNX Runtime latency of the "
         "written models. Steps: removing an attention or FFN saves 1, a block 2, fusing k FFNs k-1, running "
         "k whole blocks side by side (--parallel-window) 2k-2.")
@arguments(_frontier_arguments)
def run_frontier_command(args) -> None:
    from ffnfusion.core.model_io import load_model, model_file
    from ffnfusion.passes.blocks import find_blocks
    from ffnfusion.runtime.frontier.evaluator import check_searchable
    from ffnfusion.runtime.frontier.frontier import check_steps, run_frontier

    if args.parallel_window < 0 or args.parallel_window == 1:
        raise InvalidArgumentError(f"--parallel-window is 0 (none) or the largest window, at least 2; not {args.parallel_window}")
    if args.heal and (args.parallel_window or args.method == "block-parallel"):
        # heal trains through a Nemotron-NAS checkpoint (one layer per stream step), which has no windows
        raise InvalidArgumentError("--heal cannot train block-parallel windows yet: drop --heal, or "
                                   "--parallel-window / --method block-parallel")
    if args.screen_tokens < 0:
        raise InvalidArgumentError(f"--screen-tokens must be at least 0, not {args.screen_tokens}")
    if args.guess_tokens < 0:
        raise InvalidArgumentError(f"--guess-tokens must be at least 0, not {args.guess_tokens}")
    if args.contenders < 1:
        raise InvalidArgumentError(f"--contenders must be at least 1, not {args.contenders}")
    path = model_file(args.model)
    block_map = find_blocks(load_model(path))
    check_searchable(block_map)
    check_steps(block_map, args.steps)
    baselines = [] if args.baselines == "none" else [b for b in args.baselines.split(",") if b]
    options = dataclasses.replace(DEFAULT_SEARCH, screen_tokens=args.screen_tokens, contenders=args.contenders,
                                  guess_tokens=args.guess_tokens, parallel_window=args.parallel_window)
    fit, select = _calibration(args, path.parent)
    if args.dry_run:
        from ffnfusion.runtime.frontier.frontier import describe_estimate, estimate_frontier

        estimate = estimate_frontier(path, fit=fit, select=select, steps=args.steps, method=args.method,
                                     threads=args.threads, stream=args.stream, search_options=options,
                                     device=args.device)
        print(describe_estimate(args.method, estimate))
        return
    evaluation = _evaluation(args, path.parent)
    device = resolve_device(args.device)  # once, for the search and the heal (logged)
    out = pathlib.Path(args.output)
    result = run_frontier(path, fit=fit, select=select, evaluation=evaluation, steps=args.steps,
                          method=args.method, baselines=baselines, threads=args.threads, stream=args.stream,
                          search_options=options, device=device)
    write_frontier(result, path, out, evaluation, target=args.target, latency=args.latency, threads=args.threads,
                   stream=args.stream, heal=args if args.heal else None, device=device)
    print((out / "frontier.md").read_text())


def write_frontier(result, model_path: pathlib.Path, out: pathlib.Path, evaluation: np.ndarray, *,
                   target: str = "auto", latency: bool = True, threads: int | None = None,
                   stream: bool | None = None, heal=None, device: Device = CPU) -> None:
    """``out/``: a runnable ``steps-N/`` per point (and ``steps-N-healed/`` with ``heal``, the frontier
    command's arguments), frontier.json, frontier.md, frontier.png."""
    from ffnfusion.cli.report import plot_frontier, write_frontier_markdown
    from ffnfusion.core.files import write_json_atomically

    out.mkdir(parents=True, exist_ok=True)
    _write_models(result, model_path, out, evaluation, target, latency, threads, stream)
    if heal:
        _heal_points(result, model_path, out, evaluation, threads, stream, heal, device)
    write_json_atomically(out / "frontier.json", result.to_dict())
    write_frontier_markdown(result, out / "frontier.md")
    plot_frontier(result, out / "frontier.png")
    log(f"frontier: wrote {out} (frontier.json, frontier.md, frontier.png, "
        f"{', '.join(f'steps-{p.steps_saved}' for p in result.points)})")


def _calibration(args, model_dir: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    from ffnfusion.runtime.frontier.windows import fit_and_select_windows

    return fit_and_select_windows(model_dir, args.calib or DEFAULT_CALIB, ids_files=args.calib_ids or (),
                                  tokens=args.tokens, select_tokens=args.select_tokens, window=args.window)


def _evaluation(args, model_dir: pathlib.Path) -> np.ndarray:
    from ffnfusion.runtime.frontier.windows import evaluation_windows

    return evaluation_windows(model_dir, args.eval or [DEFAULT_EVAL], ids_file=args.eval_ids,
                              tokens=args.eval_tokens, window=args.window)


def _write_models(result, path: pathlib.Path, out: pathlib.Path, evaluation: np.ndarray, target: str,
                  latency: bool, threads: int | None, stream: bool | None) -> None:
    """``steps-N/`` per point (replaced whole), its perplexity re-measured on the written file, and
    the latency of all of them against the original, interleaved."""
    from ffnfusion.runtime.frontier.frontier import file_perplexity, write_point_model

    written = []
    for point in result.points:
        final = out / f"steps-{point.steps_saved}"
        with staged_directory(final) as staging:
            write_point_model(path, point, staging, target=target)
            file_ppl = file_perplexity(staging / "model.onnx", evaluation, threads=threads, stream=stream)
            if abs(file_ppl - point.ppl) > 1e-3 * point.ppl:
                log(f"frontier: steps-{point.steps_saved}: the written model's perplexity {file_ppl:.3f} differs "
                    f"from the search's {point.ppl:.3f}")
            point.ppl = file_ppl
        point.model = f"{final.name}/model.onnx"
        written.append(final / "model.onnx")
    if latency and written:
        from ffnfusion.runtime.bench import benchmark

        log(f"frontier: ONNX Runtime latency, B1xS128 prefill and B1 decode, {len(written)} model(s) vs the original")
        rows, _ = benchmark([str(path), *map(str, written)], [1], [128], repeats=10, decode=True, threads=threads)
        for point, model in zip(result.points, written):
            point.latency = {f"{row.phase}_ms": round(row.median_ms, 2) for row in rows if row.model == str(model)}
            point.latency.update({f"{row.phase}_vs_original": round(row.ratio_to_first, 3)
                                  for row in rows if row.model == str(model)})
        log("frontier: latency " + json.dumps({p.steps_saved: p.latency for p in result.points}))


def _heal_points(result, model_path: pathlib.Path, out: pathlib.Path, evaluation: np.ndarray, threads: int | None,
                 stream: bool | None, args, device: Device) -> None:
    """Each written point healed toward the original into ``steps-N-healed/``, its perplexity measured
    on the held-out windows of the table."""
    import dataclasses

    from ffnfusion.runtime.frontier.frontier import file_perplexity
    from ffnfusion.runtime.heal import HealOptions, heal_model_file, heal_sources

    options = HealOptions(device=device.name, window=args.window)
    if args.heal_tokens:
        options = dataclasses.replace(options, tokens=args.heal_tokens)
    sources = heal_sources(model_path.parent, args.calib or (), args.calib_ids or (), options=options)
    for point in result.points:
        healed = out / f"steps-{point.steps_saved}-healed"
        log(f"frontier: healing steps-{point.steps_saved}")
        summary, report = heal_model_file(out / f"steps-{point.steps_saved}", model_path, healed, sources=sources,
                                          options=options)
        ppl = file_perplexity(summary["output"], evaluation, threads=threads, stream=stream)
        point.healed = {"model": f"{healed.name}/model.onnx", "ppl": round(ppl, 3), "changed": report.changed,
                        "summary": report.describe(), "held_out_kl": report.to_dict()["held_out_kl"],
                        "seconds": round(sum(report.seconds.values()), 1)}
        log(f"frontier: steps-{point.steps_saved}: healed perplexity {ppl:.2f} (was {point.ppl:.2f}); {report.describe()}")
