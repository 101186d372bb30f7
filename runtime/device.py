"""Where a model-running command computes: ``--device auto|cpu|cuda``.

One device per run. ONNX Runtime runs the model's pieces (attention branches, whole layers, the head)
with the device's execution provider; on CUDA, torch computes what ffnfusion evaluates itself from the
weights (the depth search's FFNs, fused groups and refitted down projections), which on the CPU stay
in numpy (faster there beside ONNX Runtime's threads: :mod:`ffnfusion.runtime.frontier.ffns`).
``auto`` takes CUDA when torch sees a CUDA device, else the CPU, and says which. ONNX Runtime follows
onto CUDA only where its build has the CUDA provider (``onnxruntime-gpu``); otherwise its pieces stay
on the CPU, said once. :data:`CPU_TORCH` runs the GPU path's torch code on the CPU, so that a machine
without a GPU tests it end to end.
"""

from __future__ import annotations

import dataclasses
import logging

from ffnfusion.core.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class Device:
    name: str  # "cpu" | "cuda": where torch computes
    provider: str  # ONNX Runtime's: a key of :data:`ffnfusion.runtime.onnxruntime.PROVIDERS`
    description: str
    torch_ffns: bool = False  # the depth search's FFNs in torch (CUDA) or numpy (the CPU: see frontier.ffns)

    @property
    def torch(self):
        import torch

        return torch.device(self.name)


CPU = Device("cpu", "cpu", "cpu")


def resolve_device(requested: str | Device | None = "auto") -> Device:
    """The device ``requested`` names (``auto``/None: CUDA when torch sees one, else the CPU), logged
    when it is resolved from a name."""
    if isinstance(requested, Device):
        return requested
    device = _resolve(requested or "auto")
    logger.info(f"device: {device.description}")
    return device


def _resolve(requested: str) -> Device:
    if requested not in DEVICES:
        raise InvalidArgumentError(f"--device must be one of {', '.join(DEVICES)}, not {requested!r}")
    if requested == "cpu":
        return CPU
    import torch

    if not torch.cuda.is_available():
        if requested == "cuda":
            raise InvalidArgumentError("--device cuda: torch sees no CUDA device here; use --device cpu (or auto)")
        return Device("cpu", "cpu", "cpu (auto: torch sees no CUDA device)")
    import onnxruntime as ort

    name = torch.cuda.get_device_name()
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return Device("cuda", "cuda", f"cuda ({name}), ONNX Runtime's pieces on its CUDA provider", True)
    return Device("cuda", "cpu", f"cuda ({name}); ONNX Runtime's pieces on the CPU (this onnxruntime build "
                                 "has no CUDA provider)", True)


# The GPU path's code on the CPU: what ``benchmarks.frontier_gpu --smoke`` compares with the CPU's own.
CPU_TORCH = Device("cpu", "cpu", "cpu, FFNs in torch (the GPU path's code)", True)
