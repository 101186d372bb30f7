"""Teacher and student as torch modules built from ONNX files, what changed between them, and the
trained weights written back into the student's graph.

Both models go through the path the project already checks its graphs against: the ONNX file is
written as a Nemotron-NAS checkpoint (:func:`~ffnfusion.exporters.hf_checkpoint.export_hf`: one layer
per stream position, a fused group one wide FFN) and loaded by
:func:`~ffnfusion.exporters.nemotron_nas.build_torch_model` (tested equal to the ONNX graph to 1e-5).
The same tensor map (:func:`~ffnfusion.exporters.hf_checkpoint.checkpoint_tensors`) tells, for every
checkpoint tensor, which initializer it came from, so trained values go back into those initializers:
the healed model is the same graph with new values.

Stream positions are the original model's: ``2j`` before the attention of layer ``j``, ``2j + 1``
before its FFN, ``2L`` the final stream. Sublayer ``t`` runs from position ``t`` to ``t + 1``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np
import onnx_ir as ir

from ffnfusion.core.errors import HealError, InvalidArgumentError
from ffnfusion.core.model_io import load_model, model_file
from ffnfusion.exporters import hf_checkpoint, nemotron_nas
from ffnfusion.exporters.hf_checkpoint import HFLayer
from ffnfusion.passes.layer_ranges import format_ranges


@dataclasses.dataclass
class TorchModel:
    """A model file as a torch module, with the layers of its checkpoint (one per stream position)."""

    path: pathlib.Path
    module: Any  # a transformers model (torch.nn.Module; its attributes are dynamic)
    layers: list[HFLayer]
    config: dict

    @property
    def num_layers(self) -> int:
        return self.layers[-1].source_layers[-1] + 1

    def decoder_layer(self, position: int):
        from ffnfusion.exporters.llama_surgery import decoder_layers

        return decoder_layers(self.module)[position]


def load_torch_model(model_path, workdir: pathlib.Path, device: str = "cpu") -> TorchModel:
    """``model_path`` (an ONNX model ffnfusion wrote) as a float32 torch module on ``device``."""
    path = model_file(model_path)
    checkpoint = workdir / path.parent.name
    result = hf_checkpoint.export_hf(path, checkpoint, llama_if_uniform=False)
    module = nemotron_nas.build_torch_model(checkpoint).to(device)
    for parameter in module.parameters():  # trained only where a stage asks
        parameter.requires_grad_(False)
    config = json.loads((checkpoint / "config.json").read_text())
    return TorchModel(path, module, result.layers, config)


PARENT_KEYS = ("vocab_size", "hidden_size", "num_attention_heads")


def check_parent_configs(model_dir: pathlib.Path, reference_dir: pathlib.Path) -> None:
    """The same check on the source configs beside the files, before either model is built (a
    wrong reference of an 8B model is refused in a second, not after two checkpoint writes)."""
    mine, theirs = hf_checkpoint.source_config(model_dir), hf_checkpoint.source_config(reference_dir)
    for key in (*PARENT_KEYS, "num_hidden_layers"):
        if key in mine and key in theirs and mine[key] != theirs[key]:
            raise InvalidArgumentError(f"--reference {reference_dir} is not this model's parent: {key} "
                                       f"{theirs[key]} vs {mine[key]}")


def check_parent(student: TorchModel, teacher: TorchModel) -> None:
    """The reference must be the model the student was reduced from: same vocabulary, width, layer
    count and numbering, every layer whole (attention and one unfused FFN)."""
    for key in PARENT_KEYS:
        if student.config.get(key) != teacher.config.get(key):
            raise InvalidArgumentError(f"--reference {teacher.path.parent} is not this model's parent: {key} "
                                       f"{teacher.config.get(key)} vs {student.config.get(key)}")
    if teacher.num_layers != student.num_layers:
        raise InvalidArgumentError(f"--reference {teacher.path.parent} has {teacher.num_layers} layers, the model "
                                   f"{student.num_layers}: not its parent")
    for layer in teacher.layers:
        if len(layer.source_layers) != 1 or layer.kv_heads is None or layer.ffn_width is None:
            raise InvalidArgumentError(f"--reference {teacher.path.parent}: layer {layer.source_layers[0]} is "
                                       "reduced (attention or FFN removed, or fused); the reference is the "
                                       "original model")


def check_trainable(path: pathlib.Path) -> None:
    """Weights that a trained float value cannot simply replace are refused before any work."""
    model = load_model(path)
    if any(node.op_type in ("MatMulNBits", "GatherBlockQuantized") for node in model.graph):
        raise HealError(f"{path} stores 4-bit weights (MatMulNBits): heal the float model, then quantise it")


@dataclasses.dataclass(frozen=True)
class Span:
    """A run of changed sublayers: the student's FFNs at ``units`` (checkpoint positions) stand for
    the original's sublayers between stream positions ``start`` and ``stop``."""

    start: int
    stop: int
    units: tuple[int, ...]
    what: str
    # A span with no FFN of its own (an FFN removed between two kept attentions) is taken over by the
    # nearest FFN before it, trained in the global stage (ReplaceMe's "last FFN before the cut").
    helper: int | None = None

    @property
    def trained(self) -> tuple[int, ...]:
        """Checkpoint positions whose FFN this span trains."""
        return self.units or ((self.helper,) if self.helper is not None else ())

    def describe(self) -> str:
        helper = f"; trained through the FFN at checkpoint layer {self.helper}" if self.helper is not None else ""
        return f"stream positions {self.start}-{self.stop} ({self.what}{helper})"

    def to_dict(self) -> dict:
        return {"stream_positions": [self.start, self.stop], "checkpoint_layers": list(self.trained),
                "what": self.what}


