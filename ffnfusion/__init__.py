"""ffnfusion: FFN Fusion (arXiv 2503.18908) as an ONNX compiler pass."""

__version__ = "0.1.0"
