"""SmolLM2 through ONNX Runtime GenAI's model builder, then ffnfusion, then onnxruntime_genai:
tokens/s of fp32 and int4, unfused and fused, measured side by side in one run.

    python -m ffnfusion.benchmarks.genai_builder [--layers 3-10] [--groups 3-6,7-10] [--tokens 128]

The SmolLM2 GGUF is loaded with transformers and saved as a Hugging Face folder; the builder
(``onnxruntime_genai.models.builder``, its own environment) writes fp32 and int4 models; ffnfusion
drops attention in ``--layers`` and fuses ``--groups`` in each (the Skip norms, GroupQueryAttention
and MatMulNBits stay the builder's); onnxruntime_genai decodes ``--tokens`` greedy tokens after a short
prompt with each of the six (original, attention dropped, dropped + fused; fp32 and int4),
interleaved, ``--repeats`` times (medians). Speed only: quality at these depths is the frontier's
business (no repair here).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

from ffnfusion.checks.environments import run
from ffnfusion.checks.genai_builder import build, genai_environment

_TIMING = """
import json, sys, time
import numpy as np
import onnxruntime_genai as og
dirs, prompt, tokens, repeats = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
models = {d: og.Model(d) for d in dirs}
def decode(model):
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + tokens, batch_size=1)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    generator.generate_next_token()  # prefill + first token, not counted
    start, count = time.perf_counter(), 0
    while not generator.is_done() and count < tokens - 1:
        generator.generate_next_token()
        count += 1
    return count / (time.perf_counter() - start)
for d in dirs:
    decode(models[d])  # warm-up
rates = {d: [] for d in dirs}
for r in range(repeats):
    for d in dirs[r % len(dirs):] + dirs[:r % len(dirs)]:  # who goes first rotates
        rates[d].append(decode(models[d]))
print(json.dumps({d: sorted(v)[len(v) // 2] for d, v in rates.items()}))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="out/genai-builder")
    parser.add_argument("--layers", default="3-10", help="attention dropped (default 3-10)")
    parser.add_argument("--groups", default="3-6,7-10", help="groups fused (default 3-6,7-10)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens decoded per run (default 128)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    hf = work / "hf"
    if not (hf / "config.json").is_file():
        from transformers import LlamaForCausalLM

        from ffnfusion.exporters.sources import load_causal_lm, resolve_source

        model, tokenizer = load_causal_lm(resolve_source("smollm2"))
        fresh = LlamaForCausalLM(model.config)  # a GGUF-loaded model refuses save_pretrained
        fresh.load_state_dict(model.state_dict(), strict=True)
        fresh.save_pretrained(hf)
        tokenizer.save_pretrained(hf)
    cli = [sys.executable, "-m", "ffnfusion.cli"]
    dirs = []
    for precision in ("fp32", "int4"):
        base, fused = work / precision, work / f"{precision}-fused"
        if not (base / "model.onnx").is_file():
            build(hf, base, precision)
        if not (fused / "model.onnx").is_file():
            run([*cli, "drop-attention", str(base), "-o", str(work / f"{precision}-dropped"), "--layers", args.layers],
                f"drop-attention {precision}")
            run([*cli, "fuse", str(work / f"{precision}-dropped"), "-o", str(fused), "--groups", args.groups],
                f"fuse {precision}")
        dirs += [str(base), str(work / f"{precision}-dropped"), str(fused)]
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(hf)("The Python programming language is")["input_ids"]
    python = genai_environment()
    timing = subprocess.run([str(python), "-c", _TIMING, json.dumps(dirs), json.dumps(prompt), str(args.tokens),
                             str(args.repeats)], capture_output=True, text=True, check=True)
    rates = json.loads(timing.stdout.strip().splitlines()[-1])
    print(f"\nSmolLM2-135M via the ORT GenAI builder, attention dropped in {args.layers}, fused {args.groups};\n"
          f"onnxruntime_genai greedy decode of {args.tokens} tokens, median of {args.repeats} interleaved runs\n")
    print("| precision | original tok/s | attention dropped | dropped + fused | fused / dropped |\n|---|---|---|---|---|")
    for precision in ("fp32", "int4"):
        original, dropped, fused = (rates[str(work / f"{precision}{suffix}")] for suffix in ("", "-dropped", "-fused"))
        print(f"| {precision} | {original:.1f} | {dropped:.1f} ({dropped / original:.2f}x) | "
              f"{fused:.1f} ({fused / original:.2f}x) | {fused / dropped:.2f}x |")
    (work / "tokens_per_second.json").write_text(json.dumps(rates, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
