"""``ffnfusion heal``: distillation of a reduced model toward its original, into the same graph.

The student is a depth plan applied to the tiny Llama (attention 3-4 removed, FFNs 2-4 fused, FFN 6
removed), the teacher the tiny Llama itself; calibration tokens come from a random Markov chain, so
the teacher's next-token distributions have structure to learn.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, rel_err

from ffnfusion.cli import main
from ffnfusion.core.errors import InvalidArgumentError
from ffnfusion.core.model_io import load_model
from ffnfusion.exporters.onnx_export import ExportOptions, export_model
from ffnfusion.passes.depth_plan import DepthPlan, DepthReductionPass
from ffnfusion.runtime.calibration import CalibrationSource
from ffnfusion.runtime.heal import HealOptions, heal, heal_model_file
from ffnfusion.runtime.heal.student import load_torch_model
from ffnfusion.runtime.model_rewrite import rewrite_model_file
from ffnfusion.runtime.onnxruntime import create_session, run_logits

PLAN = DepthPlan(8, removed_attention=frozenset({3, 4}), removed_ffn=frozenset({6}), groups=((2, 4),))
OPTIONS = HealOptions(tokens=1280, select_tokens=256, window=64, local_epochs=6, global_epochs=3, eval_every=5,
                      local_lr=3e-3, global_lr=1e-3, compute_dtype="float32")


def markov_windows(seed: int, count: int, length: int = 64) -> np.ndarray:
    """Token windows from a sparse random Markov chain over the tiny vocabulary."""
    rng = np.random.default_rng(seed)
    vocab = TINY_CONFIG["vocab_size"]
    successors = rng.integers(0, vocab, (vocab, 4))
    ids = np.empty((count, length), np.int64)
    ids[:, 0] = rng.integers(0, vocab, count)
    for t in range(1, length):
        ids[:, t] = successors[ids[:, t - 1], rng.integers(0, 4, count)]
    return ids


def sources() -> list[CalibrationSource]:
    return [CalibrationSource(name, (w := markov_windows(seed, 14))[:10], w[10:]) for name, seed in (("a", 1), ("b", 2))]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_full):
    """(reference dir, student dir): the tiny Llama and the plan applied to it."""
    out = tmp_path_factory.mktemp("heal")
    reference = tiny_full.parent
    rewrite_model_file(reference / "model.onnx", out / "student", DepthReductionPass(PLAN, target="gpu"),
                       "depth plan", lambda metadata: None, True)
    return reference, out / "student"


def initializers(path) -> dict[str, np.ndarray]:
    return {name: value.const_value.numpy().copy() for name, value in load_model(path).graph.initializers.items()}


def test_spans_cover_the_changes(models):
    reference, student = models
    values, report = heal(student / "model.onnx", reference / "model.onnx", sources(),
                          HealOptions(**{**OPTIONS.to_dict(), "stages": ("local",), "local_epochs": 1}))
    # kept sublayers bound the spans: attention 2 | FFN 2-4 with attention 3-4 removed | attention 5;
    # attention 6 | FFN 6 removed | attention 7, taken over by FFN 5 (checkpoint layer 3: 2-4 is one layer)
    described = [span.to_dict() for span in report.spans]
    assert [d["stream_positions"] for d in described] == [[5, 10], [13, 14]]
    assert described[0]["what"] == "FFN 2-4, attention 3-4 removed" and described[0]["checkpoint_layers"] == [2]
    assert described[1]["what"] == "FFN 6 removed" and described[1]["checkpoint_layers"] == [3]
    assert list(report.local) == [0]  # the local stage needs a span's own FFNs


def test_local_stage_lowers_each_span_error_on_held_out_tokens(models):
    reference, student = models
    _, report = heal(student / "model.onnx", reference / "model.onnx", sources(),
                     HealOptions(**{**OPTIONS.to_dict(), "stages": ("local",)}))
    assert len(report.local) == 1
    for curve in report.local.values():
        assert curve.best < 0.95 * curve.initial, curve.to_dict()


def test_bfloat16_training_with_the_final_stream_term_heals_every_source(models):
    reference, student = models
    options = HealOptions(**{**OPTIONS.to_dict(), "compute_dtype": "bfloat16", "hidden_weight": 1.0})
    values, report = heal(student / "model.onnx", reference / "model.onnx", sources(), options)
    assert report.changed and values and all(v.dtype == np.float32 for v in values.values())
    assert all(report.kl_output[n] < 0.8 * report.kl_input[n] for n in report.kl_input), report.to_dict()
    assert report.to_dict()["options"]["compute_dtype"] == "bfloat16"


@pytest.mark.parametrize("native", [True, False])
def test_auto_compute_dtype_is_bfloat16_only_where_the_cpu_has_it(monkeypatch, native):
    from ffnfusion.runtime.heal.distill import resolve_compute_dtype

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert resolve_compute_dtype("auto", "cpu") == ("bfloat16" if native else "float32")
    assert resolve_compute_dtype("float32", "cpu") == "float32"


def test_final_stream_term_is_the_relative_squared_error():
    from ffnfusion.runtime.heal.distill import relative_error

    target = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    hidden = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert float(relative_error(target, target)) == 0.0
    assert float(relative_error(hidden, target)) == pytest.approx((0 / 25 + 2 / 1) / 2)


@pytest.mark.parametrize(("field", "value", "message"), [("compute_dtype", "float16", "auto, float32, bfloat16"),
                                                         ("hidden_weight", -1.0, "at least 0")])
def test_bad_training_options_are_refused_before_any_work(models, field, value, message):
    reference, student = models
    with pytest.raises(InvalidArgumentError, match=message):
        heal(student / "model.onnx", reference / "model.onnx", sources(),
             HealOptions(**{**OPTIONS.to_dict(), field: value}))


def test_written_model_equals_the_torch_student(models, tmp_path):
    reference, student = models
    summary, report = heal_model_file(student, reference, tmp_path / "healed", sources=sources(), options=OPTIONS)
    assert report.changed, report.describe()
    assert all(report.kl_output[n] < report.kl_input[n] for n in report.kl_input)
    # the torch student with the trained values, against ONNX Runtime on the written file
    torch_student = load_torch_model(student / "model.onnx", tmp_path / "work")
    values, _ = heal(student / "model.onnx", reference / "model.onnx", sources(), OPTIONS)
    with torch.no_grad():
        for name, param in torch_student.module.named_parameters():
            if name in values:
                param.copy_(torch.from_numpy(values[name]))
    ids = markov_windows(9, 2)
    with torch.no_grad():
        expected = torch_student.module(input_ids=torch.from_numpy(ids)).logits.numpy()
    actual = run_logits(create_session(summary["output"]), ids)
    assert rel_err(actual, expected) < 1e-5
    # the same graph: same nodes, same initializer names and shapes, only trained values differ
    before, after = initializers(student / "model.onnx"), initializers(summary["output"])
    assert before.keys() == after.keys() and all(before[k].shape == after[k].shape for k in before)
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert 0 < len(changed) <= len(report.written)
    meta = json.loads((tmp_path / "healed" / "ffnfusion.json").read_text())
    assert meta["heal"]["changed"] and meta["heal"]["global"]["train_loss"]


def test_a_student_equal_to_its_reference_heals_to_itself(models, tmp_path):
    reference, _ = models
    # the same weights under another folder: no span changed, KL 0, nothing written differently
    copy_dir = tmp_path / "copy"
    rewrite_model_file(reference / "model.onnx", copy_dir, lambda model: None, "copy", lambda m: None, False)
    for train, compute_dtype in (("changed", "float32"), ("all", "bfloat16")):
        options = HealOptions(**{**OPTIONS.to_dict(), "train": train, "global_epochs": 1,
                                 "compute_dtype": compute_dtype, "hidden_weight": 1.0})
        summary, report = heal_model_file(copy_dir, reference, tmp_path / train, sources=sources(), options=options)
        assert report.spans == [] and not report.changed
        assert max(report.kl_input.values()) < 1e-6
        assert "kept the input weights" in report.describe()
        before, after = initializers(copy_dir / "model.onnx"), initializers(summary["output"])
        assert all(np.array_equal(before[k], after[k]) for k in before)


def test_a_heal_that_does_not_help_keeps_the_input_weights(models, tmp_path):
    reference, student = models
    harmful = HealOptions(**{**OPTIONS.to_dict(), "stages": ("global",), "global_lr": 3.0, "global_epochs": 1,
                             "eval_every": 100})
    summary, report = heal_model_file(student, reference, tmp_path / "out", sources=sources(), options=harmful)
    assert not report.changed and report.kept_spans == [] and report.reverted_spans == [0, 1]
    assert report.kl_output == report.kl_input
    before, after = initializers(student / "model.onnx"), initializers(summary["output"])
    assert all(np.array_equal(before[k], after[k]) for k in before)
    meta = json.loads((tmp_path / "out" / "ffnfusion.json").read_text())
    assert meta["heal"]["changed"] is False and "kept the input weights" in meta["heal"]["summary"]


@pytest.mark.parametrize(("change", "message"), [({"vocab_size": 96}, "vocab_size"),
                                                  ({"hidden_size": 48, "num_attention_heads": 3,
                                                    "num_key_value_heads": 1}, "hidden_size")])
def test_a_reference_that_is_not_the_parent_is_refused(models, tmp_path, capsys, change, message):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, student = models
    other = export_model(LlamaForCausalLM(LlamaConfig(**{**TINY_CONFIG, **change})).eval(), tmp_path / "other",
                         ExportOptions(opset=20))
    with pytest.raises(InvalidArgumentError, match=message):
        heal(student / "model.onnx", other, sources(), OPTIONS)
    ids = tmp_path / "ids.npy"
    np.save(ids, markov_windows(3, 20).reshape(-1))
    code = main(["heal", str(student), "--reference", str(other), "-o", str(tmp_path / "out"), "--token-ids",
                 str(ids), "--window", "64", "--tokens", "256", "--held-out-tokens", "128", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "not this model's parent" in err and len(err.strip().splitlines()[-1]) > 0
    assert [line for line in err.splitlines() if line.startswith("ffnfusion: error:")] == \
        [err.strip().splitlines()[-1]]
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_heal_writes_model_report_and_curves(models, tmp_path, capsys):
    reference, student = models
    ids = tmp_path / "ids.npy"
    np.save(ids, markov_windows(4, 24).reshape(-1))
    code = main(["heal", str(student), "--reference", str(reference), "-o", str(tmp_path / "out"), "--token-ids",
                 str(ids), "--window", "64", "--tokens", "1024", "--held-out-tokens", "256", "--epochs", "1",
                 "--local-epochs", "2", "--lr", "1e-3", "--local-lr", "3e-3", "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(captured.out)
    assert data["sources"] == {"ids": {"fit_tokens": 1024, "held_out_tokens": 256}}
    assert (tmp_path / "out" / "heal.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "model.onnx").is_file() and (tmp_path / "out" / "ffnfusion.json").is_file()
    assert "heal: global" in captured.err
