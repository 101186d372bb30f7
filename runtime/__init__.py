"""Running models: ONNX Runtime sessions."""
