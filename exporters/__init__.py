"""Model sources and PyTorch -> ONNX export."""