def changed_spans(student: TorchModel, teacher: TorchModel) -> list[Span]:
    """The student's changes against the teacher, as runs of sublayers.

    A sublayer of the original is *kept* (the student runs it unchanged), *removed*, or *trained*: an
    FFN that is fused, whose weights differ from the original's (a refit), or that sits next to a
    removed sublayer. A span is a maximal run of removed and trained sublayers; kept ones bound it."""
    unit_of = _ffn_positions(student)
    status = _sublayer_status(student, teacher, unit_of)
    spans = []
    t = 0
    while t < len(status):
        if status[t] == "kept":
            t += 1
            continue
        start = t
        while t < len(status) and status[t] != "kept":
            t += 1
        spans.append(_span(student, status, unit_of, start, t))
    return spans


def _ffn_positions(student: TorchModel) -> dict[int, int]:
    """Original layer -> student position of the FFN that holds it."""
    unit_of: dict[int, int] = {}
    for position, hf_layer in enumerate(student.layers):
        if hf_layer.ffn_width is not None:
            unit_of.update(dict.fromkeys(hf_layer.source_layers, position))
    return unit_of


def _sublayer_status(student: TorchModel, teacher: TorchModel, unit_of: dict[int, int]) -> list[str]:
    """``kept`` / ``removed`` / ``trained`` for each sublayer ``t`` of the original (attention of
    layer ``t // 2`` when ``t`` is even, its FFN when odd)."""
    import torch

    attention = {layer.source_layers[0] for layer in student.layers if layer.kv_heads is not None}
    status = []
    for t in range(2 * teacher.num_layers):
        layer = t // 2
        unit = unit_of.get(layer)
        if t % 2 == 0:
            status.append("kept" if layer in attention else "removed")
        elif unit is None:
            status.append("removed")
        elif len(student.layers[unit].source_layers) > 1:
            status.append("trained")
        else:
            mine, original = student.decoder_layer(unit), teacher.decoder_layer(layer)
            same = all(torch.equal(getattr(mine.mlp, n).weight, getattr(original.mlp, n).weight)
                       for n in ("gate_proj", "up_proj", "down_proj")) and \
                torch.equal(mine.post_attention_layernorm.weight, original.post_attention_layernorm.weight)
            status.append("kept" if same else "trained")
    for t in range(1, len(status), 2):  # an FFN next to a removed sublayer takes over its work
        if status[t] == "kept" and "removed" in (status[t - 1], status[t + 1] if t + 1 < len(status) else None):
            status[t] = "trained"
    return status


