"""Torch-side rewrites of a Hugging Face Llama-style model.

* :func:`drop_attention` turns decoder layers into attention-free layers (Puzzle/DeciLM
  ``attention: no_op``): ``y = x + mlp(post_attention_layernorm(x))``. The attention branch is
  gone from the module, so it is gone from the exported graph too.
* :func:`parallelize_groups` builds the *reference* for fusion: each group of consecutive
  attention-free layers computed in parallel form ``y = x + Σ_i mlp_i(norm_i(x))``. The fused ONNX
  model must match this to float32 round-off.

Both keep the ``model.layers.N.mlp.*`` parameter names, so exported initializers stay readable.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ffnfusion.core.errors import InvalidPlanError, ModelSourceError

# A transformers causal LM (or one of its decoder layers): torch modules whose attributes (config,
# model.layers, mlp, ...) are set at run time, so they are typed as Any.
HFModel = Any


def ffn_norms(layer: HFModel) -> tuple[nn.Module, nn.Module | None]:
    """The norm an FFN reads its input through, and the one it normalises its output with (None
    for pre-norm layers). Gemma 2/3's *sandwich* layers have both (``pre_feedforward_layernorm``,
    ``post_feedforward_layernorm``), and there ``post_attention_layernorm`` is the attention's output
    norm, not the FFN's input norm."""
    if hasattr(layer, "pre_feedforward_layernorm"):
        return layer.pre_feedforward_layernorm, getattr(layer, "post_feedforward_layernorm", None)
    return layer.post_attention_layernorm, None


def residual_multiplier(layer: HFModel) -> float:
    """The factor a layer scales each branch's update by before adding it to the stream (Granite's
    ``residual_multiplier``; 1 elsewhere)."""
    return float(getattr(layer, "residual_multiplier", 1.0))


def fold_residual_multipliers(model: HFModel) -> bool:
    """Granite scales every branch's update, ``x + m·f(x)``: fold ``m`` into each branch's output
    projection (attention ``o_proj``, FFN ``down_proj``, weights and biases) and set it to 1, so the
    model is Llama-shaped for everything downstream (one linear layer ends each branch). Same
    function up to float32 rounding; returns whether anything was folded."""
    folded = False
    with torch.no_grad():
        for layer in decoder_layers(model):
            factor = residual_multiplier(layer)
            if factor == 1.0:
                continue
            for projection in (getattr(getattr(layer, "self_attn", None), "o_proj", None),
                               getattr(getattr(layer, "mlp", None), "down_proj", None)):
                if projection is None:
                    raise ModelSourceError(f"{type(layer).__name__} scales its residual branches by {factor} but has "
                                           "no o_proj/down_proj to fold the factor into")
                projection.weight.mul_(factor)
                if projection.bias is not None:
                    projection.bias.mul_(factor)
            layer.residual_multiplier = 1.0
            folded = True
    return folded


class AttentionFreeDecoderLayer(nn.Module):
    """A decoder layer whose attention residual branch is skipped entirely:
    ``y = x + m·post(mlp(pre(x)))`` (``post`` only in sandwich-norm layers, ``m`` Granite's residual
    multiplier, else 1)."""

    def __init__(self, layer: HFModel):
        super().__init__()
        pre, post = ffn_norms(layer)
        self.post_attention_layernorm = pre  # the FFN's input norm, under the Llama name
        self.mlp = layer.mlp
        self.post_feedforward_layernorm = post if post is not None else nn.Identity()
        self.residual_multiplier = residual_multiplier(layer)

    def ffn_update(self, hidden_states: torch.Tensor) -> torch.Tensor:
        update = self.post_feedforward_layernorm(self.mlp(self.post_attention_layernorm(hidden_states)))
        return update if self.residual_multiplier == 1.0 else update * self.residual_multiplier

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states + self.ffn_update(hidden_states)


