"""ONNX Runtime GenAI: its model builder makes the graphs most people deploy, and its runtime runs
what ffnfusion writes. Both live in their own environment (onnxruntime-genai depends on
``onnxruntime``, which clashes with ``onnxruntime-gpu``): ``$FFNFUSION_CACHE/envs/genai-0.18``.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from ffnfusion.checks.environments import TORCH, environment, run, run_script

GENAI = "onnxruntime-genai==0.18.0"
# The builder imports torch and transformers (0.18 needs transformers 5: it imports Qwen3.5 classes).
BUILDER_REQUIREMENTS = [GENAI, "transformers>=5", "onnx", "onnx-ir", "numpy<3", "sentencepiece"]

_GREEDY = """
import json, sys
import numpy as np
import onnxruntime_genai as og
model_dir, request_file = sys.argv[1], sys.argv[2]
request = json.loads(open(request_file).read())
model = og.Model(model_dir)
params = og.GeneratorParams(model)
params.set_search_options(do_sample=False, max_length=len(request["prompt"]) + request["steps"], batch_size=1)
generator = og.Generator(model, params)
generator.append_tokens(np.array([request["prompt"]], dtype=np.int32))
tokens, logits = [], []
while not generator.is_done() and len(tokens) < request["steps"]:
    generator.generate_next_token()  # runs the model on the last token, then picks the next one
    tokens.append(int(generator.get_next_tokens()[0]))
    if request.get("vocab"):  # the logits the token was picked from (the last position's)
        logits.append(np.asarray(generator.get_output("logits"), np.float32).reshape(-1)[-request["vocab"]:].tolist())
print(json.dumps({"tokens": tokens, "logits": logits}))
"""


def genai_environment() -> pathlib.Path:
    return environment("genai-0.18", [[TORCH], BUILDER_REQUIREMENTS])


def build(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, precision: str = "fp32",
          extra_options: dict[str, str] | None = None) -> pathlib.Path:
    """``python -m onnxruntime_genai.models.builder -i HF -o OUT -p PRECISION -e cpu``; returns OUT."""
    python = genai_environment()
    out = pathlib.Path(out_dir)
    argv = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
            "-p", precision, "-e", "cpu", "-c", str(out.parent / f".{out.name}-cache")]
    if extra_options:
        argv += ["--extra_options", *(f"{k}={v}" for k, v in extra_options.items())]
    run(argv, f"genai builder {precision}")
    return out


def greedy(model_dir: str | os.PathLike, prompt: list[int], steps: int, vocab: int | None = None):
    """``(tokens, logits)``: greedy tokens from onnxruntime_genai on ``model_dir`` (its
    genai_config.json) and, given ``vocab``, the logits each token was chosen from ``[steps, vocab]``."""
    answer = run_script(genai_environment(), _GREEDY, model_dir, {"prompt": prompt, "steps": steps, "vocab": vocab},
                        "onnxruntime_genai greedy")
    return answer["tokens"], np.array(answer["logits"], np.float32)
