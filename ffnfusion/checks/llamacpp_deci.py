"""llama.cpp's ``deci`` architecture as an independent engine for ``export-hf``'s Nemotron-NAS checkpoints.

    python -m ffnfusion.checks.llamacpp_deci                 # SmolLM2: attention dropped in 3-6,
                                                             # fused, and fused + repaired
    python -m ffnfusion.checks.llamacpp_deci MODEL [...]     # ONNX models ffnfusion wrote

For each ONNX model: ``export-hf`` writes the checkpoint; llama.cpp's own converter
(``convert_hf_to_gguf.py`` from llama-cpp-python's source package) makes an f32 GGUF; llama-cpp-python
runs it with an f32 KV cache. Its 16 greedy tokens must equal ONNX Runtime's on the same ONNX model,
and its logits at every position must be within 1e-4 relative. Exit status 1 otherwise.

llama.cpp's converter needs transformers < 5 and llama-cpp-python must be compiled (PyPI has only its
source): its sources and built wheel under ``$FFNFUSION_CACHE/llamacpp``, its venv under ``envs/`` (default
``~/.cache/ffnfusion``), made on first use (~5 min: the wheel is built once and kept).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import tarfile

import numpy as np

from ffnfusion.checks.environments import TORCH, environment, log, run
from ffnfusion.exporters.sources import cache_dir

logger = logging.getLogger(__name__)

LLAMA_CPP_PYTHON = "0.3.36"  # the deci architecture with FFN-free layers needs >= 0.3.9
ENGINE_REQUIREMENTS = ["transformers>=4.45,<5", "sentencepiece", "safetensors", "protobuf<5", "numpy<3"]
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
PROMPT = "The Python programming language is known for"
STEPS = 16
TOLERANCE = 1e-4
SMOLLM2_GROUP = (3, 6)  # fusing it costs a lot and a refit on 1,024 tokens recovers most: kept


def engine_environment() -> tuple[pathlib.Path, pathlib.Path]:
    """``(python, converter_dir)`` of the llama.cpp environment, made once and cached."""
    root = cache_dir() / "llamacpp"
    converter = root / f"converter-{LLAMA_CPP_PYTHON}"
    sdist = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        log(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON} source (~75 MB, once)")
        root.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(root)], "download")
    if not (converter / "convert_hf_to_gguf.py").is_file():
        staging = root / f".converter-{os.getpid()}"
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].split("/")[0] in CONVERTER_FILES]
            for member in members:
                member.name = member.name[len(prefix):]
            archive.extractall(staging, members=members, filter="data")
        staging.rename(converter)
    wheels = root / "wheels"
    if not list(wheels.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}-*.whl")):
        log(f"building llama-cpp-python {LLAMA_CPP_PYTHON} (cmake + C++ compiler, ~4 min, once)")
        run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", str(sdist), "-w", str(wheels)],
            "build llama-cpp-python")
    python = environment(f"llamacpp-{LLAMA_CPP_PYTHON}", [
        [TORCH], [*ENGINE_REQUIREMENTS, "--find-links", str(wheels), f"llama-cpp-python=={LLAMA_CPP_PYTHON}"]])
    return python, converter


def ort_greedy(model: pathlib.Path, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits at every position of prompt + tokens[:-1], from ONNX Runtime."""
    from ffnfusion.runtime.onnxruntime import create_session, run_logits

    session = create_session(model)
    sequence = list(prompt)
    for _ in range(steps):
        sequence.append(int(np.argmax(run_logits(session, np.array([sequence]))[0, -1])))
    logits = run_logits(session, np.array([sequence[:-1]]))[0]
    return sequence[len(prompt):], logits


