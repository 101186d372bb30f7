"""Remove FFN blocks outright: ``x + ffn(n(x))`` becomes ``x`` (the paper's removal baseline)."""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from ffnfusion.core.errors import InvalidPlanError
from ffnfusion.passes.block_map import ATTENTION_ONLY_METADATA, EMPTY_LAYERS_METADATA, layers_in_metadata
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.canonical import RewritePass
from ffnfusion.passes.layer_ranges import format_ranges


class FFNRemovalPass(RewritePass):
    """Skip the FFN residual branch of ``layers``. Attention-free layers thereby leave the stream;
    they are recorded in the model metadata so that ``find_blocks`` keeps the original numbering."""

    def __init__(self, layers: Iterable[int]):
        super().__init__()
        self.layers = sorted(set(layers))

    def rewrite(self, model: ir.Model) -> ir.passes.PassResult:
        block_map = find_blocks(model)
        blocks = [block_map.ffn(index) for index in self.layers]
        replaced: dict[ir.Value, ir.Value] = {}  # adjacent removals: one's output is the next's input
        for block in blocks:
            if len(block_map.layer(block.layer).span) > 1:
                raise InvalidPlanError(f"layer {block.layer} is part of a fused FFN; cannot remove one member")
            source = replaced.get(block.input, block.input)
            ir.convenience.replace_all_uses_with(block.output, source)
            replaced[block.output] = source
        RemoveUnusedNodesPass()(model)
        for key, has_attention in ((EMPTY_LAYERS_METADATA, False), (ATTENTION_ONLY_METADATA, True)):
            touched = {i for i in self.layers if block_map.layer(i).attention == has_attention}
            if touched:
                model.metadata_props[key] = format_ranges(set(layers_in_metadata(model, key)) | touched)
        return ir.passes.PassResult(model, modified=bool(self.layers))
