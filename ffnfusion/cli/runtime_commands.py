"""CLI commands that run models: generate, bench, synth, and the TensorRT commands."""

from __future__ import annotations

import argparse
import dataclasses
import json

from ffnfusion.cli.registry import arguments, command, parse_int_list, parse_layer_list
from ffnfusion.core.errors import FFNFusionError, ModelFileError

# --- bench --------------------------------------------------------------------------------------

def _provider_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu",
                        help="ONNX Runtime execution provider (falls back to cpu with one warning)")


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", help="ONNX models; ratios are to the first")
    parser.add_argument("--batch", type=parse_int_list, default=[1, 8], help="batch sizes (default 1,8)")
    parser.add_argument("--seq", type=parse_int_list, default=[1, 128], help="sequence lengths (default 1,128)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per model and shape (default 20)")
    parser.add_argument("--decode", action="store_true", help="also time one-token decode steps (KV-cache models)")
    parser.add_argument("--threads", type=int, help="ORT intra-op threads (default: ORT's choice)")
    _provider_argument(parser)
    parser.add_argument("--json", action="store_true", help="print rows as JSON")


@command("bench", "time models side by side with ONNX Runtime",
         "Warm-up, then interleaved runs of every model at every batch x sequence shape; median, "
         "interquartile spread, tokens/s and the ratio of each median to the first model's.")
@arguments(_bench_arguments)
def run_bench(args) -> None:
    from ffnfusion.runtime.bench import benchmark, format_rows

    rows, peak = benchmark(args.models, args.batch, args.seq, repeats=args.repeats, decode=args.decode,
                           threads=args.threads, provider=args.provider)
    if args.json:
        print(json.dumps({"rows": [dataclasses.asdict(r) for r in rows], "peak_rss_gib": peak}, indent=2))
    else:
        print(format_rows(rows))
        print(f"peak RSS of this process: {peak:.2f} GiB")


# --- TensorRT -----------------------------------------------------------------------------------

def _check_trt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ONNX model (file, or a directory holding model.onnx)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


@command("check-trt", "static check that TensorRT's ONNX parser supports every node",
         "Op types/domains of every node (subgraphs and functions included) against TensorRT's ONNX "
         "operator support table (kept as data with its TensorRT version), the opset range, no com.microsoft "
         "ops, and the documented limits that matter for LLMs (Attention I/O, RotaryEmbedding position ids, "
         "constant ReduceMean axes, ScatterND reduction). Needs no TensorRT or GPU; exit 1 with one line per "
         "problem.")
@arguments(_check_trt_arguments)
def run_check_trt(args) -> None:
    from ffnfusion.runtime.tensorrt_check import check_tensorrt

    result = check_tensorrt(args.model)
    if args.json:
        print(json.dumps(dataclasses.asdict(result) | {"ok": result.ok}, indent=2))
    else:
        for problem in result.problems:
            print(problem)
        print(f"{'OK' if result.ok else 'FAILED'}: {result.nodes} nodes checked against TensorRT {result.tensorrt}'s "
              f"ONNX parser table ({len(result.problems)} problems)")
    if not result.ok:
        raise FFNFusionError(f"{len(result.problems)} node(s) or settings TensorRT cannot parse")


def _engine_arguments(parser: argparse.ArgumentParser) -> None:
    from ffnfusion.runtime.tensorrt import DEFAULT_WORKSPACE_MIB

    parser.add_argument("model", help="ONNX model (file, or a directory holding model.onnx)")
    parser.add_argument("-o", "--output", required=True, metavar="ENGINE.plan", help="serialized engine")
    parser.add_argument("--min-shapes", help="trtexec syntax, e.g. input_ids:1x1,attention_mask:1x1 "
                                             "(default: batch 1, sequence 1, past 0)")
    parser.add_argument("--opt-shapes", help="default: batch 1, sequence 128, past 128")
    parser.add_argument("--max-shapes", help="default: batch 8, sequence 512, past 512. Points you leave out are "
                                             "clamped into the range you give; in KV-cache models attention_mask "
                                             "follows past + sequence unless given")
    parser.add_argument("--workspace", type=int, default=DEFAULT_WORKSPACE_MIB, help="workspace limit in MiB")
    parser.add_argument("--timing-cache", help="timing cache file (read if present, written after the build)")
    parser.add_argument("--tf32", action="store_true",
                        help="allow TF32 for float32 math (faster; logits then differ from ONNX Runtime by ~1e-3)")


