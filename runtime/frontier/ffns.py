"""The depth search's FFNs, computed from the stored weights: :class:`DeviceFFNs` in torch on the
run's device, :class:`NumpyFFNs` in numpy on the host. Both give the same answers (tested to 1e-5,
and the same search path end to end in ``benchmarks.frontier_gpu --smoke``); which one a run uses is
its device's (:attr:`~ffnfusion.runtime.device.Device.torch_ffns`): torch on CUDA, numpy on the CPU,
where torch's threads beside ONNX Runtime's and numpy's cost 10-20% per FFN here (measured in one
process; alone, each is as fast).

``update`` is a span's residual update at one input, ``Σ_j down_j(act_j(n_j(x)))`` (each member
through its post-RMSNorm where it has one): one FFN, or the members of a fused group side by side —
exactly the fused FFN. ``activation`` is what a down projection reads, for the refits' least squares.
Streams and results stay numpy on the host (ONNX Runtime's pieces read and write them); weights are
kept (on the device) unless the model is streamed (larger than RAM: read per use).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ffnfusion.passes.block_map import FFNBlock
from ffnfusion.passes.norm_matchers import Norm
from ffnfusion.passes.streaming import read_columns, read_rows
from ffnfusion.runtime.ffn_reference import activation, apply_norm, down_bias, normed

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclasses.dataclass(frozen=True)
class _Weights:
    gate: torch.Tensor | None  # None: a plain MLP
    up: torch.Tensor
    gate_bias: torch.Tensor
    up_bias: torch.Tensor
    down: torch.Tensor
    down_bias: torch.Tensor


class DeviceFFNs:
    """The FFNs ``blocks`` (layer -> block) on ``device``; ``keep``: hold their weights there."""

    def __init__(self, blocks: dict[int, FFNBlock], device: torch.device, keep: bool):
        self.blocks = blocks
        self.device = device
        self.keep = keep
        self._weights: dict[int, _Weights] = {}

    def update(self, span: tuple[int, int], stream: np.ndarray, delta: np.ndarray | None) -> np.ndarray:
        """``Σ_j down_j(act_j(x))`` (``post_j(...)`` for post-normed FFNs) over the span's members at
        one input, with ``delta`` added to the stacked down projection."""
        with torch.no_grad():
            x = self._tensor(stream.reshape(-1, stream.shape[-1]))
            total = torch.zeros_like(x)
            offset = 0
            for layer in range(span[0], span[1] + 1):
                width = self.blocks[layer].width
                total += self._member_update(layer, x, None if delta is None else delta[offset:offset + width])
                offset += width
            return total.cpu().numpy().reshape(stream.shape)

    def _member_update(self, layer: int, x: torch.Tensor, delta: np.ndarray | None) -> torch.Tensor:
        # As NumpyFFNs': one member's weights alive at a time, Δ added in place to a W_down read for this use.
        weights = self._of(layer)
        down = weights.down
        if delta is not None:
            down = down + self._tensor(delta) if self.keep else down.add_(self._tensor(delta))
        output = self._activation(layer, x) @ down + weights.down_bias
        post_norm = self.blocks[layer].post_norm
        return output if post_norm is None else self._norm(post_norm, output)

    def activation(self, layer: int, x: np.ndarray) -> np.ndarray:
        """``act(n(x)·G + b_g) ⊙ (n(x)·U + b_u)`` of FFN ``layer`` (what its down projection reads)."""
        with torch.no_grad():
            return self._activation(layer, self._tensor(x)).cpu().numpy()

    def down(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """``W_down`` [width, hidden] and ``b_d`` of FFN ``layer``, float32 on the host."""
        block = self.blocks[layer]
        return read_rows(block.down, 0, block.width).astype(np.float32), down_bias(block)

    def _activation(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        block, weights = self.blocks[layer], self._of(layer)
        n = self._norm(block.norm, x)
        value = n @ weights.up + weights.up_bias
        act = ACTIVATIONS[block.activation]
        if weights.gate is None:
            return act(value)
        return act(n @ weights.gate + weights.gate_bias) * value

    def _norm(self, norm: Norm, x: torch.Tensor) -> torch.Tensor:
        if norm.centered:
            x = x - x.mean(-1, keepdim=True)
        x = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + norm.epsilon)
        if norm.gain is not None:
            x = x * self._constant(norm.gain)
        return x if norm.bias is None else x + self._constant(norm.bias)

    def _of(self, layer: int) -> _Weights:
        if layer in self._weights:
            return self._weights[layer]
        block = self.blocks[layer]
        zeros = np.zeros(block.width, np.float32)
        weights = _Weights(None if block.gate is None else self._tensor(read_columns(block.gate, 0, block.width)),
                           self._tensor(read_columns(block.up, 0, block.width)),
                           self._tensor(zeros if block.gate_bias is None else _numpy(block.gate_bias)),
                           self._tensor(zeros if block.up_bias is None else _numpy(block.up_bias)),
                           self._tensor(self.down(layer)[0]), self._tensor(down_bias(block)))
        if self.keep:
            self._weights[layer] = weights
        return weights

    def _constant(self, value) -> torch.Tensor:
        return self._tensor(_numpy(value))

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not array.flags.writeable:  # memory-mapped weights: torch wants its own copy
            array = array.copy()
        return torch.from_numpy(array).to(self.device)


def _numpy(value) -> np.ndarray:
    return value.const_value.numpy().astype(np.float32)


class NumpyFFNs:
    """:class:`DeviceFFNs` in numpy on the host (the CPU's default)."""

    def __init__(self, blocks: dict[int, FFNBlock], keep: bool):
        self.blocks = blocks
        self.keep = keep
        self._weights: dict[int, tuple] = {}

    def update(self, span: tuple[int, int], stream: np.ndarray, delta: np.ndarray | None) -> np.ndarray:
        x = stream.reshape(-1, stream.shape[-1])
        total = np.zeros_like(x)
        offset = 0
        for layer in range(span[0], span[1] + 1):
            width = self.blocks[layer].width
            total += self._member_update(layer, x, None if delta is None else delta[offset:offset + width])
            offset += width
        return total.reshape(stream.shape)

    def _member_update(self, layer: int, x: np.ndarray, delta: np.ndarray | None) -> np.ndarray:
        # One member's weights alive at a time (streamed, an 8B FFN's are 0.7 GB in float32), and
        # read for this use alone they take Δ in place, not into a second copy of W_down.
        weights = self._of(layer)
        down, bias = weights[4:]
        if delta is not None:
            down = down + delta if self.keep else np.add(down, delta, out=down)
        output = self._activation(layer, weights, x) @ down + bias
        post_norm = self.blocks[layer].post_norm
        return output if post_norm is None else apply_norm(post_norm, output)

    def activation(self, layer: int, x: np.ndarray) -> np.ndarray:
        return self._activation(layer, self._of(layer), x)

    def _activation(self, layer: int, weights: tuple, x: np.ndarray) -> np.ndarray:
        block = self.blocks[layer]
        gate, up, gate_bias, up_bias = weights[:4]
        n = normed(block, x)
        value = n @ up + up_bias
        if gate is None:
            return activation(block.activation, value)
        return activation(block.activation, n @ gate + gate_bias) * value

    def down(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        return self._of(layer)[4:]

    def _of(self, layer: int) -> tuple:
        if layer in self._weights:
            return self._weights[layer]
        block = self.blocks[layer]
        zeros = np.zeros(block.width, np.float32)
        weights = (None if block.gate is None else read_columns(block.gate, 0, block.width),
                   read_columns(block.up, 0, block.width),
                   zeros if block.gate_bias is None else _numpy(block.gate_bias),
                   zeros if block.up_bias is None else _numpy(block.up_bias),
                   read_rows(block.down, 0, block.width).astype(np.float32), down_bias(block))
        if self.keep:
            self._weights[layer] = weights
        return weights