def check_model(model: str | os.PathLike, work: pathlib.Path, python: pathlib.Path, converter: pathlib.Path,
                prompt: list[int], steps: int = STEPS) -> dict:
    """``export-hf`` the model, run it in llama.cpp and ONNX Runtime; returns the comparison."""
    from ffnfusion.core.model_io import model_file
    from ffnfusion.exporters.hf_checkpoint import export_hf

    path = model_file(model)
    work.mkdir(parents=True, exist_ok=True)
    exported = export_hf(path, work / "hf")
    ort_tokens, ort_logits = ort_greedy(path, prompt, steps)
    request = work / "request.json"
    request.write_text(json.dumps({"prompt": prompt, "steps": steps, "threads": min(4, os.cpu_count() or 1)}))
    result_file = work / "llamacpp.npz"
    run([str(python), str(pathlib.Path(__file__).with_name("deci_engine.py")), str(converter),
          str(work / "hf"), str(work / "model-f32.gguf"), str(request), str(result_file)],
         f"llama.cpp convert + run {path.parent.name}")
    engine = np.load(result_file)
    rel = float(np.linalg.norm(engine["logits"] - ort_logits) / np.linalg.norm(ort_logits))
    (work / "model-f32.gguf").unlink(missing_ok=True)
    return {"model": str(path), "layers": len(exported.layers), "architecture": exported.architecture,
            "ort_tokens": ort_tokens, "llamacpp_tokens": engine["tokens"].tolist(),
            "tokens_equal": ort_tokens == engine["tokens"].tolist(), "logits_rel_err": rel,
            "passed": ort_tokens == engine["tokens"].tolist() and rel <= TOLERANCE}


def smollm2_models(work: pathlib.Path) -> tuple[list[pathlib.Path], list[int]]:
    """SmolLM2 with attention dropped in 10-13: fused, and fused + repaired; and the prompt's ids."""
    cli = [sys.executable, "-m", "ffnfusion.cli"]
    first, last = SMOLLM2_GROUP
    base, fused, repaired = work / "smollm2-base", work / "smollm2-fused", work / "smollm2-repaired"
    if not (base / "model.onnx").is_file():
        run([*cli, "export", "smollm2", "-o", str(base), "--drop-attention", f"{first}-{last}"], "export SmolLM2")
    if not (fused / "model.onnx").is_file():
        run([*cli, "fuse", str(base), "-o", str(fused), "--groups", f"{first}-{last}"], "fuse")
    if not (repaired / "model.onnx").is_file():
        run([*cli, "fuse", str(base), "-o", str(repaired), "--groups", f"{first}-{last}", "--repair",
              "--repair-tokens", "1024"], "fuse --repair")
    repair = json.loads((repaired / "ffnfusion.json").read_text())["repair"][-1]["groups"][0]
    if repair["chosen"] is None:  # the check would then run the fused model twice
        raise SystemExit(f"check-deci: the repair kept W_down ({repair['reason']}); nothing repaired to check")
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(base)(PROMPT)["input_ids"]
    return [fused, repaired], list(prompt)


def run_check(models: list[str], work: pathlib.Path) -> list[dict]:
    python, converter = engine_environment()
    if models:
        paths: list = list(models)
        from transformers import AutoTokenizer

        prompt = list(AutoTokenizer.from_pretrained(pathlib.Path(paths[0]).resolve().parent
                                                    if pathlib.Path(paths[0]).is_file() else paths[0])(PROMPT)["input_ids"])
    else:
        paths, prompt = smollm2_models(work)
    return [check_model(model, work / f"check-{i}", python, converter, prompt) for i, model in enumerate(paths)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="ONNX models (default: SmolLM2 fused and repaired, made here)")
    parser.add_argument("--work", default="out/check-deci", help="working folder (default out/check-deci)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = run_check(args.models, pathlib.Path(args.work))
    print("| model | layers | greedy tokens equal (16) | logits rel. err | result |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['layers']} | {r['tokens_equal']} | {r['logits_rel_err']:.1e} | "
              f"{'pass' if r['passed'] else 'FAIL'} |")
    (pathlib.Path(args.work) / "results.json").write_text(json.dumps(results, indent=2))
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
