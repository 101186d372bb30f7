"""The frontier_gpu benchmark's smoke run (CI has no GPU): it runs, prints the side-by-side table, and
two runs of the search agree in path and KL."""

from __future__ import annotations

import json

import pytest

from ffnfusion.benchmarks import frontier_gpu


def test_smoke_runs_and_compares(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert frontier_gpu.main(["--smoke", "--json", str(out)]) == 0
    [row] = json.loads(out.read_text())
    assert row["same_path"] and row["kl_difference"] <= frontier_gpu.KL_TOLERANCE
    assert set(row["kl"]) == {"2", "4"} and all(a is not None and a > 0 for a, _ in row["kl"].values())
    table = capsys.readouterr().out
    assert "| tiny (synthetic) |" in table and "| yes |" in table


def test_without_a_gpu_or_smoke_it_says_so(capsys, tmp_path):
    assert frontier_gpu.main([str(tmp_path)]) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        frontier_gpu.main(["--synthetic", "gpt-5"])
    assert "--synthetic: choose from tiny, smollm2, llama-8b" in capsys.readouterr().err
