"""The prepared GPU benchmark runs on the CPU with tiny shapes: its fused block is the parallel form
of its sequential layers, and it prints one row per case with a ratio."""

from __future__ import annotations

import json

import torch

from ffnfusion.benchmarks import gpu


def test_fused_block_is_the_parallel_form():
    layers, weights = gpu.make_group(torch, 48, 80, 3, torch.float32, "cpu", seed=1)
    x = torch.randn(5, 48)
    reference = gpu.parallel_reference(torch, x, layers)
    fused = gpu.fused(torch, x, weights)
    assert float((fused - reference).norm() / reference.norm()) < 1e-5
    sequential = gpu.sequential(torch, x, layers)
    assert float((sequential - reference).norm() / reference.norm()) > 1e-3  # not the same function


def test_smoke_run_prints_ratios(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert gpu.main(["--smoke", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "| tiny | 2 | decode B=1 |" in stdout and "| tiny | 2 | prefill S=16 |" in stdout
    data = json.loads(out.read_text())
    assert [r["phase"] for r in data["rows"]] == ["decode B=1", "prefill S=16"]
    assert all(r["speedup"] > 0 for r in data["rows"]) and data["rows"][0]["fused_gbs"] > 0
    assert data["exactness"]["tiny k=2"] < 1e-5
