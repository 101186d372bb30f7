"""ffnfusion: FFN Fusion (arXiv 2503.18908) as an ONNX compiler pass.

    from ffnfusion import FFNFusionPass, find_blocks, fuse_ffn
    from ffnfusion import BlockParallelPass  # whole blocks side by side
"""

from ffnfusion.api import fuse_ffn
from ffnfusion.passes.attention_removal import AttentionRemovalPass
from ffnfusion.passes.block_parallel import BlockParallelPass
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.ffn_fusion import FFNFusionPass
from ffnfusion.passes.plan import FusionPlan

__version__ = "0.1.0"

import sys as _sys

if "olive" in _sys.modules:  # inside an Olive workflow: register the FuseFFN surgeon
    from ffnfusion import olive as _olive  # noqa: F401
__all__ = ["AttentionRemovalPass", "BlockParallelPass", "FFNFusionPass", "FusionPlan", "find_blocks", "fuse_ffn"]
