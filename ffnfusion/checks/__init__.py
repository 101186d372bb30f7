"""Checks of ffnfusion's outputs in engines other than ONNX Runtime, each in its own environment."""
