"""``ffnfusion`` command line: a registry of subcommands over a thin argparse front.

Errors from bad input print one line (``ffnfusion: error: ...``) and exit 1 (2 for usage errors);
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ffnfusion.errors import FFNFusionError, UsageError


from ffnfusion.cli_registry import COMMANDS, arguments, command, parse_layer_list


# --- export -------------------------------------------------------------------------------------

def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="'smollm2' (embedded default), a .gguf file, or a Hugging Face folder")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--opset", type=int, default=20, help="ONNX opset, 18-23 (default 20)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="weights and activations dtype (default float32; ORT CPU cannot run bfloat16)")
    parser.add_argument("--drop-attention", type=parse_layer_list, default=[], metavar="LAYERS",
                        help="decoder layers exported without attention, e.g. 10-17 or 3,5-7")
    parser.add_argument("--kv-cache", action="store_true",
                        help="add position_ids and past_key_values.N.key/value inputs, present.N.* outputs")
    parser.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo",
                        help="torch.onnx exporter (default dynamo)")


@command("export", "export a Hugging Face / GGUF model to ONNX",
         "Export a Llama-style causal LM with torch.onnx (dynamo, opset 20 by default): dynamic batch "
         "and sequence axes, inputs input_ids/attention_mask, output logits. Writes DIR/model.onnx, "
         "the tokenizer and DIR/ffnfusion.json.")
@arguments(_export_arguments)
def run_export(args) -> None:
    from ffnfusion import commands
    from ffnfusion.exporters.onnx_export import ExportOptions

    options = ExportOptions(opset=args.opset, dtype=args.dtype, drop_attention=args.drop_attention,
                            kv_cache=args.kv_cache, dynamo=args.exporter == "dynamo")
    commands.export(args.source, args.output, options)


# --- inspect ------------------------------------------------------------------------------------

def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ONNX model (file, or a directory holding model.onnx)")
    parser.add_argument("--json", action="store_true", help="print the BlockMap as JSON")


@command("inspect", "list decoder blocks and attention-free runs",
         "Walk the residual stream and print one row per decoder layer (attention yes/no, FFN width, "
         "norm kind, epsilon, run) and the attention-free runs that can be fused.")
@arguments(_inspect_arguments)
def run_inspect(args) -> None:
    from ffnfusion import commands

    print(commands.inspect(args.model, args.json))


# --- fuse ---------------------------------------------------------------------------------------

def _rewrite_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of every command that writes a rewritten model."""
    parser.add_argument("model", help="ONNX model (file, or a directory holding model.onnx)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output model (.onnx) or directory (model.onnx inside); tokenizer, config.json "
                             "and ffnfusion.json are copied beside it")
    parser.add_argument("--no-validate", action="store_true",
                        help="skip onnx.checker and the ONNX Runtime load of the output")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


def _fuse_arguments(parser: argparse.ArgumentParser) -> None:
    _rewrite_arguments(parser)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--groups", metavar="A-B,C-D",
                       help="inclusive decoder-layer ranges, 0-based as in model.layers.N, e.g. 10-13,14-16")
    which.add_argument("--plan", metavar="PLAN.json", help='a FusionPlan file: {"groups": [[10,11,12,13], ...]}')
    parser.add_argument("--target", choices=("gpu", "cpu"), default="gpu",
                        help="runtime the layout is tuned for: gpu (TensorRT/CUDA, default) keeps the fused "
                             "width; cpu (ONNX Runtime CPU) pads it with zero columns to an odd multiple of 16, "
                             "which avoids cache aliasing in the wide down projection (same outputs)")
    from ffnfusion.runtime.calibration import DEFAULT_REPAIR_TOKENS

    repair = parser.add_argument_group(
        "repair", "refit each group's down projection on calibration text (least squares, no training); "
                  "a refit is kept only where it lowers KL(unfused || fused) on held-out text of another source")
    repair.add_argument("--repair", action="store_true", help="repair the fused groups (needs the tokenizer "
                        "beside the model, or --calib-ids)")
    repair.add_argument("--repair-method", choices=("refit", "scale"), default="refit",
                        help="refit: ridge refit of W_down (default); scale: one scale per output channel")
    repair.add_argument("--repair-tokens", type=int, default=DEFAULT_REPAIR_TOKENS, metavar="N",
                        help=f"fitting tokens, split over the sources (default {DEFAULT_REPAIR_TOKENS}; "
                             "memory ~ 8 N^2 bytes)")
    repair.add_argument("--repair-lambda", default="auto", metavar="L|auto",
                        help="ridge strength relative to mean diag(A^T A); auto tries a grid (default)")
    repair.add_argument("--calib", nargs="+", metavar="FILE",
                        help="text files, one calibration source each (default: Python's documentation topics "
                             "and the license texts of Python and the OS)")
    repair.add_argument("--calib-ids", nargs="+", metavar="IDS.npy", help="token ids instead of text, one source per file")


