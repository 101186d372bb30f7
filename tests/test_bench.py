"""bench: interleaved runs, one row per model x shape x phase, ratios to the first model."""

from __future__ import annotations

import json

from ffnfusion.cli import main
from ffnfusion.runtime.bench import benchmark


def test_rows_and_ratios(tiny_dynamo20, tiny_kv_cache):
    rows, peak = benchmark([str(tiny_kv_cache), str(tiny_kv_cache)], [1, 2], [3], repeats=3, warmup=1, decode=True)
    assert [(r.batch, r.phase) for r in rows] == [(1, "prefill")] * 2 + [(1, "decode")] * 2 + \
        [(2, "prefill")] * 2 + [(2, "decode")] * 2
    assert all(r.ratio_to_first == 1.0 for r in rows[::2]) and all(r.median_ms > 0 for r in rows)
    assert rows[0].tokens_per_s > 0 and peak > 0
    rows, _ = benchmark([str(tiny_dynamo20)], [1], [4], repeats=2, warmup=1, decode=True)
    assert [r.phase for r in rows] == ["prefill"]  # no KV cache: no decode rows


def test_cli_json(capsys, tiny_dynamo20):
    assert main(["bench", str(tiny_dynamo20), str(tiny_dynamo20), "--batch", "1", "--seq", "2",
                 "--repeats", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["rows"]) == 2 and data["peak_rss_gib"] > 0


def test_gpu_providers_fall_back_with_one_warning(tiny_dynamo20, caplog):
    """onnxruntime-gpu lists CUDA and TensorRT even without a GPU: one warning (logged), then the CPU."""
    import logging

    import pytest

    from ffnfusion.core.errors import FFNFusionError
    from ffnfusion.runtime.onnxruntime import PROVIDERS, create_session

    for provider in ("cuda", "tensorrt"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ffnfusion"):
            session = create_session(tiny_dynamo20, provider=provider)
        warnings = [r.getMessage() for r in caplog.records]
        if session.get_providers()[0] == PROVIDERS[provider]:
            pytest.skip(f"{provider} really loads here: nothing falls back")
        assert session.get_providers() == ["CPUExecutionProvider"]
        assert len(warnings) == 1 and "CPU" in warnings[0]
    with pytest.raises(FFNFusionError, match="unknown provider 'rocm'"):
        create_session(tiny_dynamo20, provider="rocm")