class AttentionOnlyDecoderLayer(nn.Module):
    """A decoder layer without FFN (Nemotron-NAS ``ffn: no_op``): ``y = x + attn(input_layernorm(x))``."""

    def __init__(self, layer: HFModel):
        super().__init__()
        self.input_layernorm = layer.input_layernorm
        self.self_attn = layer.self_attn

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        update = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)[0]
        return hidden_states + update


class EmptyDecoderLayer(nn.Module):
    """A layer with neither attention nor FFN (Nemotron-NAS no-op/no-op placeholders)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def attention_layers(model: HFModel) -> list[int]:
    """Indices of the decoder layers that still run attention (and so carry a KV cache)."""
    return [i for i, layer in enumerate(decoder_layers(model)) if hasattr(layer, "self_attn")]


def layer_metadata(model: HFModel) -> dict[str, str]:
    """ONNX metadata naming the layers that leave no residual branch of their own (no-op/no-op) or
    keep attention without an FFN, so block recognition keeps the checkpoint's layer numbers."""
    from ffnfusion.passes.block_map import ATTENTION_ONLY_METADATA, EMPTY_LAYERS_METADATA
    from ffnfusion.passes.layer_ranges import format_ranges

    layers = decoder_layers(model)
    kinds = {EMPTY_LAYERS_METADATA: EmptyDecoderLayer, ATTENTION_ONLY_METADATA: AttentionOnlyDecoderLayer}
    found = {key: [i for i, layer in enumerate(layers) if isinstance(layer, kind)] for key, kind in kinds.items()}
    return {key: format_ranges(indices) for key, indices in found.items() if indices}


