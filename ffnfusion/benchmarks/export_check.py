"""Does an export compute what its source computes? The exported ONNX model's logits beside
transformers' on the model it was exported from (``ffnfusion.json``'s ``source``, loaded the way
``ffnfusion export`` loads it), on real text:

    python -m ffnfusion.benchmarks.export_check out/qwen [--text idle-news] [--tokens 128]

Prints the relative error of the logits (the tests' ``‖a − b‖ / ‖b‖``), how often the argmax agrees,
and the time each side took. For real checkpoints, which the tests cannot hold (the tests check every
family on tiny random models).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an exported model folder (with ffnfusion.json)")
    parser.add_argument("--text", default="idle-news", help="a named text or a file (default idle-news)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens to compare (default 128)")
    args = parser.parse_args(argv)

    import torch

    from ffnfusion.core.model_io import METADATA_FILE, model_file
    from ffnfusion.exporters.sources import load_causal_lm, resolve_source
    from ffnfusion.runtime.calibration import load_tokenizer, read_text
    from ffnfusion.runtime.onnxruntime import create_session, run_logits

    path = model_file(args.model)
    metadata = json.loads((path.parent / METADATA_FILE).read_text())
    if metadata.get("dropped_attention") or metadata.get("kv_cache"):
        raise SystemExit("export_check compares plain exports (no --drop-attention, no --kv-cache)")
    ids = np.array([load_tokenizer(path.parent)(read_text(args.text))["input_ids"][:args.tokens]], np.int64)
    clock = time.perf_counter()
    model, _ = load_causal_lm(resolve_source(metadata["source"]), metadata.get("dtype", "float32"))
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids)).logits.float().numpy()
    torch_seconds = time.perf_counter() - clock
    clock = time.perf_counter()
    logits = run_logits(create_session(path), ids).astype(np.float32)
    onnx_seconds = time.perf_counter() - clock
    error = float(np.linalg.norm(logits - expected) / np.linalg.norm(expected))
    agree = float((logits.argmax(-1) == expected.argmax(-1)).mean())
    print(f"{metadata['source']}: {ids.shape[1]} tokens of {args.text}: logits relative error {error:.2e}, "
          f"argmax agrees at {agree:.1%} of positions (transformers {torch_seconds:.1f} s with loading, "
          f"ONNX Runtime {onnx_seconds:.1f} s with session creation)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
