"""Validate a written model: ``onnx.checker`` (full check) and, when it fits, an ONNX Runtime load."""

from __future__ import annotations

import logging
import os

import onnx_ir as ir

from ffnfusion.core.errors import ModelFileError, ModelRunError
from ffnfusion.core.model_io import initializer_bytes
from ffnfusion.runtime.onnxruntime import create_session

logger = logging.getLogger(__name__)


def ort_load_limit() -> int:
    """Largest model we load into an ORT session to validate it: a quarter of physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def validate_model(path: str | os.PathLike, *, run_ort: bool = True) -> None:
    """``onnx.checker`` (full check) and, for models that fit comfortably in memory, an ORT
    session load."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:
        first = str(err).splitlines()[0]
        # ONNX Runtime registers some contrib ops (SimplifiedLayerNormalization, which ORT GenAI's
        # builder writes) in the default domain, where onnx has no schema: the load in ORT decides.
        if "No Op registered for" not in first or not run_ort:
            raise ModelFileError(f"{path} fails onnx.checker: {first}") from err
        logger.info(f"validate: onnx.checker has no schema for an op ONNX Runtime registers ({first}); "
                    "the ONNX Runtime load is the check")
        create_session(path)
        return
    if not run_ort:
        return
    weights = initializer_bytes(ir.load(path))
    if weights > ort_load_limit():
        logger.info(f"validate: skipped the ONNX Runtime load: {weights / 2**30:.1f} GiB of weights is more "
                    f"than a quarter of this machine's memory")
        return
    try:
        create_session(path)
    except ModelRunError as err:
        # A missing CPU kernel (e.g. bfloat16 Mul) says what this runtime lacks, not that the graph
        # is invalid: the graph already passed onnx.checker.
        if "Could not find an implementation" not in str(err):
            raise
        logger.info(f"validate: ONNX Runtime's CPU provider cannot run this model ({str(err).split(': ', 1)[-1]}); "
                    "the graph passed onnx.checker")