class ParallelFFNGroup(nn.Module):
    """Members of a fused group all read the same input: ``x + Σ_i ffn_i(x)``."""

    def __init__(self, members: Sequence[Any]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states + _summed_updates(self.members, hidden_states)


class _PassThrough(nn.Module):
    """Stands in for group members after the first: their work is done by the group."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def decoder_layers(model: HFModel) -> Any:
    """The decoder layer list of a ``*ForCausalLM`` (``model.layers`` for Llama, Mistral, Qwen2,
    Gemma, SmolLM; ``gpt_neox.layers`` for GPT-NeoX)."""
    inner = getattr(model, "base_model", None) or getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelSourceError(
            f"{type(model).__name__} has no decoder layer list; expected a Llama-style causal LM"
        )
    return layers


def drop_attention(model: HFModel, layer_indices: Iterable[int]) -> list[int]:
    """Replace the listed decoder layers with attention-free ones, in place; returns them sorted."""
    layers = decoder_layers(model)
    dropped = sorted(set(layer_indices))
    for index in dropped:
        if not 0 <= index < len(layers):
            raise InvalidPlanError(f"layer {index} out of range: the model has {len(layers)} layers")
        layer = layers[index]
        if isinstance(layer, AttentionFreeDecoderLayer):
            continue
        if not hasattr(layer, "mlp") or not (hasattr(layer, "post_attention_layernorm")
                                             or hasattr(layer, "pre_feedforward_layernorm")):
            raise ModelSourceError(f"layer {index} ({type(layer).__name__}) has no mlp and FFN norm")
        layers[index] = AttentionFreeDecoderLayer(layer)
    return dropped


def parallelize_groups(model: HFModel, groups: Iterable[Sequence[int]]) -> None:
    """Compute each group in parallel form, in place (reference model). Members after the first must
    be attention-free; a first member that keeps its attention runs it, then all members' FFNs read
    the stream after it."""
    layers = decoder_layers(model)
    for group in groups:
        members = [layers[i] for i in group]
        if not all(isinstance(m, AttentionFreeDecoderLayer) for m in members[1:]):
            raise InvalidPlanError(f"group {list(group)} has attention between its FFNs")
        first = members[0]
        if isinstance(first, AttentionFreeDecoderLayer):
            layers[group[0]] = ParallelFFNGroup(members)
        else:
            ffns = [AttentionFreeDecoderLayer(first), *members[1:]]
            # each member applies its own norms; the head's layer keeps only its attention's
            if hasattr(first, "pre_feedforward_layernorm"):
                first.pre_feedforward_layernorm = nn.Identity()
                first.post_feedforward_layernorm = nn.Identity()
            else:
                first.post_attention_layernorm = nn.Identity()
            first.mlp = _SummedFFNs(ffns)
        for index in group[1:]:
            layers[index] = _PassThrough()


class _SummedFFNs(nn.Module):
    """``Σ_i ffn_i(norm_i(h))``: the FFN of a layer that keeps its attention and heads a group."""

    def __init__(self, members: Sequence[Any]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return _summed_updates(self.members, hidden_states)


def _summed_updates(members: Iterable[Any], hidden_states: torch.Tensor) -> torch.Tensor:
    """``Σ_i ffn_i(norm_i(h))``, added in member order."""
    return functools.reduce(operator.add, (member.ffn_update(hidden_states) for member in members))


class _WindowMember(nn.Module):
    """One layer of a block-parallel window, at its own position in the model's loop (so it gets its
    own mask, rotary table and KV-cache slot: Gemma's sliding and global layers differ): it runs on
    the window's input, adds its update ``layer(x) − x`` to the window's sum, and passes ``x`` on;
    the last member returns ``x + Σ_j (layer_j(x) − x)``."""

    def __init__(self, layer: Any, window: dict, first: bool, last: bool):
        super().__init__()
        self.layer, self.first, self.last = layer, first, last
        self._window = window  # shared by the window's members: its input and the sum so far

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.first:
            self._window["input"] = hidden_states
        x = self._window["input"]
        update = _layer_output(self.layer(x, *args, **kwargs)) - x
        self._window["sum"] = update if self.first else self._window["sum"] + update
        return x + self._window["sum"] if self.last else x


def _layer_output(output: Any) -> torch.Tensor:
    """A decoder layer's hidden states (transformers 4 returns a tuple, 5 the tensor)."""
    return output[0] if isinstance(output, tuple) else output


def parallelize_blocks(model: HFModel, windows: Iterable[Sequence[int]]) -> None:
    """Compute each window of whole decoder layers in parallel form ``x + Σ_j (layer_j(x) − x)``, in
    place (the reference for :class:`~ffnfusion.passes.block_parallel.BlockParallelPass`)."""
    layers = decoder_layers(model)
    for window in windows:
        shared: dict = {}
        for index in window:
            layers[index] = _WindowMember(layers[index], shared, index == window[0], index == window[-1])


class _ZeroFFN(nn.Module):
    """A removed FFN in a layer that keeps its attention: the layer adds nothing after attention."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def apply_depth_plan(model: HFModel, plan, down_deltas=None) -> None:
    """A :class:`~ffnfusion.passes.depth_plan.DepthPlan` in torch, in place (the reference a written
    frontier model must match): attention dropped, FFNs removed, ``down_deltas`` (first layer ->
    ``ΔW_down`` as ``[span width, hidden]``) added to the members' down projections, groups in parallel form,
    windows of whole blocks side by side.
    Residual multipliers are folded first, as the exporter does: the deltas are in the exported weights' scale."""
    layers = decoder_layers(model)
    fold_residual_multipliers(model)
    drop_attention(model, plan.removed_attention)
    with torch.no_grad():
        for first, delta in (down_deltas or {}).items():
            last = plan.ffn_span(first)[1]
            offset = 0
            for index in range(first, last + 1):
                down = layers[index].mlp.down_proj.weight  # [hidden, width]
                down += torch.from_numpy(delta[offset:offset + down.shape[1]].T.copy()).to(down.dtype)
                offset += down.shape[1]
    for index in sorted(plan.removed_ffn):
        if isinstance(layers[index], AttentionFreeDecoderLayer):
            layers[index] = _PassThrough()
        else:
            layers[index].mlp = _ZeroFFN()
    parallelize_groups(model, [range(a, b + 1) for a, b in plan.groups])
    parallelize_blocks(model, [range(a, b + 1) for a, b in plan.windows])
