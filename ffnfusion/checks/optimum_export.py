"""optimum's exporter and runtime: ``optimum-cli export onnx`` makes the ONNX model, ffnfusion rewrites
it, ``ORTModelForCausalLM`` loads and generates with the result. optimum-onnx pins transformers < 4.58,
so both live in their own environment: ``$FFNFUSION_CACHE/envs/optimum``."""

from __future__ import annotations

import os
import pathlib

import numpy as np

from ffnfusion.checks.environments import TORCH, environment, run, run_script

REQUIREMENTS = ["optimum-onnx", "transformers>=4.45,<4.58", "onnxruntime", "onnx", "numpy<3"]

_GENERATE = """
import json, sys
import numpy as np, torch
from optimum.onnxruntime import ORTModelForCausalLM
model_dir, request_file = sys.argv[1], sys.argv[2]
request = json.loads(open(request_file).read())
model = ORTModelForCausalLM.from_pretrained(model_dir, use_cache=True, use_io_binding=False)
out = model.generate(torch.tensor([request["prompt"]]), max_new_tokens=request["steps"], do_sample=False,
                     output_scores=True, return_dict_in_generate=True, pad_token_id=0)
tokens = out.sequences[0, len(request["prompt"]):].tolist()
print(json.dumps({"tokens": tokens, "logits": [s[0].tolist() for s in out.scores]}))
"""


def optimum_environment() -> pathlib.Path:
    return environment("optimum", [[TORCH], REQUIREMENTS])


def export(hf_dir: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
    """``optimum-cli export onnx --task text-generation-with-past``: a KV-cache model in ``out_dir``."""
    python = optimum_environment()
    run([str(python.parent / "optimum-cli"), "export", "onnx", "--model", str(hf_dir), "--task",
         "text-generation-with-past", str(out_dir)], "optimum-cli export onnx")
    return pathlib.Path(out_dir)


def generate(model_dir: str | os.PathLike, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy ``generate`` with ``ORTModelForCausalLM`` (KV cache): tokens and the logits each came from."""
    answer = run_script(optimum_environment(), _GENERATE, model_dir, {"prompt": prompt, "steps": steps},
                        "ORTModelForCausalLM.generate")
    return answer["tokens"], np.array(answer["logits"], np.float32)
