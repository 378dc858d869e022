"""Official VampNet checkpoints → rtvamp bundles (needs the `convert` extra: torch, onnx, onnxscript)."""