@command("fuse", "fuse groups of attention-free FFN layers into wide FFNs",
         "Rewrite each group of consecutive attention-free layers into one wide SwiGLU FFN "
         "(norm gains folded into gate/up, weights concatenated) with one residual Add. This computes "
         "x + sum_i FFN_i(norm_i(x)) exactly: the parallel form that FFN Fusion substitutes for the "
         "sequential run.")
@arguments(_fuse_arguments)
def run_fuse(args) -> None:
    from ffnfusion import commands
    from ffnfusion.passes.plan import FusionPlan

    plan = FusionPlan.load(args.plan) if args.plan else FusionPlan.parse(args.groups)
    repair = None
    if args.repair:
        repair = commands.RepairOptions(args.repair_method, args.repair_tokens, args.repair_lambda,
                                        args.calib or (), args.calib_ids or ())
    elif args.calib or args.calib_ids:
        raise UsageError("--calib/--calib-ids are used by --repair; add --repair")
    summary = commands.fuse(args.model, args.output, plan, validate=not args.no_validate, target=args.target,
                            repair=repair)
    if args.json:
        print(json.dumps(summary, indent=2))


# --- calibration arguments (analyze, verify, drop-attention --count) -----------------------------

def _calibration_arguments(parser: argparse.ArgumentParser, flag: str, default_text: str, tokens: int) -> None:
    from ffnfusion.runtime.calibration import DEFAULT_WINDOW

    parser.add_argument(flag, nargs="+", metavar="FILE",
                        help=f"plain-text file(s), tokenised with the tokenizer beside the model "
                             f"(default: {default_text})")
    parser.add_argument(f"{flag}-ids", metavar="IDS.npy", help="token ids instead of text (integer .npy)")
    parser.add_argument("--tokens", type=int, default=tokens, help=f"tokens to use (default {tokens})")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help=f"tokens per window (default {DEFAULT_WINDOW})")


def _windows(args, model: str, flag: str, default=None):
    from ffnfusion import commands

    return commands.analysis_windows(model, getattr(args, flag), getattr(args, f"{flag}_ids"),
                                     args.tokens, args.window, default)


# --- analyze ------------------------------------------------------------------------------------

def _analyze_arguments(parser: argparse.ArgumentParser) -> None:
    from ffnfusion.passes.planner import DEFAULT_THRESHOLD
    from ffnfusion.runtime.calibration import DEFAULT_TOKENS

    parser.add_argument("model", help="ONNX model (file, or a directory holding model.onnx)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR",
                        help="report directory: report.json, plan.json, dependency.png, per_layer.png, report.md")
    _calibration_arguments(parser, "--calib", "Python's documentation topics", DEFAULT_TOKENS)
    parser.add_argument("--max-distance", type=int, default=8,
                        help="compute M[i,j] for j-i <= this outside attention-free runs (default 8)")
    parser.add_argument("--dependency-tokens", type=int, default=2048,
                        help="tokens used for the dependency matrix (default 2048)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"largest M[i,j] allowed inside a group (default {DEFAULT_THRESHOLD})")
    parser.add_argument("--max-width", type=int, help="largest fused FFN width in columns (default: no cap)")
    parser.add_argument("--include-last", action="store_true",
                        help="allow the last FFN of a run into a group (the paper found it hurts)")


@command("analyze", "measure block dependencies on real text and plan groups",
         "One ONNX Runtime pass captures the residual stream; each block is then skipped in turn and the "
         "following blocks recomputed, giving FFN Fusion's dependency matrix M[i,j] = cosdist(h_j, h_j "
         "with block i skipped) and per-block metrics. Groups are chosen inside attention-free runs.")
@arguments(_analyze_arguments)
def run_analyze(args) -> None:
    from ffnfusion import commands

    windows = _windows(args, args.model, "calib")
    commands.analyze(args.model, args.output, windows, max_distance=args.max_distance,
                     dependency_tokens=args.dependency_tokens, threshold=args.threshold,
                     max_width=args.max_width, include_last=args.include_last)


# --- verify -------------------------------------------------------------------------------------

def _verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reference", help="reference ONNX model (e.g. before fusion)")
    parser.add_argument("candidate", help="model to check (e.g. after fusion)")
    _calibration_arguments(parser, "--text", "license texts shipped with Python and the OS", 8192)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


@command("verify", "compare a rewritten model with its reference on real text",
         "Perplexity of both, top-1 agreement, mean KL(ref||new) and final-hidden-state cosine, on the "
         "same tokens (tokenised with the reference's tokenizer).")
@arguments(_verify_arguments)
def run_verify(args) -> None:
    from ffnfusion import commands
    from ffnfusion.runtime.calibration import license_text

    result = commands.verify(args.reference, args.candidate, _windows(args, args.reference, "text", license_text))
    print(json.dumps(result, indent=2) if args.json else commands.format_verification(result))


# --- drop-attention -----------------------------------------------------------------------------

def _drop_attention_arguments(parser: argparse.ArgumentParser) -> None:
    _rewrite_arguments(parser)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--layers", type=parse_layer_list, metavar="LAYERS",
                       help="decoder layers whose attention is removed, e.g. 10-17 or 3,5-7")
    which.add_argument("--count", type=int, metavar="K",
                       help="remove the K least important attention layers, importance "
                            "1 - cos(X, X + attn(norm(X))) measured on calibration text")
    _calibration_arguments(parser, "--calib", "Python's documentation topics", 4096)
    parser.add_argument("--keep-kv-io", action="store_true",
                        help="keep past_key_values.N.*/present.N.* of removed layers as pass-through "
                             "(for runtimes that expect one KV pair per layer)")


