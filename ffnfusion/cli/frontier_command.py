"""``ffnfusion frontier``: the depth-reduction frontier of a model (search, baselines, models, report)."""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from ffnfusion.cli.progress import log
from ffnfusion.cli.registry import arguments, command, parse_int_list
from ffnfusion.core.errors import InvalidArgumentError
from ffnfusion.core.files import staged_directory

DEFAULT_FIT_TOKENS = 4096
DEFAULT_SELECT_TOKENS = 512
DEFAULT_EVAL_TOKENS = 4096


def _frontier_arguments(parser: argparse.ArgumentParser) -> None:
    from ffnfusion.cli.model_commands import _stream_arguments
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
    parser.add_argument("--calib", nargs="+", metavar="FILE",
                        help="calibration texts: the refits fit on all but the last, candidates are scored on "
                             "the last (another kind of text); default: Python's docs to fit, license texts "
                             "to score")
    parser.add_argument("--calib-ids", "--token-ids", dest="calib_ids", nargs="+", metavar="IDS.npy",
                        help="token ids instead of texts, same roles")
    parser.add_argument("--tokens", type=int, default=DEFAULT_FIT_TOKENS,
                        help=f"fitting tokens (default {DEFAULT_FIT_TOKENS})")
    parser.add_argument("--select-tokens", type=int, default=DEFAULT_SELECT_TOKENS,
                        help=f"selection tokens that score candidates (default {DEFAULT_SELECT_TOKENS})")
    parser.add_argument("--eval", nargs="+", metavar="FILE",
                        help="held-out text for perplexity, never used to choose (default: IDLE's release notes)")
    parser.add_argument("--eval-ids", metavar="IDS.npy", help="held-out token ids instead")
    parser.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS,
                        help=f"held-out tokens (default {DEFAULT_EVAL_TOKENS})")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help=f"tokens per window (default {DEFAULT_WINDOW})")
    parser.add_argument("--target", choices=("auto", "gpu", "cpu"), default="auto",
                        help="layout of fused groups in the written models (as fuse --target)")
    parser.add_argument("--no-latency", dest="latency", action="store_false",
                        help="skip the ONNX Runtime latency of the written models")
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")
    _stream_arguments(parser)


@command("frontier", "how much depth to take out, at what quality, and how",
         "Searches removals of attention/FFN sublayers and whole blocks and fusions of attention-free FFNs "
         "(each with a closed-form refit of the FFN before the cut), scored by KL(original || candidate) "
         "on calibration text held out from the fits; measures the single-method baselines at the same "
         "budgets, the perplexity of every point on a held-out text, and ONNX Runtime latency of the "
         "written models. Steps: removing an attention or FFN saves 1, a block 2, fusing k FFNs k-1.")
@arguments(_frontier_arguments)
def run_frontier_command(args) -> None:
    from ffnfusion.core.model_io import load_model, model_file
    from ffnfusion.passes.blocks import find_blocks
    from ffnfusion.runtime.frontier.frontier import check_steps, run_frontier

    path = model_file(args.model)
    check_steps(find_blocks(load_model(path)).num_layers, args.steps)
    baselines = [] if args.baselines == "none" else [b for b in args.baselines.split(",") if b]
    fit, select = _calibration(args, path.parent)
    evaluation = _evaluation(args, path.parent)
    out = pathlib.Path(args.output)
    result = run_frontier(path, fit=fit, select=select, evaluation=evaluation, steps=args.steps,
                          method=args.method, baselines=baselines, threads=args.threads, stream=args.stream)
    write_frontier(result, path, out, evaluation, target=args.target, latency=args.latency, threads=args.threads,
                   stream=args.stream)
    print((out / "frontier.md").read_text())


def write_frontier(result, model_path: pathlib.Path, out: pathlib.Path, evaluation: np.ndarray, *,
                   target: str = "auto", latency: bool = True, threads: int | None = None,
                   stream: bool | None = None) -> None:
    """``out/``: a runnable ``steps-N/`` per point, frontier.json, frontier.md, frontier.png."""
    from ffnfusion.cli.report import plot_frontier, write_frontier_markdown
    from ffnfusion.core.files import write_json_atomically

    out.mkdir(parents=True, exist_ok=True)
    _write_models(result, model_path, out, evaluation, target, latency, threads, stream)
    write_json_atomically(out / "frontier.json", result.to_dict())
    write_frontier_markdown(result, out / "frontier.md")
    plot_frontier(result, out / "frontier.png")
    log(f"frontier: wrote {out} (frontier.json, frontier.md, frontier.png, "
        f"{', '.join(f'steps-{p.steps_saved}' for p in result.points)})")


def _calibration(args, model_dir: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """(fitting windows, selection windows): all sources but the last fit, the last scores."""
    from ffnfusion.runtime import calibration

    if args.calib_ids:
        named = [calibration.load_token_ids(p).reshape(-1) for p in args.calib_ids]
    else:
        tokenizer = calibration.load_tokenizer(model_dir)
        texts = ([lambda p=p: calibration.read_texts([p]) for p in args.calib] if args.calib
                 else [calibration.python_docs_text, calibration.license_text])
        named = [tokenizer(text(), return_tensors="np")["input_ids"][0] for text in texts]
    if len(named) == 1:
        log("frontier: one calibration source: its last windows score candidates (a second, different text "
            "is better: the selection should not be the kind of text the refits fit)")
        ids = named[0]
        cut = max(0, len(ids) - args.select_tokens)
        named = [ids[:cut], ids[cut:]]
    fit = calibration.windows_from_ids(np.concatenate(named[:-1]), args.tokens, args.window)
    select = calibration.windows_from_ids(named[-1], args.select_tokens, args.window)
    if len(fit) < 2:
        raise InvalidArgumentError(f"--tokens {args.tokens} gives {len(fit)} window(s); the refits need at least "
                                   f"2 (one held out to choose their strength): use --tokens >= {2 * args.window}")
    return fit, select


def _evaluation(args, model_dir: pathlib.Path) -> np.ndarray:
    from ffnfusion.runtime import calibration

    if args.eval_ids:
        return calibration.windows_from_ids(calibration.load_token_ids(args.eval_ids), args.eval_tokens, args.window)
    text = calibration.read_texts(args.eval) if args.eval else calibration.release_notes_text()
    ids = calibration.load_tokenizer(model_dir)(text, return_tensors="np")["input_ids"][0]
    return calibration.windows_from_ids(ids, args.eval_tokens, args.window)


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
