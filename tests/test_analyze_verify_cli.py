"""analyze / verify / drop-attention --count through the CLI, on the tiny model with token-id files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ffnfusion.cli import main


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ids") / "ids.npy"
    np.save(path, np.random.default_rng(10).integers(0, 128, 4 * 32))
    return path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_analyze_writes_report_plan_and_figures(capsys, tiny_dynamo20, ids_file, tmp_path):
    out = tmp_path / "report"
    code, _, err = _run(capsys, "analyze", tiny_dynamo20, "-o", out, "--calib-ids", ids_file, "--tokens", 128,
                        "--window", 32, "--dependency-tokens", 64, "--threshold", 10)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["dependency.png", "per_layer.png", "plan.json",
                                                     "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert [b["kind"] for b in report["blocks"]][:3] == ["layer", "layer", "ffn"]
    assert set(report["per_block"][0]) == {"cosdist", "h_ratio", "importance", "ffn_h_ratio"}
    assert set(report["per_block"][3]) == {"cosdist", "h_ratio"}
    assert report["dependency"][0][0] is None and report["dependency"][2][6] is not None
    assert report["cost"]["tokens"] == 128 and report["cost"]["dependency_tokens"] == 64
    plan = json.loads((out / "plan.json").read_text())
    assert plan["groups"] == [[2, 3, 4, 5]] and report["plan"] == plan  # last FFN (6) excluded
    assert (out / "dependency.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = _run(capsys, "fuse", tiny_dynamo20, "-o", tmp_path / "fused.onnx", "--plan", out / "plan.json")
    assert code == 0, err


def test_analyze_ranks_whole_block_windows(capsys, tiny_full, ids_file, tmp_path):
    """On a model with attention in every layer the units are whole blocks: windows of 4, best first."""
    out = tmp_path / "report"
    code, _, err = _run(capsys, "analyze", tiny_full, "-o", out, "--calib-ids", ids_file, "--tokens", 128,
                        "--window", 32, "--dependency-tokens", 64)
    assert code == 0, err
    windows = json.loads((out / "report.json").read_text())["block_windows"]
    assert windows and all(w["layers"][1] - w["layers"][0] == 3 for w in windows)
    assert [w["m_max"] for w in windows] == sorted(w["m_max"] for w in windows)
    covered = [layer for w in windows for layer in range(w["layers"][0], w["layers"][1] + 1)]
    assert len(covered) == len(set(covered))  # none overlaps a better one
    first = windows[0]["layers"]
    assert f"| {first[0]}-{first[1]} | {windows[0]['m_max']:.4f} |" in (out / "report.md").read_text()


def test_verify_identical_and_fused(capsys, tiny_dynamo20, ids_file, tmp_path):
    code, out, err = _run(capsys, "verify", tiny_dynamo20, tiny_dynamo20, "--text-ids", ids_file,
                          "--tokens", 64, "--window", 32, "--json")
    assert code == 0, err
    same = json.loads(out)
    assert same["top1_agreement"] == 1.0 and same["kl"] == pytest.approx(0, abs=1e-9)
    assert same["ref"]["ppl"] == pytest.approx(same["new"]["ppl"]) and same["tokens"] == 64
    assert same["cost"]["full_forward_equivalents"] == 2.0 and same["cost"]["seconds"] > 0  # two whole passes
    fused = tmp_path / "fused.onnx"
    assert _run(capsys, "fuse", tiny_dynamo20, "-o", fused, "--groups", "2-6")[0] == 0
    code, out, err = _run(capsys, "verify", tiny_dynamo20, fused, "--text-ids", ids_file, "--tokens", 64,
                          "--window", 32, "--json")
    differ = json.loads(out)
    assert differ["kl"] > 1e-4 and differ["hidden_cosine"] < 1.0
    # The fused model runs one wide FFN where the original runs five: less than two forwards of it.
    assert 1 < differ["cost"]["full_forward_equivalents"] < 2


def test_drop_attention_by_importance(capsys, tiny_dynamo20, ids_file, tmp_path):
    out = tmp_path / "dropped.onnx"
    code, stdout, err = _run(capsys, "drop-attention", tiny_dynamo20, "-o", out, "--count", 2,
                             "--calib-ids", ids_file, "--tokens", 64, "--window", 32, "--json")
    assert code == 0, err
    dropped = json.loads(stdout)["layers"]
    assert len(dropped) == 2 and set(dropped) <= {0, 1, 7}
    code, _, err = _run(capsys, "drop-attention", tiny_dynamo20, "-o", tmp_path / "x.onnx", "--count", 4,
                        "--calib-ids", ids_file, "--tokens", 64, "--window", 32)
    assert code == 1 and "only 3 attention layers" in err


def test_calibration_errors_are_one_line(capsys, tiny_dynamo20, tmp_path):
    code, _, err = _run(capsys, "analyze", tiny_dynamo20, "-o", tmp_path / "r", "--calib", tmp_path / "none.txt")
    assert code == 2 and "cannot read text" in err
    code, _, err = _run(capsys, "analyze", tiny_dynamo20, "-o", tmp_path / "r", "--calib", __file__)
    assert code == 1 and "no tokenizer" in err and "--calib-ids" in err
    bad = tmp_path / "f.npy"
    np.save(bad, np.zeros(10, np.float32))
    code, _, err = _run(capsys, "analyze", tiny_dynamo20, "-o", tmp_path / "r", "--calib-ids", bad)
    assert code == 2 and "expected integer token ids" in err
    assert not (tmp_path / "r").exists()