@command("build-engine", "build a TensorRT engine (needs TensorRT 10.x or 11.x and a GPU)",
         "Strongly typed TensorRT 10/11 engine with one optimisation profile, checked before TensorRT is "
         "loaded; prints the equivalent trtexec command first. Without TensorRT: one line saying how to "
         "install it, exit code 3.")
@arguments(_engine_arguments)
def run_build_engine(args) -> None:
    from ffnfusion.core.model_io import model_file
    from ffnfusion.runtime import tensorrt

    model = model_file(args.model)
    overrides = {point: tensorrt.parse_shapes(text) for point, text in
                 (("min", args.min_shapes), ("opt", args.opt_shapes), ("max", args.max_shapes)) if text}
    profile = tensorrt.merge_profile(tensorrt.default_profile(model), overrides)
    print(tensorrt.trtexec_command(str(model), args.output, profile, args.workspace, args.timing_cache, args.tf32),
          flush=True)
    tensorrt.build_engine(str(model), args.output, profile, workspace_mib=args.workspace,
                          timing_cache=args.timing_cache, tf32=args.tf32)


def _run_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("engine", help="serialized engine (.plan)")
    parser.add_argument("model", help="the ONNX model it was built from (ORT runs it for comparison)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=16)


@command("run-engine", "run a TensorRT engine and compare its logits with ONNX Runtime",
         "Feeds the same random tokens to the engine and to ORT (CPU) and prints the relative error of logits "
         "(float32 engines built without --tf32: ~1e-5; with TF32 or float16: ~1e-3).")
@arguments(_run_engine_arguments)
def run_run_engine(args) -> None:
    import numpy as np

    from ffnfusion.runtime import tensorrt
    from ffnfusion.runtime.onnxruntime import create_session, default_feeds

    tensorrt.import_tensorrt()
    session = create_session(args.model)
    feeds = default_feeds(session, np.random.default_rng(0).integers(0, 128, (args.batch, args.seq)))
    reference = session.run(["logits"], feeds)[0]
    engine = tensorrt.run_engine(args.engine, feeds)
    error = float(np.linalg.norm(engine - reference) / np.linalg.norm(reference))
    print(f"TensorRT vs ONNX Runtime logits: relative error {error:.2e} (batch {args.batch}, seq {args.seq})")


# --- synth --------------------------------------------------------------------------------------

def _synth_arguments(parser: argparse.ArgumentParser) -> None:
    from ffnfusion.exporters.synthetic import PRESETS

    parser.add_argument("preset", choices=sorted(PRESETS), help="model shape: " + "; ".join(
        f"{name}: {c.layers} layers, hidden {c.hidden}, FFN {c.ffn}, {c.dtype}" for name, c in PRESETS.items()))
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="override the preset's dtype")
    parser.add_argument("--drop-attention", type=parse_layer_list, metavar="LAYERS",
                        help="attention-free layers (default: the preset's, e.g. 12-27 for llama-8b)")


@command("synth", "write a synthetic Llama-shaped model with random weights",
         "Random weights streamed to external data (never all in memory), for tests and benchmarks of "
         "models larger than RAM.")
@arguments(_synth_arguments)
def run_synth(args) -> None:
    from ffnfusion.exporters.synthetic import write_synthetic

    write_synthetic(args.preset, args.output, dtype=args.dtype, dropped=args.drop_attention)


# --- generate -----------------------------------------------------------------------------------

def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory (model.onnx + tokenizer files) or model file")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    _provider_argument(parser)


@command("generate", "greedy text generation with ONNX Runtime",
         "Greedy decoding with the model's KV cache when it has one (export with --kv-cache), streaming "
         "text to stdout. Layers whose attention was removed carry no cache.")
@arguments(_generate_arguments)
def run_generate(args) -> None:
    from ffnfusion.core.model_io import model_file
    from ffnfusion.runtime.calibration import load_tokenizer
    from ffnfusion.runtime.generate import generate_text
    from ffnfusion.runtime.onnxruntime import create_session

    path = model_file(args.model)
    if not path.is_file():
        raise ModelFileError(f"model {path} not found")
    tokenizer = load_tokenizer(path.parent)
    session = create_session(path, provider=args.provider)
    print(args.prompt, end="", flush=True)
    generate_text(session, tokenizer, args.prompt, args.max_new_tokens,
                  on_text=lambda piece: print(piece, end="", flush=True))
    print(flush=True)