def _span(student: TorchModel, status: list[str], unit_of: dict[int, int], start: int, stop: int) -> Span:
    """The span of sublayers ``start..stop-1`` (none of them kept)."""
    layers = range(start // 2, (stop - 1) // 2 + 1)
    units = tuple(sorted({unit_of[j] for j in layers if 2 * j + 1 in range(start, stop)
                          and status[2 * j + 1] == "trained"}))
    removed_attention = [j for j in layers if 2 * j in range(start, stop) and status[2 * j] == "removed"]
    removed_ffn = [j for j in layers if 2 * j + 1 in range(start, stop) and status[2 * j + 1] == "removed"]
    parts = [f"FFN {format_ranges(student.layers[u].source_layers)}" for u in units]
    if removed_attention:
        parts.append(f"attention {format_ranges(removed_attention)} removed")
    if removed_ffn:
        parts.append(f"FFN {format_ranges(removed_ffn)} removed")
    helper = None
    if not units:
        before = [j for j in range(start // 2) if 2 * j + 1 < start and j in unit_of]
        helper = unit_of[before[-1]] if before else None
    return Span(start, stop, units, ", ".join(parts), helper)


def trainable_parameters(student: TorchModel, units, train: str) -> dict[str, Any]:
    """Checkpoint name -> parameter: the FFNs (and their norm gains) at ``units``, or with
    ``train == "all"`` every decoder weight (the embedding, final norm and head stay)."""
    named = dict(student.module.named_parameters())
    if train == "all":
        return {name: p for name, p in named.items() if name.startswith("model.layers.")}
    prefixes = tuple(f"model.layers.{u}.{part}" for u in units for part in ("mlp.", "post_attention_layernorm."))
    return {name: p for name, p in named.items() if name.startswith(prefixes)}


def fold_ungained_norms(student: TorchModel) -> None:
    """A fused group's norm has no gain in the graph (its members' gains are folded into gate/up):
    fold a trained gain the same way, exactly, so that there is an initializer for every value."""
    import torch

    with torch.no_grad():
        for position, layer in enumerate(student.layers):
            if layer.ffn_width is None or len(layer.source_layers) == 1:
                continue
            module = student.decoder_layer(position)
            gain = module.post_attention_layernorm.weight
            module.mlp.gate_proj.weight.mul_(gain[None, :])
            module.mlp.up_proj.weight.mul_(gain[None, :])
            gain.fill_(1.0)


def write_back(model: ir.Model, model_dir: pathlib.Path, values: dict[str, np.ndarray]) -> list[str]:
    """Checkpoint-named float32 values (``[out, in]``, FFN widths possibly padded) into the
    initializers they came from, in each initializer's dtype and layout; returns what was written."""
    config = hf_checkpoint.source_config(model_dir)
    written = []
    for entry in hf_checkpoint.checkpoint_tensors(model, config).tensors:
        if entry.name not in values:
            continue
        value = values[entry.name]
        if entry.value is None:
            if not np.allclose(value, np.asarray(entry.tensor)):
                raise HealError(f"{entry.name} changed but the graph has no initializer for it")
            continue
        stored = entry.value.const_value
        assert stored is not None  # checkpoint_tensors only names initializers
        shape = tuple(stored.shape.numpy())
        out_in = shape[::-1] if entry.transpose else shape
        if len(out_in) == 2:
            value = value[:out_in[0], :out_in[1]]  # the checkpoint's zero padding is not the graph's
        array = np.ascontiguousarray(value.T if entry.transpose else value).astype(stored.dtype.numpy())
        if array.shape != shape:
            raise HealError(f"{entry.name}: trained shape {array.shape} does not fit {entry.value.name} {shape}")
        entry.value.const_value = ir.tensor(array, name=entry.value.name)
        written.append(entry.name)
    return written