@command("drop-attention", "remove the attention branch of chosen layers",
         "Rewrite x + attn(norm(x)) into x for the listed layers (DeciLM/Puzzle no_op attention). "
         "In KV-cache models the layers' past_key_values.N.* inputs and present.N.* outputs are "
         "removed too and recorded in ffnfusion.json.")
@arguments(_drop_attention_arguments)
def run_drop_attention(args) -> None:
    from ffnfusion import commands

    layers = args.layers
    if args.count is not None:
        if args.count < 1:
            raise UsageError("--count must be at least 1")
        layers = commands.least_important_attention(args.model, _windows(args, args.model, "calib"), args.count)
    summary = commands.drop_attention(args.model, args.output, layers, validate=not args.no_validate,
                                      keep_kv_io=args.keep_kv_io)
    if args.json:
        print(json.dumps(summary, indent=2))


# --- demo ---------------------------------------------------------------------------------------

def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from ffnfusion.demo import DemoOptions

    defaults = DemoOptions()
    parser.add_argument("--workdir", default=defaults.workdir, help=f"where models go (default {defaults.workdir})")
    parser.add_argument("--source", default=defaults.source, help="model source (default: the embedded SmolLM2-135M)")
    parser.add_argument("--count", type=int, default=defaults.drop_count, dest="drop_count",
                        help=f"attention layers to drop, least important first (default {defaults.drop_count})")
    parser.add_argument("--calib-tokens", type=int, default=defaults.calib_tokens,
                        help=f"calibration tokens of Python docs (default {defaults.calib_tokens})")
    parser.add_argument("--dependency-tokens", type=int, default=defaults.dependency_tokens,
                        help=f"tokens for the dependency matrix (default {defaults.dependency_tokens})")
    parser.add_argument("--verify-tokens", type=int, default=defaults.verify_tokens,
                        help=f"held-out tokens of license text (default {defaults.verify_tokens})")
    parser.add_argument("--threshold", type=float, help="planner threshold on M (default: the planner's)")


@command("demo", "the main job on the embedded default model",
         "Export SmolLM2-135M, drop its least important attention layers, analyze dependencies, fuse by "
         "the automatic plan, check the fused graph against a torch reference of the parallel form, and "
         "compare perplexity/top-1 agreement with whole-run fusion and FFN removal on held-out text.")
@arguments(_demo_arguments)
def run_demo(args) -> None:
    from ffnfusion import demo

    options = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(demo.DemoOptions)}}
    demo.run(demo.DemoOptions(**options))


# --- front --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from ffnfusion import cli_runtime  # noqa: F401  (registers generate, bench, synth and the TensorRT commands)

    parser = argparse.ArgumentParser(
        prog="ffnfusion",
        description="FFN Fusion for ONNX: find runs of attention-free FFN layers in an exported "
                    "LLM and fuse them into wide FFNs (arXiv 2503.18908).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS.values():
        cmd.add_arguments(sub.add_parser(cmd.name, help=cmd.help, description=cmd.description))
    return parser


def _interrupt_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` removes half-written outputs."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (e.g. called from a library's worker thread)
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _interrupt_on_sigterm()
    try:
        COMMANDS[args.command].run(args)
    except FFNFusionError as err:
        if args.debug:
            raise
        print(f"ffnfusion: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else getattr(err, "exit_code", 1)
    except KeyboardInterrupt:
        print("ffnfusion: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
