"""``--device``: what ``auto`` chooses and says, the refusals, and the torch FFN path (the one a GPU
runs) against the numpy reference on the CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ffnfusion.cli import main
from ffnfusion.core.errors import InvalidArgumentError
from ffnfusion.core.model_io import load_model
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.runtime import ffn_reference
from ffnfusion.runtime.block_runner import BlockRunner
from ffnfusion.runtime.device import CPU, CPU_TORCH, resolve_device
from ffnfusion.runtime.frontier.evaluator import DepthEvaluator
from ffnfusion.runtime.frontier.ffns import DeviceFFNs, NumpyFFNs


def test_auto_takes_cuda_only_when_torch_sees_it(monkeypatch):
    assert resolve_device("cpu") is CPU and resolve_device(None).name == "cpu"  # this machine: no GPU
    assert "no CUDA device" in resolve_device("auto").description
    with pytest.raises(InvalidArgumentError, match="--device cuda: torch sees no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(InvalidArgumentError, match="--device must be one of auto, cpu, cuda"):
        resolve_device("tpu")
    # With a GPU torch sees: CUDA for torch; ONNX Runtime's pieces on its CUDA provider when the build has it
    import onnxruntime as ort

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H200")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    device = resolve_device("auto")
    assert (device.name, device.provider) == ("cuda", "cuda") and "H200" in device.description
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    device = resolve_device("cuda")
    assert (device.name, device.provider) == ("cuda", "cpu") and "no CUDA provider" in device.description


def test_torch_ffns_equal_the_numpy_reference(tiny_dynamo20):
    blocks = {layer.index: layer.ffn for layer in find_blocks(load_model(tiny_dynamo20)).layers if layer.ffn}
    ffns = DeviceFFNs(blocks, CPU.torch, keep=True)
    x = np.random.default_rng(3).standard_normal((2, 9, blocks[2].hidden)).astype(np.float32)
    rows = x.reshape(-1, x.shape[-1])
    # one FFN, and a span of three side by side (the fused group), with a Δ on the stacked W_down
    assert np.allclose(ffns.update((2, 2), x, None).reshape(rows.shape), ffn_reference.update(blocks[2], rows),
                       atol=1e-5)
    delta = np.random.default_rng(4).standard_normal((sum(blocks[j].width for j in (2, 3, 4)),
                                                      blocks[2].hidden)).astype(np.float32) * 0.01
    expected = np.zeros_like(rows)
    offset = 0
    for layer in (2, 3, 4):
        width = blocks[layer].width
        expected += ffn_reference.update(blocks[layer], rows) + \
            ffn_reference.ffn_activation(blocks[layer], rows) @ delta[offset:offset + width]
        offset += width
    got = ffns.update((2, 4), x, delta).reshape(rows.shape)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    assert np.allclose(ffns.activation(3, rows), ffn_reference.ffn_activation(blocks[3], rows), atol=1e-5)
    numpy_ffns = NumpyFFNs(blocks, keep=False)
    assert np.allclose(numpy_ffns.update((2, 4), x, delta).reshape(rows.shape), got, atol=1e-5)


def test_the_search_takes_torch_ffns_on_cuda_and_numpy_ones_on_the_cpu(tiny_full):
    ids = np.random.default_rng(1).integers(0, 128, (2, 4, 16))
    on_cpu = DepthEvaluator(BlockRunner(tiny_full, streamed=False), ids[0], ids[1])
    assert isinstance(on_cpu.ffns, NumpyFFNs)
    torch_path = DepthEvaluator(BlockRunner(tiny_full, streamed=False, device=CPU_TORCH), ids[0], ids[1])
    assert isinstance(torch_path.ffns, DeviceFFNs) and torch_path.ffns.device.type == "cpu"
    assert torch_path.state.select.at[-1] == pytest.approx(on_cpu.state.select.at[-1], abs=1e-4)


def test_model_running_commands_take_device(capsys, tiny_dynamo20, tmp_path):
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 128, 2048))
    fused = tmp_path / "fused" / "model.onnx"
    assert main(["fuse", str(tiny_dynamo20), "-o", str(fused), "--groups", "2-4", "--repair", "--repair-tokens",
                 "1024", "--calib-ids", str(ids), "--device", "cpu"]) == 0
    assert "device: cpu" in capsys.readouterr().err
    assert main(["verify", str(tiny_dynamo20), str(fused), "--text-ids", str(ids), "--tokens", "64", "--window",
                 "32", "--json", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["kl"] > 0 and "device: cpu" in err
    assert main(["analyze", str(tiny_dynamo20), "-o", str(tmp_path / "report"), "--calib-ids", str(ids),
                 "--tokens", "128", "--window", "32", "--dependency-tokens", "64", "--device", "cpu"]) == 0
    assert "device: cpu" in capsys.readouterr().err
    # refused in one line, nothing written
    assert main(["fuse", str(tiny_dynamo20), "-o", str(tmp_path / "never.onnx"), "--groups", "2-4",
                 "--device", "cpu"]) == 2
    assert "--device is used by --repair" in capsys.readouterr().err and not (tmp_path / "never.onnx").exists()
    assert main(["verify", str(tiny_dynamo20), str(fused), "--text-ids", str(ids), "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip().endswith("torch sees no CUDA device here; use --device cpu (or auto)")


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_a_delta_taken_in_place_by_weights_read_for_one_use_gives_the_same_bits(tiny_dynamo20, kind):
    # Streamed (keep=False), W_down is read for each use and takes Δ in place; kept, it must not.
    blocks = {layer.index: layer.ffn for layer in find_blocks(load_model(tiny_dynamo20)).layers if layer.ffn}
    make = (lambda keep: NumpyFFNs(blocks, keep=keep)) if kind == "numpy" else \
        (lambda keep: DeviceFFNs(blocks, CPU.torch, keep=keep))
    kept, read_per_use = make(True), make(False)
    x = np.random.default_rng(5).standard_normal((2, 9, blocks[2].hidden)).astype(np.float32)
    delta = np.random.default_rng(6).standard_normal((sum(blocks[j].width for j in (2, 3)),
                                                      blocks[2].hidden)).astype(np.float32) * 0.01
    delta_before = delta.copy()
    plain = kept.update((2, 3), x, None)
    with_delta = kept.update((2, 3), x, delta)
    assert np.array_equal(read_per_use.update((2, 3), x, delta), with_delta)
    assert np.array_equal(kept.update((2, 3), x, None), plain)  # the kept W_down did not take Δ
    assert np.array_equal(read_per_use.update((2, 3), x, None), plain)
    assert np.array_equal(delta, delta_before)
    assert not np.array_equal(with_delta, plain)
