"""ONNX Runtime helpers: sessions and logits for token windows."""

from __future__ import annotations

import os

import numpy as np

from ffnfusion.errors import FFNFusionError


def create_session(path: str | os.PathLike, threads: int | None = None, provider: str = "cpu"):
    """An ``InferenceSession`` on the CPU provider (the GPU providers arrive with the runtime issue)."""
    import onnxruntime as ort

    if provider != "cpu":
        raise FFNFusionError(f"provider {provider!r} is not supported yet: use cpu")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers etc. are noise here
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own exception types for invalid graphs
        raise FFNFusionError(f"ONNX Runtime cannot load {path}: {str(err).splitlines()[0]}") from err


def run_logits(session, input_ids: np.ndarray) -> np.ndarray:
    """Logits for ``input_ids`` [batch, seq] with a full attention mask (no KV cache)."""
    input_ids = np.asarray(input_ids, dtype=np.int64)
    feeds = {"input_ids": input_ids}
    names = {i.name for i in session.get_inputs()}
    if "attention_mask" in names:
        feeds["attention_mask"] = np.ones_like(input_ids)
    missing = names - set(feeds)
    if missing:
        raise FFNFusionError(
            f"the model needs inputs {sorted(missing)}; logits checks run models without a KV cache"
        )
    return session.run(["logits"], feeds)[0]
