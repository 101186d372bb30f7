"""``fuse_ffn``: the fusion pass for whatever form a pipeline holds its model in."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import onnx_ir as ir

from ffnfusion.core.errors import InvalidArgumentError
from ffnfusion.passes.ffn_fusion import FFNFusionPass
from ffnfusion.passes.plan import FusionPlan


def fuse_ffn(model, groups: FusionPlan | Sequence[Sequence[int]] | str, *, output: str | os.PathLike | None = None,
             target: str = "gpu"):
    """Fuse ``groups`` (a :class:`FusionPlan`, lists of layer indices, or ``"10-13,14-16"``) for
    ``target`` ``"gpu"`` (TensorRT/CUDA) or ``"cpu"`` (ONNX Runtime CPU: width padded, same outputs).

    * ``onnx_ir.Model``: rewritten in place and returned;
    * ``onnx.ModelProto``: a new, fused ``ModelProto`` is returned (the input is left alone);
    * a path: the fused model is written atomically to ``output`` (required), validated, and its
      path returned.
    """
    plan = FusionPlan.coerce(groups)
    if isinstance(model, ir.Model):
        return FFNFusionPass(plan, target)(model).model
    if isinstance(model, (str, os.PathLike)):
        if output is None:
            raise InvalidArgumentError("fuse_ffn(path, ...) needs output=PATH for the fused model")
        from ffnfusion.runtime.model_rewrite import fuse_model_file  # validation runs ONNX Runtime

        return pathlib.Path(fuse_model_file(model, output, plan, target=target)["output"])
    import onnx

    if isinstance(model, onnx.ModelProto):
        fused = FFNFusionPass(plan, target)(ir.from_proto(model)).model
        return ir.to_proto(fused)
    raise InvalidArgumentError(
        f"fuse_ffn takes an onnx_ir.Model, an onnx.ModelProto or a path, not {type(model).__name__}")
