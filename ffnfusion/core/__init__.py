"""The bottom layer: errors, model I/O with the external-data checks, atomic writes, chunked tensors.
Imports nothing else from ffnfusion."""
