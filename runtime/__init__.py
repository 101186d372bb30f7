"""What runs models: ONNX Runtime sessions (:mod:`.onnxruntime`), block-by-block runs
(:mod:`.block_runner`) on a device (:mod:`.device`), calibration text (:mod:`.calibration`, :mod:`.corpora`), the dependency
analysis and planner (:mod:`.analysis`), the repair (:mod:`.repair`), verification
(:mod:`.verify`), the depth-reduction frontier (:mod:`.frontier`), healing (:mod:`.heal`), file
rewrites (:mod:`.model_rewrite`), benchmarks and TensorRT (:mod:`.bench`, :mod:`.tensorrt`).
Above the passes (pure graph work), below the API and the CLI."""
