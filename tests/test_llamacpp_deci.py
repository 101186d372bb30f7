"""llama.cpp (``deci`` architecture) runs export-hf's fused and repaired SmolLM2 checkpoints exactly as
ONNX Runtime runs the ONNX models they came from (slow: builds llama-cpp-python once, ~5 min, cached in
``$FFNFUSION_CACHE/llamacpp``; then ~3 min). The same check as ``make check-deci``."""

from __future__ import annotations

import pytest

from ffnfusion.checks import llamacpp_deci

pytestmark = pytest.mark.slow


def test_llamacpp_deci_agrees_with_onnx_runtime_on_fused_and_repaired_smollm2(tmp_path):
    results = llamacpp_deci.run_check([], tmp_path)
    assert [r["layers"] for r in results] == [27, 27]  # 30 layers, 3-6 now one
    assert results[0]["ort_tokens"] != results[1]["ort_tokens"]  # the repair's refit changed the model
    assert {r["architecture"] for r in results} == {"DeciLMForCausalLM"}
    for r in results:
        assert r["llamacpp_tokens"] == r["ort_tokens"], r
        assert r["logits_rel_err"] <= llamacpp_deci.TOLERANCE, r
