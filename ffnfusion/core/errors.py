"""The one error hierarchy. Library code raises these; only the CLI turns them into exit codes
(``ffnfusion.cli.EXIT_CODES``) and one-line messages.

Every error is about the user's input or environment and says what to do; a bug in ffnfusion
surfaces as any other Python exception, with its traceback.
"""


class FFNFusionError(Exception):
    """Base class: a problem with the user's input or environment (CLI: exit code 1)."""


class InvalidArgumentError(FFNFusionError, ValueError):
    """A malformed argument value: a layer range, a plan file, a shape, an option (CLI: exit 2).

    Also a ``ValueError``, so callers that validate arguments the standard way catch it too."""


class ModelFileError(FFNFusionError):
    """A model file that is missing, unreadable, unsafe (external data outside its directory), or
    an output that cannot be written."""


class ModelSourceError(FFNFusionError):
    """A model source (``smollm2``, a .gguf file, a Hugging Face folder) that cannot be loaded."""


class BlockRecognitionError(FFNFusionError):
    """The graph does not have the residual structure ffnfusion rewrites."""


class UnknownLayerError(BlockRecognitionError, InvalidArgumentError):
    """A layer a command must read or rewrite is of a kind ffnfusion does not know (CLI: exit 2, as
    for any bad input): the message names the layer and the node where recognition stopped."""


class InvalidPlanError(FFNFusionError):
    """The requested groups or layers do not fit the model."""


class ModelRunError(FFNFusionError):
    """ONNX Runtime cannot load or run a model, or a runtime check of one failed."""


class RepairError(FFNFusionError):
    """The fused model or the calibration data do not allow a repair."""


class DataSourceError(FFNFusionError):
    """A named calibration text cannot be had here (no registry reachable, a checksum mismatch)."""


class HealError(FFNFusionError):
    """A model and its reference do not allow distillation (not the model's parent, unsupported weights)."""


class TensorRTUnavailableError(FFNFusionError):
    """``import tensorrt`` failed, or TensorRT cannot create a builder/runtime here (CLI: exit 3)."""


class TensorRTError(FFNFusionError):
    """TensorRT rejected the model, the profile, or failed to build or run an engine."""
