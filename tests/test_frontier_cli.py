"""``ffnfusion frontier`` end to end on the tiny random Llama: written points that run and say what
they are, parallel windows and the block-parallel baseline, healed points, refusals before any work
(the search itself in test_frontier.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ffnfusion.cli import main
from ffnfusion.core.model_io import load_model, save_model
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.depth_plan import DepthPlan, DepthReductionPass
from ffnfusion.passes.ffn_removal import FFNRemovalPass


def _id_files(windows, tmp_path) -> dict:
    """The fitting, selection and held-out windows as token-id files (what --calib-ids/--eval-ids read)."""
    ids = {}
    for name in ("fit", "select", "eval"):
        ids[name] = tmp_path / f"{name}.npy"
        np.save(ids[name], windows[name].reshape(-1))
    return ids


def test_frontier_cli_writes_runnable_points(tiny_full, windows, tmp_path, capsys):
    ids = _id_files(windows, tmp_path)
    out = tmp_path / "frontier"
    argv = ["frontier", str(tiny_full), "-o", str(out), "--steps", "2,4", "--calib-ids", str(ids["fit"]),
            str(ids["select"]), "--eval-ids", str(ids["eval"]), "--tokens", "256", "--select-tokens", "128",
            "--eval-tokens", "128", "--window", "32", "--baselines", "block-removal"]
    capsys.readouterr()
    assert main([*argv, "--dry-run"]) == 0 and not out.exists()  # the estimate, and nothing written
    dry = capsys.readouterr().out
    bound = float(dry.split("at most ")[1].split(" full-forward")[0])
    typical = float(dry.split("typically about ")[1].split(" of them")[0])
    assert 0 < typical < bound
    assert main(argv) == 0
    assert f"at most {bound:.0f} full-forward equivalents" in capsys.readouterr().err  # printed before it starts
    result = json.loads((out / "frontier.json").read_text())
    assert 0 < result["search_full_forward_equivalents"] <= bound  # an upper bound that holds
    assert result["original_steps"] == 16
    assert [p["steps"] for p in result["points"]] == [2, 4]
    assert [p["steps"] for p in result["baselines"]["block_removal"]] == [2, 4]
    assert (out / "frontier.png").stat().st_size > 0 and "block-removal" in (out / "frontier.md").read_text()
    for point in result["points"]:
        model = out / point["model"]
        assert point["latency"]["prefill_ms"] > 0 and point["ppl"] > 1
        capsys.readouterr()
        assert main(["inspect", str(model), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["sequential_steps"] == 16 - point["steps"]
        recorded = json.loads((model.parent / "ffnfusion.json").read_text())["depth_reduction"]
        assert recorded["moves"] == point["moves"]
    assert not list(out.glob(".steps-*"))  # no staging left behind


def test_frontier_cli_searches_parallel_windows_and_the_block_parallel_baseline(tiny_full, windows, tmp_path, capsys):
    ids = _id_files(windows, tmp_path)
    out = tmp_path / "frontier"
    assert main(["frontier", str(tiny_full), "-o", str(out), "--steps", "6", "--calib-ids", str(ids["fit"]),
                 str(ids["select"]), "--eval-ids", str(ids["eval"]), "--tokens", "256", "--select-tokens", "128",
                 "--eval-tokens", "128", "--window", "32", "--baselines", "block-parallel", "--no-latency",
                 "--parallel-window", "3"]) == 0
    result = json.loads((out / "frontier.json").read_text())
    assert result["search_options"]["parallel_window"] == 3
    baseline = result["baselines"]["block_parallel"][0]
    assert baseline["steps"] == 6 and baseline["plan"]["parallel_windows"] == [[baseline["moves"][0]["layers"][0],
                                                                              baseline["moves"][0]["layers"][1]]]
    assert "| block-parallel |" in (out / "frontier.md").read_text()
    model = load_model(tiny_full)  # the baseline's plan is a model too
    DepthReductionPass(DepthPlan.from_dict(baseline["plan"]))(model)
    written = find_blocks(model)
    assert written.sequential_steps == 16 - 6 and [layer.window is not None for layer in written.layers].count(True) == 1
    point = result["points"][0]  # the search's own point is written, windows or not
    assert find_blocks(load_model(out / point["model"])).sequential_steps == 16 - point["steps"]
    capsys.readouterr()
    assert main(["frontier", str(tiny_full), "-o", str(tmp_path / "bad"), "--parallel-window", "1"]) == 2
    assert "--parallel-window" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["frontier", str(tiny_full), "-o", str(tmp_path / "bad"), "--screen-tokens", "8",
                 "--contenders", "0"]) == 2
    assert "--contenders must be at least 1" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["frontier", str(tiny_full), "-o", str(tmp_path / "bad"), "--guess-tokens", "-1"]) == 2
    assert "--guess-tokens must be at least 0" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_frontier_cli_heals_every_written_point(tiny_full, tmp_path, capsys):
    rng = np.random.default_rng(5)
    files = []
    for name in ("fit", "select"):  # heal keeps 1,024 held-out tokens of each source: 32 windows of 32
        files.append(tmp_path / f"{name}.npy")
        np.save(files[-1], rng.integers(0, 128, 48 * 32))
    out = tmp_path / "frontier"
    code = main(["frontier", str(tiny_full), "-o", str(out), "--steps", "2", "--calib-ids", *map(str, files),
                 "--eval-ids", str(files[0]), "--tokens", "256", "--select-tokens", "128", "--eval-tokens", "128",
                 "--window", "32", "--baselines", "none", "--no-latency", "--heal", "--heal-tokens", "256"])
    assert code == 0, capsys.readouterr().err
    (point,) = json.loads((out / "frontier.json").read_text())["points"]
    healed = point["healed"]
    assert (out / healed["model"]).is_file() and healed["ppl"] > 1
    assert set(healed["held_out_kl"]["input"]) == {"fit", "select"}
    # kept only where it helps on both sources' held-out tokens, else the input weights: either way said so
    kl = healed["held_out_kl"]
    assert all(kl["output"][s] < kl["input"][s] for s in kl["input"]) if healed["changed"] else \
        "kept the input weights" in healed["summary"]
    assert "+ heal" in (out / "frontier.md").read_text()


def test_frontier_cli_rejects_bad_budgets(tiny_full, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["frontier", str(tiny_full), "-o", str(tmp_path / "out"), "--steps", "0"])
    assert exit_info.value.code == 2 and "positive integers" in capsys.readouterr().err
    assert main(["frontier", str(tiny_full), "-o", str(tmp_path / "out"), "--steps", "4,16"]) == 2
    assert "--steps must be between 1 and 15" in capsys.readouterr().err
    for windows in (["--parallel-window", "2"], ["--method", "block-parallel"]):  # before any work
        assert main(["frontier", str(tiny_full), "-o", str(tmp_path / "out"), "--heal", *windows]) == 2
        assert "--heal cannot train block-parallel windows" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_frontier_cli_counts_budgets_from_attention_in_every_layer(tiny_dynamo20, windows, tmp_path, capsys):
    # The tiny Llama exported with attention removed in 2-6 already saves 5 of its 16 steps: a budget
    # at or below that would find no point, so it is refused before any work, and one above it is searched.
    ids = _id_files(windows, tmp_path)
    out = tmp_path / "frontier"
    argv = ["frontier", str(tiny_dynamo20), "-o", str(out), "--calib-ids", str(ids["fit"]), str(ids["select"]),
            "--eval-ids", str(ids["eval"]), "--tokens", "256", "--select-tokens", "128", "--eval-tokens", "128",
            "--window", "32", "--baselines", "none", "--no-latency"]
    assert main([*argv, "--steps", "2,5"]) == 2
    err = capsys.readouterr().err
    assert "already removed in 2-6, 5 steps saved: ask for budgets between 6 and 15, not 2,5" in err, err
    assert not out.exists()
    assert main([*argv, "--steps", "7"]) == 0
    (point,) = json.loads((out / "frontier.json").read_text())["points"]
    assert point["steps"] == 7 and point["sequential_steps"] == 9
    assert "11 sequential steps (16 with attention in every layer)" in capsys.readouterr().err


def test_frontier_cli_refuses_a_model_whose_ffn_is_gone_or_unknown(tiny_full, tmp_path, capsys):
    # A removed FFN is not a layer of unknown kind: the refusal says where a depth search starts.
    model = load_model(tiny_full)
    FFNRemovalPass([4])(model)
    removed = save_model(model, tmp_path / "removed" / "model.onnx", input_path=tiny_full)
    out = tmp_path / "frontier"
    assert main(["frontier", str(removed), "-o", str(out), "--steps", "2"]) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "layer 4 has no recognised FFN (FFN removed)" in err and "a depth search starts from the exported" in err, err
    assert not out.exists()
