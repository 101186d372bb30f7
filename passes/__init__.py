"""Graph passes: block recognition, fusion plans and the FFN fusion rewrite."""

from ffnfusion.core.errors import BlockRecognitionError
from ffnfusion.passes.block_map import BlockMap, DecoderLayer, FFNBlock
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.ffn_fusion import FFNFusionPass, fuse_ffn_groups
from ffnfusion.passes.plan import FusionPlan, InvalidPlanError

__all__ = [
    "BlockMap", "BlockRecognitionError", "DecoderLayer", "FFNBlock", "FFNFusionPass", "FusionPlan",
    "InvalidPlanError", "find_blocks", "fuse_ffn_groups",
]
