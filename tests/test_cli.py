"""The ffnfusion command line: output formats, one-line errors, exit codes, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ffnfusion.cli import main


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_table_and_json(capsys, tiny_dynamo20):
    code, out, _ = _run(capsys, "inspect", tiny_dynamo20)
    assert code == 0
    assert "attention-free runs: 2-6 (5 layers)" in out
    assert out.splitlines()[3].split()[:3] == ["2", "no", "160"]
    code, out, _ = _run(capsys, "inspect", tiny_dynamo20, "--json")
    data = json.loads(out)
    assert data["runs"] == [[2, 6]]
    assert data["blocks"][0] == {**data["blocks"][0], "layer": 0, "attention": True}
    assert data["blocks"][2]["ffn"]["width"] == 160


def test_fuse_writes_a_self_contained_directory(capsys, tiny_dynamo20, tmp_path):
    out = tmp_path / "fused" / "model.onnx"
    code, stdout, err = _run(capsys, "fuse", tiny_dynamo20, "-o", out, "--groups", "2-4,5-6", "--json",
                             "--target", "gpu")
    assert code == 0, err
    assert json.loads(stdout)["nodes_after"] < json.loads(stdout)["nodes_before"]
    meta = json.loads((out.parent / "ffnfusion.json").read_text())
    assert meta["fused_groups"] == [[2, 3, 4], [5, 6]]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no temporary files left"
    code, stdout, _ = _run(capsys, "inspect", out, "--json")
    assert [b["ffn"]["width"] for b in json.loads(stdout)["blocks"]] == [160, 160, 480, 320, 160]


@pytest.mark.parametrize(("gpu_present", "widths"), [(False, [496, 336]), (True, [480, 320])])
def test_target_auto_picks_the_layout_for_this_machine(capsys, tiny_dynamo20, tmp_path, monkeypatch,
                                                       gpu_present, widths):
    from ffnfusion.runtime import model_rewrite

    gpus = tmp_path / "gpus"
    gpus.mkdir()
    if gpu_present:
        (gpus / "0000:01:00.0").mkdir()
    monkeypatch.setattr(model_rewrite, "NVIDIA_GPUS", gpus)
    out = tmp_path / "fused.onnx"
    code, _, err = _run(capsys, "fuse", tiny_dynamo20, "-o", out, "--groups", "2-4,5-6")
    layout = "gpu layout (auto: an NVIDIA GPU is present)" if gpu_present else "cpu layout (auto: no NVIDIA GPU here)"
    assert code == 0 and layout in err
    code, stdout, _ = _run(capsys, "inspect", out, "--json")
    assert [b["ffn"]["width"] for b in json.loads(stdout)["blocks"]][2:4] == widths


def test_fuse_with_plan_file(capsys, tiny_dynamo20, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"groups": [[2, 3], [4, 5, 6]]}))
    code, _, err = _run(capsys, "fuse", tiny_dynamo20, "-o", tmp_path / "f.onnx", "--plan", plan)
    assert code == 0, err and (tmp_path / "f.onnx").is_file()


@pytest.mark.parametrize("groups, code, message", [
    ("2-3,3-4", 1, "groups 2-3 and 3-4 overlap at layer 3"),
    ("5-7", 1, "group 5-7: layer 7 has attention, between FFNs 6 and 7"),
    ("0-1", 1, "group 0-1: layer 1 has attention, between FFNs 0 and 1"),
    ("6-9", 1, "group 6-9 names layer 8, but the model has layers 0-7"),
    ("2-x", 2, "bad layer range '2-x'"),
])
def test_fuse_errors_are_one_line_and_write_nothing(capsys, tiny_dynamo20, tmp_path, groups, code, message):
    out = tmp_path / "out" / "model.onnx"
    returned, stdout, err = _run(capsys, "fuse", tiny_dynamo20, "-o", out, "--groups", groups)
    assert returned == code
    lines = err.strip().splitlines()  # progress lines may precede the error
    assert [line for line in lines if "error" in line] == [lines[-1]]
    assert lines[-1].startswith("ffnfusion: error: ") and message in lines[-1]
    assert "Traceback" not in err
    assert not out.exists() and not (out.parent.exists() and list(out.parent.iterdir()))


def test_output_equal_to_input_is_refused(capsys, tiny_dynamo20):
    before = tiny_dynamo20.read_bytes()
    code, _, err = _run(capsys, "fuse", tiny_dynamo20, "-o", tiny_dynamo20, "--groups", "2-3")
    assert code == 2 and "is the input model" in err
    assert tiny_dynamo20.read_bytes() == before


def test_unreadable_model(capsys, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a protobuf\xff" * 10)
    code, _, err = _run(capsys, "inspect", junk)
    assert code == 1 and err.startswith("ffnfusion: error:") and "junk.onnx" in err
    code, _, err = _run(capsys, "inspect", tmp_path / "missing.onnx")
    assert code == 1 and "not found" in err


def test_debug_shows_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ffnfusion.cli", "--debug", "inspect", str(tmp_path / "x.onnx")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_help_lists_commands():
    result = subprocess.run([sys.executable, "-m", "ffnfusion.cli", "--help"], capture_output=True, text=True)
    for name in ("export", "inspect", "fuse", "demo"):
        assert name in result.stdout


def test_drop_attention_command(capsys, tiny_dynamo20, tmp_path):
    out = tmp_path / "dropped" / "model.onnx"
    code, stdout, err = _run(capsys, "drop-attention", tiny_dynamo20, "-o", out, "--layers", "1,7", "--json")
    assert code == 0, err
    assert json.loads(stdout)["layers"] == [1, 7]
    assert json.loads((out.parent / "ffnfusion.json").read_text())["dropped_attention"] == [1, 2, 3, 4, 5, 6, 7]
    code, stdout, _ = _run(capsys, "inspect", out, "--json")
    assert json.loads(stdout)["runs"] == [[1, 7]]
    code, _, err = _run(capsys, "drop-attention", tiny_dynamo20, "-o", tmp_path / "x.onnx", "--layers", "3")
    assert code == 1 and "layer 3 has no attention to remove" in err and not (tmp_path / "x.onnx").exists()


def test_hand_edited_bad_plan_is_one_line(capsys, tiny_dynamo20, tmp_path):
    plan = tmp_path / "plan.json"
    for text, code, message in (('{"groups": [[2, "3"]]}', 2, "integer layer indices"),
                                ('{"groups": [[6, 7]]}', 1, "layer 7 has attention, between FFNs 6 and 7"),
                                ("[", 2, "cannot read plan")):
        plan.write_text(text)
        returned, _, err = _run(capsys, "fuse", tiny_dynamo20, "-o", tmp_path / "o.onnx", "--plan", plan)
        assert returned == code and message in err and err.strip().splitlines()[-1].startswith("ffnfusion: error:")
        assert not (tmp_path / "o.onnx").exists()
